"""OpenVINO: the one place that creates ``openvino.Core`` and compiles models, with its serving
settings written once (:func:`serving_config`) for the server's engine, the optimizer's
measurements and the benchmarks.

Why a second engine: on x86 CPUs OpenVINO runs the same ``model.onnx`` as ONNX Runtime
with its own kernels, reads ONNX QDQ (static INT8) natively, and can run the float parts in
bf16 on CPUs that have bf16 units (AVX512-BF16 / AMX). On such a CPU, OpenVINO + NNCF static
INT8 ran MiniLM b1x32 in 2.0 ms vs 3.1 ms for ONNX Runtime's dynamic INT8 and stayed
batch-invariant; on an AVX2-only CPU it was slower than ONNX Runtime
(``benchmarks/results/int8_modes.md``), which is why the optimizer measures both and records
its choice in ``manifest.runtime``. It cannot read ONNX Runtime's quantized contrib ops
(``QAttention`` of dynamic INT8 artifacts): those are ONNX Runtime only.

Design points:

* **Lazy import.** ``openvino`` is imported when a model is compiled, never when this
  module is imported, so a server without the ``openvino`` extra still starts;
  :func:`create_openvino_engine` turns the missing package into an
  :class:`~pruneserve.engines.base.EngineLoadError` that says how to fix it. Falling back to
  ONNX Runtime is the server's decision (``engine: auto``), not this module's: an explicit
  ``engine: openvino`` that cannot load must fail loudly.
* **One compilation.** The graph's ``batch``/``sequence`` dimensions stay dynamic and the
  model is compiled once; the CPU plugin infers shapes per call instead of recompiling.
* **Precision.** ``INFERENCE_PRECISION_HINT`` is chosen explicitly (:func:`resolve_precision`):
  the configured value, else the verified manifest's recommendation (``manifest.runtime`` /
  the measured ``manifest.engines`` entry), else f32. OpenVINO would otherwise pick bf16 by
  itself on CPUs with bf16 units, changing answers by ~1e-3 without the artifact having
  measured that precision against its quality floor.
* **Batch invariance.** OpenVINO's CPU plugin may quantize activations at run time
  (``DYNAMIC_QUANTIZATION_GROUP_SIZE``) for weight-compressed graphs, which would make an
  answer depend on its batch-mates; it is turned off, because pruneserve artifacts carry
  their own (static) quantization.
* **Threads.** One ``InferRequest`` per calling thread: requests are not thread-safe, the
  compiled model is.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pruneserve.engines.base import Engine, EngineLoadError, EngineOptions
from pruneserve.engines.keys import OPENVINO, OPENVINO_BF16, OPENVINO_PRECISIONS
from pruneserve.engines.measure import Feeds, Runner

if TYPE_CHECKING:
    from pruneserve.artifact import Manifest

logger = logging.getLogger(__name__)

#: Engine name in the config and ``manifest.runtime["engine"]``.
ENGINE_NAME = OPENVINO
#: Precision hints this engine accepts; ``auto`` = the artifact's recorded choice, else f32.
PRECISIONS: tuple[str, ...] = OPENVINO_PRECISIONS
#: How to install the optional extra (named in every "not installed" error).
INSTALL = "pip install 'pruneserve[openvino]'"


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


@functools.cache
def core() -> Any:
    """The process's ``openvino.Core`` (one: it owns the loaded device plugins)."""
    import openvino as ov

    return ov.Core()


def openvino_version() -> str:
    """The installed OpenVINO's version string."""
    import openvino as ov

    return str(ov.__version__ if hasattr(ov, "__version__") else ov.get_version())


def bf16_supported(device: str = "CPU") -> bool:
    """Whether OpenVINO's ``device`` plugin has bf16 kernels here (else a bf16 hint silently runs f32)."""
    if not openvino_available():
        return False
    return "BF16" in core().get_property(device, "OPTIMIZATION_CAPABILITIES")


def serving_config(precision: str, threads: int = 0, streams: int = 1, device: str = "CPU") -> dict[str, Any]:
    """The compile settings every served or measured OpenVINO model gets.

    Precision hint explicit; one stream with the latency hint (each run is a whole batch, the
    batcher provides throughput), several with the throughput hint; ``threads`` 0 = all cores;
    run-time activation quantization off (it would make answers depend on batch-mates).
    """
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": precision,
        "NUM_STREAMS": str(streams),
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in core().get_property(device, "SUPPORTED_PROPERTIES"):
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    return config


def read_model(path: str | Path) -> Any:
    """``openvino.Model`` read from an ONNX (or IR) file."""
    return core().read_model(str(path))


