"""OpenVINO engine: an artifact's ONNX graph compiled by ``openvino.Core`` for the CPU.

Why a second engine: on x86 CPUs OpenVINO runs the same ``model.onnx`` as ONNX Runtime
with its own kernels, reads ONNX QDQ (static INT8) natively, and can run the float parts in
bf16 on CPUs that have bf16 units (AVX512-BF16 / AMX). On such a CPU, OpenVINO + NNCF static
INT8 ran MiniLM b1x32 in 2.0 ms vs 3.1 ms for ONNX Runtime's dynamic INT8 and stayed
batch-invariant; on an AVX2-only CPU it was slower than ONNX Runtime
(``benchmarks/results/int8_modes.md``), which is why the optimizer measures both and records
its choice in ``manifest.runtime``. It cannot read ONNX Runtime's quantized contrib ops
(``QAttention`` of dynamic INT8 artifacts): those are ONNX Runtime only.

Design points:

* **Lazy import.** ``openvino`` is imported when an engine is created, never when this
  module is imported, so a server without the ``openvino`` extra still starts;
  :func:`create_openvino_engine` turns the missing package into a
  :class:`~pruneserve.server.errors.ModelLoadError` that says how to fix it. Falling back to
  ONNX Runtime is the runtime's decision (``resolve_engine_name`` with ``engine: auto``), not
  this module's: an explicit ``engine: openvino`` that cannot load must fail loudly.
* **One compilation.** The graph's ``batch``/``sequence`` dimensions stay dynamic and the
  model is compiled once; the CPU plugin infers shapes per call instead of recompiling.
* **Precision.** ``INFERENCE_PRECISION_HINT`` is chosen explicitly (:func:`resolve_precision`):
  the configured value, else the artifact's recorded recommendation (``manifest.runtime`` /
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

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pruneserve.server.errors import ModelLoadError
from pruneserve.server.runtime import Engine, EngineOptions

logger = logging.getLogger(__name__)

#: Engine name in the config and ``manifest.runtime["engine"]``.
ENGINE_NAME = "openvino"
#: Precision hints this engine accepts; ``auto`` = the artifact's recorded choice, else f32.
PRECISIONS: tuple[str, ...] = ("auto", "f32", "bf16")
#: Manifest file next to the model in an artifact folder (read for the recorded precision).
_MANIFEST_FILE = "manifest.json"


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
            raise ModelLoadError(f"openvino precision {self.precision!r} is not one of {PRECISIONS}; use 'auto' or 'f32'")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ModelLoadError(f"openvino threads {self.threads!r} must be an integer >= 0 (0 = all cores)")
        if not isinstance(self.streams, int) or self.streams < 1:
            raise ModelLoadError(f"openvino streams {self.streams!r} must be an integer >= 1 (e.g. 1 per worker)")
        if not self.device:
            raise ModelLoadError("openvino device is empty; use 'CPU'")

    @classmethod
    def from_options(cls, options: EngineOptions) -> OpenVinoSettings:
        """Take the settings from ``options``.

        ``EngineOptions`` has no OpenVINO fields today; ``openvino_precision`` and
        ``openvino_streams`` are read when present so the config can grow them without a
        change here.
        """
        return cls(
            precision=str(getattr(options, "openvino_precision", "auto") or "auto"),
            threads=int(options.threads or 0),
            streams=int(getattr(options, "openvino_streams", 1) or 1),
        )


def _recorded_runtime(model_path: Path) -> tuple[dict[str, Any], dict[str, Any], float | None]:
    """``runtime``, ``engines`` and ``quality_floor`` of the artifact holding ``model_path``, if any."""
    manifest = model_path.parent / _MANIFEST_FILE
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}, None
    if not isinstance(data, dict):
        return {}, {}, None
    runtime = data.get("runtime") if isinstance(data.get("runtime"), dict) else {}
    engines = data.get("engines") if isinstance(data.get("engines"), dict) else {}
    floor = data.get("quality_floor")
    return runtime, engines, float(floor) if isinstance(floor, (int, float)) else None


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
        measured = engines.get(f"{ENGINE_NAME}-bf16")
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
    """

    name = ENGINE_NAME

    def __init__(
        self,
        model_path: str | Path,
        options: EngineOptions,
        input_names: Sequence[str],
        settings: OpenVinoSettings | None = None,
    ) -> None:
        import openvino as ov  # lazy: the package is an optional extra

        self._settings = settings or OpenVinoSettings.from_options(options)
        path = Path(model_path)
        core = ov.Core()
        device = self._settings.device
        if device not in core.available_devices:
            raise ModelLoadError(
                f"OpenVINO device {device!r} is not available here (available: {core.available_devices}); use 'CPU'"
            )
        capabilities = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        runtime, engines, floor = _recorded_runtime(path)
        self._precision = resolve_precision(
            self._settings.precision,
            bf16_supported="BF16" in capabilities,
            runtime=runtime,
            engines=engines,
            quality_floor=floor,
        )
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long C++ traces
            raise ModelLoadError(f"OpenVINO cannot read {path.name}: {_openvino_message(exc)}") from None
        self._input_names = [p.get_any_name() for p in model.inputs]
        self._output_names = [p.get_any_name() for p in model.outputs]
        missing = sorted(set(input_names) - set(self._input_names))
        if missing:
            raise ModelLoadError(f"{path.name} lacks inputs {missing}; the graph has {self._input_names}")

        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self._precision,
            "NUM_STREAMS": str(self._settings.streams),
            # One stream: each engine run is a whole batch, the batcher provides throughput.
            # Several streams serve several batcher workers at once.
            "PERFORMANCE_HINT": "LATENCY" if self._settings.streams == 1 else "THROUGHPUT",
        }
        if self._settings.threads:
            config["INFERENCE_NUM_THREADS"] = self._settings.threads
        if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in core.get_property(device, "SUPPORTED_PROPERTIES"):
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
        try:
            self._compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise ModelLoadError(f"OpenVINO cannot compile {path.name} for {device}: {_openvino_message(exc)}") from None
        self._ports = {p.get_any_name(): p for p in self._compiled.outputs}
        self._local = threading.local()
        self._version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
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


def _openvino_message(exc: BaseException) -> str:
    """The informative part of an OpenVINO error: its C++ source-location lines dropped."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    text = " ".join(useful or lines)
    return (text[:400] + "...") if len(text) > 400 else (text or type(exc).__name__)


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported (without importing it twice)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def create_openvino_engine(model_path: str | Path, options: EngineOptions, input_names: Sequence[str]) -> Engine:
    """Factory for ``runtime.ENGINES["openvino"]``: an :class:`OpenVinoEngine`, or a clear error.

    Raises:
        ModelLoadError: openvino is not installed (with the install command), or the graph
            cannot be read or compiled.
    """
    try:
        import openvino  # noqa: F401 - only checks that the optional extra is installed
    except ImportError as exc:
        raise ModelLoadError(
            f"engine 'openvino' needs the openvino package, which is not installed ({exc}); "
            "install it with `pip install 'pruneserve[openvino]'`, or serve with engine 'onnxruntime' "
            "(engine 'auto' falls back to onnxruntime by itself)"
        ) from None
    return OpenVinoEngine(model_path, options, input_names)


__all__ = [
    "ENGINE_NAME",
    "PRECISIONS",
    "OpenVinoEngine",
    "OpenVinoSettings",
    "create_openvino_engine",
    "openvino_available",
    "resolve_precision",
]
