"""Measure every inference engine available on the build machine and pick the one to serve with.

The same ``model.onnx`` runs on ONNX Runtime's CPU provider and on OpenVINO (f32, and bf16 on
CPUs with bf16 units). Which is fastest depends on the graph and the CPU: with NNCF static INT8
on MiniLM, OpenVINO was fastest on a CPU with AMX/bf16 (b1x32 2.0 ms vs 3.1 ms for ONNX
Runtime's dynamic INT8), while on an AVX2-only CPU ONNX Runtime ran the same graph faster (b32x128
2447 vs 3139 ms, ``benchmarks/results/int8_modes.md``); ONNX Runtime's quantized contrib ops
(dynamic INT8's ``QAttention``) do not load in OpenVINO at all. So the choice is measured, not
assumed: :func:`measure_engines` records latency, fidelity and batch invariance per engine
(``manifest.engines``), :func:`best_engine` picks the fastest one that keeps the artifact's
promises, and :func:`runtime_recommendation` is what goes into ``manifest.runtime`` for
``pruneserve serve`` (``engine: auto``) to follow.

Timings are interleaved (one run of each engine per round, medians over rounds), so a busy
machine slows every engine alike and the ratios stay fair; intra-op spinning is off for the
same reason.
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pruneserve.optimizer.errors import ValidationError
from pruneserve.optimizer.static_int8 import Feeds, Runner, batch_invariance, mean_cosine, ort_runner

logger = logging.getLogger(__name__)

#: Engine keys as recorded in ``manifest.engines``: server engine name plus, for OpenVINO, precision.
ONNXRUNTIME = "onnxruntime"
OPENVINO_F32 = "openvino-f32"
OPENVINO_BF16 = "openvino-bf16"
#: Largest alone-vs-batched difference for an engine to count as batch-invariant.
DEFAULT_INVARIANCE_TOLERANCE = 1e-3


def openvino_runner(path: str | Path, threads: int = 1, precision: str = "f32") -> Runner:
    """An OpenVINO CPU compilation of ``path`` (dynamic shapes, explicit precision) returning the first output.

    Same settings as the server's ``OpenVinoEngine``: ``INFERENCE_PRECISION_HINT`` explicit,
    latency hint, one stream, no run-time activation quantization.
    """
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": "LATENCY",
    }
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in core.get_property("CPU", "SUPPORTED_PROPERTIES"):
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]
    first = compiled.outputs[0]

    def run(feeds: Feeds) -> np.ndarray:
        return np.array(request.infer({k: feeds[k] for k in names})[first], copy=True)

    return run


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin has bf16 kernels here (else a bf16 hint silently runs f32)."""
    if importlib.util.find_spec("openvino") is None:
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def available_engines() -> dict[str, tuple[str, str]]:
    """Engine key -> (server engine name, precision) for every engine this machine can run."""
    engines = {ONNXRUNTIME: ("onnxruntime", "fp32-graph")}
    if importlib.util.find_spec("openvino") is not None:
        engines[OPENVINO_F32] = ("openvino", "f32")
        if bf16_supported():
            engines[OPENVINO_BF16] = ("openvino", "bf16")
    return engines


def _runner(key: str, path: Path, threads: int) -> Runner:
    if key == ONNXRUNTIME:
        return ort_runner(path, threads)
    if key == OPENVINO_F32:
        return openvino_runner(path, threads, "f32")
    if key == OPENVINO_BF16:
        return openvino_runner(path, threads, "bf16")
    raise ValueError(f"unknown engine key {key!r}")