def compile_graph(model: Any, config: Mapping[str, Any], device: str = "CPU") -> Any:
    """``model`` (an ``openvino.Model`` or a path) compiled for ``device`` with ``config``
    (:func:`serving_config`, or a benchmark's deliberate variant such as OpenVINO's defaults)."""
    source = str(model) if isinstance(model, (str, Path)) else model
    return core().compile_model(source, device, dict(config))


def compiled_runner(compiled: Any) -> Runner:
    """A runner returning a compiled model's first output (a copy: the request reuses its buffers)."""
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]
    first = compiled.outputs[0]

    def run(feeds: Feeds) -> np.ndarray:
        return np.array(request.infer({k: feeds[k] for k in names})[first], copy=True)

    return run


def openvino_runner(path: str | Path, threads: int = 1, precision: str = "f32") -> Runner:
    """An OpenVINO CPU compilation of ``path`` with :func:`serving_config`, returning the first output."""
    return compiled_runner(compile_graph(read_model(path), serving_config(precision, threads)))


@dataclass(frozen=True)
class OpenVinoSettings:
    """OpenVINO-specific knobs (beyond :class:`EngineOptions`).

    Attributes:
        precision: ``auto`` | ``f32`` | ``bf16`` (``INFERENCE_PRECISION_HINT`` for the float parts).
        threads: ``INFERENCE_NUM_THREADS`` (0 = OpenVINO's default, all cores).
        streams: ``NUM_STREAMS``: parallel inference streams; 1 suits one batcher worker.
        device: OpenVINO device name; only ``CPU`` is tested.
    """

    precision: str = "auto"
    threads: int = 0
    streams: int = 1
    device: str = "CPU"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineLoadError(f"openvino precision {self.precision!r} is not one of {PRECISIONS}; use 'auto' or 'f32'")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise EngineLoadError(f"openvino threads {self.threads!r} must be an integer >= 0 (0 = all cores)")
        if not isinstance(self.streams, int) or self.streams < 1:
            raise EngineLoadError(f"openvino streams {self.streams!r} must be an integer >= 1 (e.g. 1 per worker)")
        if not self.device:
            raise EngineLoadError("openvino device is empty; use 'CPU'")

    @classmethod
    def from_options(cls, options: EngineOptions) -> OpenVinoSettings:
        """Take the settings from ``options`` (``openvino_streams`` read when a config grows it)."""
        return cls(
            precision=str(options.openvino_precision or "auto"),
            threads=int(options.threads or 0),
            streams=int(getattr(options, "openvino_streams", 1) or 1),
        )


def resolve_precision(
    requested: str,
    *,
    bf16_supported: bool,
    runtime: Mapping[str, Any] | None = None,
    engines: Mapping[str, Any] | None = None,
    quality_floor: float | None = None,
) -> str:
    """The ``INFERENCE_PRECISION_HINT`` to compile with (``f32`` or ``bf16``).

    Order: an explicit ``requested`` precision; else the artifact's recommendation
    (``runtime = {"engine": "openvino", "precision": ...}``); else bf16 when the artifact
    measured OpenVINO bf16 (``engines["openvino-bf16"]["fidelity"]``) at or above its quality
    floor; else f32, the precision every artifact is validated in. bf16 on a CPU without bf16
    units is reported and replaced by f32 (OpenVINO would silently ignore the hint).
    """
    runtime = runtime or {}
    engines = engines or {}
    choice = "f32"
    if requested != "auto":
        choice = requested
    elif runtime.get("engine") == ENGINE_NAME and runtime.get("precision") in ("f32", "bf16"):
        choice = str(runtime["precision"])
    else:
        measured = engines.get(OPENVINO_BF16)
        fidelity = measured.get("fidelity") if isinstance(measured, Mapping) else None
        if isinstance(fidelity, (int, float)) and quality_floor is not None and fidelity >= quality_floor:
            choice = "bf16"
    if choice == "bf16" and not bf16_supported:
        logger.warning("bf16 was chosen for OpenVINO but this CPU has no bf16 units; compiling in f32")
        choice = "f32"
    return choice


