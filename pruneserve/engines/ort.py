"""ONNX Runtime: the one place that builds ``SessionOptions`` and ``InferenceSession``.

* :func:`inference_session` is every session: the server's engine, the optimizer's checks
  and measurements, and the benchmarks. Its threads spin as ``pruneserve serve``'s do
  (:mod:`pruneserve.engines.ort_settings`), so latency measured anywhere is latency as served.
* :func:`ort_runner` wraps a session as a :data:`~pruneserve.engines.measure.Runner`.
* :class:`OnnxRuntimeEngine` is the server's :class:`~pruneserve.engines.base.Engine`.

``onnxruntime`` is imported on use, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pruneserve.engines.base import ORT_PROVIDERS, Engine, EngineLoadError, EngineOptions
from pruneserve.engines.keys import EXACT_PRECISION, ONNXRUNTIME
from pruneserve.engines.measure import Feeds, Runner
from pruneserve.engines.ort_settings import DEFAULT_SPINNING, spinning_entries

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def session_options(threads: int = 0, spinning: str = DEFAULT_SPINNING) -> Any:
    """``ort.SessionOptions``: ``threads`` intra-op threads (0 = ONNX Runtime's default), one
    inter-op thread, sequential execution, all graph optimizations, quiet logs, and the
    ``spinning`` mode's entries."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    for key, value in spinning_entries(spinning).items():
        so.add_session_config_entry(key, value)
    return so


def inference_session(
    model: str | Path | bytes,
    *,
    threads: int = 0,
    spinning: str = DEFAULT_SPINNING,
    providers: Sequence[str | tuple[str, dict[str, Any]]] = (CPU,),
) -> Any:
    """An ``ort.InferenceSession`` on ``model`` (a path or serialized bytes).

    ``providers`` are full ONNX Runtime names (or ``(name, options)`` pairs); those this build
    lacks are dropped, and CPU is used when none is left. ``spinning="off"`` suits sessions
    that run next to timed ones (checks, sensitivity searches): they leave no spinning threads.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    usable = [p for p in providers if (p[0] if isinstance(p, tuple) else p) in available] or [CPU]
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads, spinning), providers=list(usable))


def session_runner(session: Any) -> Runner:
    """A runner returning ``session``'s first output on the feeds its graph takes."""
    inputs = [i.name for i in session.get_inputs()]
    first = session.get_outputs()[0].name

    def run(feeds: Feeds) -> np.ndarray:
        return session.run([first], {k: feeds[k] for k in inputs})[0]

    return run


def ort_runner(model: str | Path | bytes, threads: int = 1, spinning: str = DEFAULT_SPINNING) -> Runner:
    """A CPU ONNX Runtime session on ``model`` returning the first output (spinning as served)."""
    return session_runner(inference_session(model, threads=threads, spinning=spinning))


def onnxruntime_version() -> str:
    """The installed onnxruntime's version (imports it)."""
    import onnxruntime as ort

    return str(ort.__version__)


class OnnxRuntimeEngine(Engine):
    """An ONNX Runtime ``InferenceSession`` with a verified provider list.

    Provider preference comes from the config (TensorRT -> CUDA -> CPU by convention).
    Providers this build of onnxruntime lacks are dropped with a warning; after the session
    exists, :meth:`providers` reports what ``session.get_providers()`` says, because ORT
    silently falls back to CPU when a GPU provider fails to initialise.

    Raises:
        EngineLoadError: ONNX Runtime cannot load the graph.
    """

    name = ONNXRUNTIME

    def __init__(self, model_path: str | Path, options: EngineOptions, input_names: Sequence[str]) -> None:
        import onnxruntime as ort  # local: keeps `import pruneserve.engines` cheap

        available = set(ort.get_available_providers())
        requested = [ORT_PROVIDERS[p] for p in options.providers]
        usable = [p for p in requested if p in available]
        missing = [p for p in requested if p not in available]
        if missing:
            logger.warning(
                "execution providers %s are not in this onnxruntime build (available: %s); skipping them",
                missing,
                sorted(available),
            )
        if not usable:
            logger.warning("none of the requested providers %s is available; using CPUExecutionProvider", requested)
            usable = [CPU]
        # Keep the user's first choice as "requested" so a missing GPU build shows as a fallback.
        self._requested = [requested[0], *[p for p in usable if p != requested[0]]]
        provider_args: list[str | tuple[str, dict[str, Any]]] = [
            (p, self._provider_options(p, options, input_names)) for p in usable
        ]
        try:
            self._session = inference_session(
                model_path, threads=options.threads, spinning=options.intra_op_spinning, providers=provider_args
            )
        except Exception as exc:  # ORT raises its own untyped errors for bad graphs
            raise EngineLoadError(f"ONNX Runtime cannot load {Path(model_path).name}: {exc}") from None
        self._providers = list(self._session.get_providers())
        self._input_names = [i.name for i in self._session.get_inputs()]
        self._output_names = [o.name for o in self._session.get_outputs()]
        self._threads = options.threads
        self._precision = EXACT_PRECISION
        if self._providers[:1] == ["TensorrtExecutionProvider"]:
            # TensorRT may run layers in any enabled lower precision.
            self._precision = "int8" if options.tensorrt_int8 else "fp16" if options.tensorrt_fp16 else EXACT_PRECISION

    @property
    def precision(self) -> str:
        return self._precision

    @staticmethod
    def _provider_options(provider: str, options: EngineOptions, input_names: Sequence[str]) -> dict[str, Any]:
        if provider == "TensorrtExecutionProvider":
            # One optimisation profile over the whole servable range, so TensorRT builds the
            # engine once (and caches it) instead of rebuilding for every new shape.
            def shapes(b: int, s: int) -> str:
                return ",".join(f"{n}:{b}x{s}" for n in input_names)

            opts: dict[str, Any] = {
                "trt_fp16_enable": options.tensorrt_fp16,
                "trt_int8_enable": options.tensorrt_int8,
                "trt_profile_min_shapes": shapes(1, 1),
                "trt_profile_opt_shapes": shapes(max(1, options.max_batch_size // 2), min(128, options.max_sequence_length)),
                "trt_profile_max_shapes": shapes(options.max_batch_size, options.max_sequence_length),
            }
            if options.tensorrt_cache_dir:
                Path(options.tensorrt_cache_dir).mkdir(parents=True, exist_ok=True)
                opts.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=options.tensorrt_cache_dir,
                    trt_timing_cache_enable=True,
                    trt_timing_cache_path=options.tensorrt_cache_dir,
                )
            return opts
        if provider == "CUDAExecutionProvider":
            return {"arena_extend_strategy": "kSameAsRequested"}
        return {}

    @property
    def providers(self) -> list[str]:
        return list(self._providers)

    @property
    def requested_providers(self) -> list[str]:
        return list(self._requested)

    @property
    def input_names(self) -> list[str]:
        """The graph's input names."""
        return list(self._input_names)

    @property
    def output_names(self) -> list[str]:
        """The graph's output names."""
        return list(self._output_names)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else self._output_names
        values = self._session.run(names, {k: v for k, v in feeds.items() if k in self._input_names})
        return dict(zip(names, values))

    def describe(self) -> dict[str, str]:
        info = super().describe()
        info.update(engine_version=onnxruntime_version(), threads=str(self._threads), precision=self._precision)
        return info

    def close(self) -> None:
        # InferenceSession frees its memory when the last reference goes.
        self._session = None  # type: ignore[assignment]


__all__ = [
    "CPU",
    "OnnxRuntimeEngine",
    "inference_session",
    "onnxruntime_version",
    "ort_runner",
    "session_options",
    "session_runner",
]