def _median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def interleaved_samples(
    runners: Mapping[str, Runner], feeds_b1: Feeds, feeds_b32: Feeds, *, rounds: int = 5, b1_reps: int = 5
) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds per run ``(b1 samples, b32 samples)`` per runner, one runner after another each round.

    Interleaving spreads the machine's background load over all runners alike, so ratios
    between them stay fair on a shared machine even when absolute numbers move.
    """
    b1: dict[str, list[float]] = {k: [] for k in runners}
    b32: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            for feeds, into, reps in ((feeds_b1, b1, b1_reps), (feeds_b32, b32, 1)):
                for _ in range(reps):
                    start = time.perf_counter()
                    run(feeds)
                    into[key].append(time.perf_counter() - start)
    return {k: (b1[k], b32[k]) for k in runners}


def time_interleaved(
    runners: Mapping[str, Runner], feeds_b1: Feeds, feeds_b32: Feeds, *, rounds: int = 5, b1_reps: int = 5
) -> dict[str, tuple[float, float]]:
    """Median milliseconds ``(b1, b32)`` per runner, timed by :func:`interleaved_samples`."""
    samples = interleaved_samples(runners, feeds_b1, feeds_b32, rounds=rounds, b1_reps=b1_reps)
    return {k: (_median_ms(b1), _median_ms(b32)) for k, (b1, b32) in samples.items()}


def measure_engines(
    onnx_path: str | Path,
    feeds_b1: Feeds,
    feeds_b32: Feeds,
    reference_outputs: np.ndarray | Sequence[np.ndarray],
    threads: int = 1,
    *,
    rounds: int = 5,
    engines: Sequence[str] | None = None,
    invariance_feeds: Sequence[Feeds] | None = None,
) -> dict[str, dict[str, Any]]:
    """Latency, fidelity and batch invariance of ``onnx_path`` on every available engine.

    Args:
        onnx_path: the artifact's graph.
        feeds_b1: one text (the b1 latency, e.g. ``[1, 32]``).
        feeds_b32: a batch (the batched latency, e.g. ``[32, 128]``; also the fidelity and
            batch-invariance texts).
        reference_outputs: the reference (fp32, unpruned or not) first output on ``feeds_b32``.
        threads: intra-op threads per engine.
        rounds: timed rounds, interleaved across engines (medians are reported).
        engines: keys to measure (default: :func:`available_engines`).
        invariance_feeds: texts of varied lengths for the batch-invariance probe (default
            ``feeds_b32``; texts of one length never exercise padding).

    Returns:
        ``{key: {"engine", "precision", "fidelity", "batch_invariance", "threads",
        "latency_b1x32_ms", "latency_b32x128_ms"}}`` (latency keys are named after the shapes
        actually given), or ``{"engine", "precision", "error"}`` for an engine that cannot run
        the graph (e.g. OpenVINO on dynamic INT8's ``QAttention``).
    """
    path = Path(onnx_path)
    known = available_engines()
    keys = list(engines) if engines is not None else list(known)
    reference = list(reference_outputs) if not isinstance(reference_outputs, np.ndarray) else [reference_outputs]
    b1_name = "latency_b{}x{}_ms".format(*np.asarray(feeds_b1["input_ids"]).shape)
    b32_name = "latency_b{}x{}_ms".format(*np.asarray(feeds_b32["input_ids"]).shape)
    results: dict[str, dict[str, Any]] = {}
    runners: dict[str, Runner] = {}
    for key in keys:
        if key not in known:
            logger.info("engine %s is not available on this machine; not measured", key)
            continue
        engine, precision = known[key]
        results[key] = {"engine": engine, "precision": precision}
        try:
            run = _runner(key, path, threads)
            out = run(feeds_b32)
            results[key]["fidelity"] = round(mean_cosine([out], reference), 6)
            results[key]["batch_invariance"] = float(batch_invariance(run, list(invariance_feeds or [feeds_b32])))
            run(feeds_b1)  # warm-up of the b1 shape
            runners[key] = run
        except Exception as exc:  # each runtime raises its own types for graphs it cannot run
            results[key]["error"] = _error_message(exc)
            logger.warning("engine %s cannot run %s: %s", key, path.name, results[key]["error"])
    timings = time_interleaved(runners, feeds_b1, feeds_b32, rounds=rounds)
    for key in runners:
        results[key][b1_name], results[key][b32_name] = timings[key]
        results[key]["threads"] = threads
        logger.info("engine %s: %s", key, results[key])
    return results


def best_engine(
    measurements: Mapping[str, Mapping[str, Any]],
    quality_floor: float | None,
    *,
    batch_invariant: bool = True,
    invariance_tolerance: float = DEFAULT_INVARIANCE_TOLERANCE,
    latency_key: str | None = None,
) -> str:
    """The fastest measured engine that meets ``quality_floor`` (and stays batch-invariant when
    the artifact claims ``batch_invariant``).

    ``latency_key`` defaults to the batched latency (the server runs batches); ties go to
    ONNX Runtime, the engine every build has.

    Raises:
        ValidationError: no engine qualifies; the message lists each engine's numbers.
    """
    def batched_key(entry: Mapping[str, Any]) -> str | None:
        keys = sorted((k for k in entry if k.startswith("latency_b") and k.endswith("_ms")), key=_shape_size)
        return keys[-1] if keys else None

    candidates: list[tuple[float, int, str]] = []
    for key, entry in measurements.items():
        if "error" in entry:
            continue
        lk = latency_key or batched_key(entry)
        if lk is None or lk not in entry:
            continue
        if quality_floor is not None and float(entry.get("fidelity", -1.0)) < quality_floor:
            continue
        if batch_invariant and float(entry.get("batch_invariance", np.inf)) > invariance_tolerance:
            continue
        candidates.append((float(entry[lk]), 0 if key == ONNXRUNTIME else 1, key))
    if not candidates:
        summary = "; ".join(f"{k}: {dict(v)}" for k, v in measurements.items()) or "no engine measured"
        raise ValidationError(
            f"no engine meets quality floor {quality_floor} with batch invariance <= {invariance_tolerance:g} "
            f"(batch_invariant={batch_invariant}): {summary}. Lower the floor or choose a less aggressive quantization"
        )
    return min(candidates)[2]


def _error_message(exc: BaseException) -> str:
    """One line for ``manifest.engines``: OpenVINO's C++ source-location lines dropped."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    text = " ".join(useful or lines) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:400]}"


def _shape_size(name: str) -> int:
    """``latency_b32x128_ms`` -> 4096 (tokens per run), for ordering latency keys."""
    try:
        b, s = name[len("latency_b") : -len("_ms")].split("x")
        return int(b) * int(s)
    except ValueError:
        return 0


def runtime_recommendation(key: str, measurements: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The ``manifest.runtime`` record for engine ``key`` (what ``serve --engine auto`` follows)."""
    entry = measurements[key]
    runtime: dict[str, Any] = {"engine": entry["engine"]}
    if entry["engine"] == "openvino":
        runtime["precision"] = entry["precision"]
    else:
        runtime["providers"] = ["CPUExecutionProvider"]
    return runtime


__all__ = [
    "ONNXRUNTIME",
    "OPENVINO_BF16",
    "OPENVINO_F32",
    "available_engines",
    "best_engine",
    "interleaved_samples",
    "bf16_supported",
    "measure_engines",
    "openvino_runner",
    "runtime_recommendation",
    "time_interleaved",
]