class OpenVinoEngine(Engine):
    """An ONNX graph compiled by OpenVINO, with the same outputs contract as ``OnnxRuntimeEngine``.

    Args:
        model_path: the artifact's ``model.onnx``.
        options: the server's engine options (threads; providers are ignored: OpenVINO
            chooses kernels per device, not per provider).
        input_names: the manifest's inputs, checked against the graph's.
        settings: OpenVINO knobs; default from ``options``.
        manifest: the verified manifest whose ``runtime`` / ``engines`` / ``quality_floor``
            choose the precision under ``auto`` (None: f32 unless asked otherwise).

    Raises:
        EngineLoadError: device unavailable, graph unreadable or uncompilable, inputs missing.
    """

    name = ENGINE_NAME

    def __init__(
        self,
        model_path: str | Path,
        options: EngineOptions,
        input_names: Sequence[str],
        settings: OpenVinoSettings | None = None,
        *,
        manifest: Manifest | None = None,
    ) -> None:
        self._settings = settings or OpenVinoSettings.from_options(options)
        path = Path(model_path)
        device = self._settings.device
        ov_core = core()
        if device not in ov_core.available_devices:
            raise EngineLoadError(
                f"OpenVINO device {device!r} is not available here (available: {ov_core.available_devices}); use 'CPU'"
            )
        self._precision = resolve_precision(
            self._settings.precision,
            bf16_supported=bf16_supported(device),
            runtime=manifest.runtime if manifest is not None else None,
            engines=manifest.engines if manifest is not None else None,
            quality_floor=manifest.quality_floor if manifest is not None else None,
        )
        try:
            model = read_model(path)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long C++ traces
            raise EngineLoadError(f"OpenVINO cannot read {path.name}: {openvino_message(exc)}") from None
        self._input_names = [p.get_any_name() for p in model.inputs]
        self._output_names = [p.get_any_name() for p in model.outputs]
        missing = sorted(set(input_names) - set(self._input_names))
        if missing:
            raise EngineLoadError(f"{path.name} lacks inputs {missing}; the graph has {self._input_names}")
        config = serving_config(self._precision, self._settings.threads, self._settings.streams, device)
        try:
            self._compiled = compile_graph(model, config, device)
        except Exception as exc:
            raise EngineLoadError(f"OpenVINO cannot compile {path.name} for {device}: {openvino_message(exc)}") from None
        self._ports = {p.get_any_name(): p for p in self._compiled.outputs}
        self._local = threading.local()
        self._version = openvino_version()
        self._devices = list(self._compiled.get_property("EXECUTION_DEVICES"))
        self._streams = int(self._compiled.get_property("NUM_STREAMS"))
        logger.info(
            "OpenVINO %s compiled %s on %s: precision %s, threads %s, streams %d",
            self._version, path.name, self._devices, self._precision,
            self._settings.threads or "default", self._settings.streams,
        )

    # -- Engine interface ----------------------------------------------------------------
    @property
    def providers(self) -> list[str]:
        return list(self._devices)

    @property
    def requested_providers(self) -> list[str]:
        return [self._settings.device]

    @property
    def input_names(self) -> list[str]:
        """The graph's input names."""
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        """The graph's output names."""
        return list(self._output_names)

    @property
    def precision(self) -> str:
        """The inference precision the model was compiled with (``f32`` or ``bf16``)."""
        return self._precision

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._compiled.create_infer_request()
            self._local.request = request
        return request

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self._output_names
        request = self._request()
        inputs = {k: np.ascontiguousarray(v) for k, v in feeds.items() if k in self._input_names}
        result = request.infer(inputs)
        # The request reuses its output buffers on the next call: hand out copies.
        return {n: np.array(result[self._ports[n]], copy=True) for n in names}

    def describe(self) -> dict[str, str]:
        info = super().describe()
        info.update(
            engine_version=str(self._version),
            precision=self._precision,
            threads=str(self._settings.threads or "default"),
            streams=str(self._streams),
        )
        return info

    def close(self) -> None:
        self._local = threading.local()
        self._compiled = None  # type: ignore[assignment]


def openvino_message(exc: BaseException) -> str:
    """The informative part of an OpenVINO error: its C++ source-location lines dropped."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    text = " ".join(useful or lines)
    return (text[:400] + "...") if len(text) > 400 else (text or type(exc).__name__)


def create_openvino_engine(
    model_path: str | Path, options: EngineOptions, input_names: Sequence[str], manifest: Manifest | None = None
) -> Engine:
    """Factory for ``ENGINES["openvino"]``: an :class:`OpenVinoEngine`, or a clear error.

    Raises:
        EngineLoadError: openvino is not installed (with the install command), or the graph
            cannot be read or compiled.
    """
    try:
        import openvino  # noqa: F401 - only checks that the optional extra is installed
    except ImportError as exc:
        raise EngineLoadError(
            f"engine 'openvino' needs the openvino package, which is not installed ({exc}); "
            f"install it with `{INSTALL}`, or serve with engine 'onnxruntime' "
            "(engine 'auto' falls back to onnxruntime by itself)"
        ) from None
    return OpenVinoEngine(model_path, options, input_names, manifest=manifest)


__all__ = [
    "ENGINE_NAME",
    "INSTALL",
    "PRECISIONS",
    "OpenVinoEngine",
    "OpenVinoSettings",
    "bf16_supported",
    "compile_graph",
    "compiled_runner",
    "core",
    "create_openvino_engine",
    "openvino_available",
    "openvino_message",
    "openvino_runner",
    "openvino_version",
    "read_model",
    "resolve_precision",
    "serving_config",
]
