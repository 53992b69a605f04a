"""Measure every inference engine available on the build machine and pick the one to serve with.

The same ``model.onnx`` runs on ONNX Runtime's CPU provider and on OpenVINO (f32, and bf16 on
CPUs with bf16 units). Which is fastest depends on the graph and the CPU: with NNCF static INT8
on MiniLM, OpenVINO was fastest on a CPU with AMX/bf16 (b1x32 2.0 ms vs 3.1 ms for ONNX
Runtime's dynamic INT8), while on an AVX2-only CPU ONNX Runtime ran the same graph faster (b32x128
2447 vs 3139 ms, ``benchmarks/results/int8_modes.md``); ONNX Runtime's quantized contrib ops
(dynamic INT8's ``QAttention``) do not load in OpenVINO at all. So the choice is measured, not
assumed: :func:`measure_graphs` records latency, fidelity and batch invariance of several graphs
(the pipeline's quantization candidates) on every engine, :func:`choose` picks the fastest
(graph, engine) pair that keeps the artifact's promises (quality floor, batch invariance) and
says for every other pair why not (``manifest.quantization.selection``), :func:`measure_engines`
/ :func:`best_engine` are the same for one graph (``manifest.engines``), and
:func:`runtime_recommendation` is what goes into ``manifest.runtime`` for ``pruneserve serve``
(``engine: auto``) to follow.

Timings are interleaved (one run of each engine per round, medians over rounds), so a busy
machine slows every engine alike and the ratios stay fair. ONNX Runtime's threads spin inside
a run only, as ``pruneserve serve`` runs them, so no engine's idle threads slow the next one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pruneserve.engines.keys import GRAPH_PRECISION, ONNXRUNTIME, OPENVINO, OPENVINO_BF16, OPENVINO_F32
from pruneserve.engines.measure import (
    DEFAULT_INVARIANCE_TOLERANCE,
    Feeds,
    Runner,
    batch_invariance,
    mean_cosine,
    time_interleaved,
)
from pruneserve.engines.openvino import bf16_supported, openvino_available, openvino_runner
from pruneserve.engines.ort import ort_runner
from pruneserve.optimizer.errors import ValidationError

logger = logging.getLogger(__name__)

#: Turns a graph's outputs on the held-out batches into the quality on the floor's scale.
Scorer = Callable[[list[np.ndarray]], float]


def available_engines() -> dict[str, tuple[str, str]]:
    """Engine key -> (server engine name, precision) for every engine this machine can run."""
    engines = {ONNXRUNTIME: (ONNXRUNTIME, GRAPH_PRECISION)}
    if openvino_available():
        engines[OPENVINO_F32] = (OPENVINO, "f32")
        if bf16_supported():
            engines[OPENVINO_BF16] = (OPENVINO, "bf16")
    return engines


def _runner(key: str, path: Path, threads: int) -> Runner:
    if key == ONNXRUNTIME:
        return ort_runner(path, threads)
    if key == OPENVINO_F32:
        return openvino_runner(path, threads, "f32")
    if key == OPENVINO_BF16:
        return openvino_runner(path, threads, "bf16")
    raise ValueError(f"unknown engine key {key!r}")


def measure_graphs(
    graphs: Mapping[str, str | Path],
    feeds_b1: Feeds,
    feeds_b32: Feeds,
    reference_outputs: np.ndarray | Sequence[np.ndarray],
    threads: int = 1,
    *,
    rounds: int = 5,
    engines: Sequence[str] | None = None,
    invariance_feeds: Sequence[Feeds] | None = None,
    fidelity_feeds: Sequence[Feeds] | None = None,
    score: Scorer | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Latency, fidelity and batch invariance of several graphs, each on every available engine.

    All (graph, engine) pairs are timed in one interleaved loop (one run of each pair per
    round), so a shared machine's load falls on every candidate alike and the ratios between
    graphs are as fair as those between engines.

    Args:
        graphs: name -> ONNX path (e.g. the quantization candidates ``dynamic``, ``static``, ``none``).
        feeds_b1: one text (the b1 latency, e.g. ``[1, 32]``).
        feeds_b32: a batch (the batched latency, e.g. ``[32, 128]``; also the fidelity and
            batch-invariance texts unless ``fidelity_feeds`` / ``invariance_feeds`` are given).
        reference_outputs: the reference first output on ``feeds_b32``, or one per
            ``fidelity_feeds`` batch when those are given.
        threads: intra-op threads per engine.
        rounds: timed rounds, interleaved across all pairs (medians are reported).
        engines: keys to measure (default: :func:`available_engines`).
        invariance_feeds: texts of varied lengths for the batch-invariance probe (default
            ``feeds_b32``; texts of one length never exercise padding).
        fidelity_feeds: held-out batches to measure fidelity on (default ``feeds_b32``).
        score: turns the outputs on ``fidelity_feeds`` into the quality on the floor's scale
            (e.g. 1 - accuracy drop for classifiers); default mean cosine to the reference.

    Returns:
        ``{graph: {key: {"engine", "precision", "fidelity", "batch_invariance", "threads",
        "latency_b1x32_ms", "latency_b32x128_ms"}}}`` (latency keys are named after the shapes
        actually given), or ``{"engine", "precision", "error"}`` for an engine that cannot run
        a graph (e.g. OpenVINO on dynamic INT8's ``QAttention``).
    """
    known = available_engines()
    keys = list(engines) if engines is not None else list(known)
    for key in keys:
        if key not in known:
            logger.info("engine %s is not available on this machine; not measured", key)
    keys = [k for k in keys if k in known]
    reference = list(reference_outputs) if not isinstance(reference_outputs, np.ndarray) else [reference_outputs]
    fidelity_on = list(fidelity_feeds) if fidelity_feeds is not None else [feeds_b32]
    if len(fidelity_on) != len(reference):
        raise ValueError(f"{len(fidelity_on)} fidelity batches but {len(reference)} reference outputs")
    b1_name = "latency_b{}x{}_ms".format(*np.asarray(feeds_b1["input_ids"]).shape)
    b32_name = "latency_b{}x{}_ms".format(*np.asarray(feeds_b32["input_ids"]).shape)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    runners: dict[tuple[str, str], Runner] = {}
    for number, (graph, onnx_path) in enumerate(graphs.items(), 1):
        path = Path(onnx_path)
        results[graph] = {}
        for key in keys:
            engine, precision = known[key]
            entry: dict[str, Any] = {"engine": engine, "precision": precision}
            results[graph][key] = entry
            started = time.perf_counter()
            try:
                run = _runner(key, path, threads)
                outputs = [run(f) for f in fidelity_on]
                value = score(outputs) if score is not None else mean_cosine(outputs, reference)
                entry["fidelity"] = round(float(value), 6)
                entry["batch_invariance"] = float(batch_invariance(run, list(invariance_feeds or [feeds_b32])))
                run(feeds_b1)  # warm-up of the timed shapes
                run(feeds_b32)
                runners[(graph, key)] = run
                logger.info("engines: graph %s (%d/%d) on %s: fidelity %.4f, batch invariance %.1e (%.0f s)",
                            graph, number, len(graphs), key, entry["fidelity"], entry["batch_invariance"],
                            time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - each runtime raises its own types for graphs it cannot run
                entry["error"] = _error_message(exc)
                logger.warning("engines: %s cannot run graph %s (%s): %s", key, graph, path.name, entry["error"])
    logger.info("engines: timing %d (graph, engine) pairs interleaved, %d rounds", len(runners), rounds)
    timings = time_interleaved(
        {f"{g}/{k}": run for (g, k), run in runners.items()}, feeds_b1, feeds_b32, rounds=rounds
    )
    for (graph, key) in runners:
        entry = results[graph][key]
        entry[b1_name], entry[b32_name] = timings[f"{graph}/{key}"]
        entry["threads"] = threads
        logger.info("engines: graph %s on %s: %s %.2f ms, %s %.2f ms", graph, key,
                    b1_name, entry[b1_name], b32_name, entry[b32_name])
    return results


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
    fidelity_feeds: Sequence[Feeds] | None = None,
    score: Scorer | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`measure_graphs` for one graph: ``{engine key: measurements or error}``."""
    return measure_graphs(
        {"graph": onnx_path}, feeds_b1, feeds_b32, reference_outputs, threads, rounds=rounds, engines=engines,
        invariance_feeds=invariance_feeds, fidelity_feeds=fidelity_feeds, score=score,
    )["graph"]


@dataclass
class Choice:
    """The chosen (graph, engine) pair and, for every pair measured, why it was or was not chosen."""

    graph: str
    engine: str
    latency_key: str
    #: graph -> engine key -> one line: "chosen: ...", "below the quality floor: ...", ...
    verdicts: dict[str, dict[str, str]] = field(default_factory=dict)


#: Cost label of :func:`choose`'s default: the geometric mean of an entry's latencies.
GEOMEAN = "geomean"


def _latency_keys(entry: Mapping[str, Any]) -> list[str]:
    """The entry's ``latency_b{B}x{S}_ms`` keys, smallest shape first."""
    return sorted((k for k in entry if k.startswith("latency_b") and k.endswith("_ms")), key=_shape_size)


def _default_cost_key(entry: Mapping[str, Any]) -> str | None:
    keys = _latency_keys(entry)
    if not keys:
        return None
    return keys[0] if len(keys) == 1 else f"{GEOMEAN}({', '.join(k[len('latency_'):-len('_ms')] for k in keys)}) ms"


def _cost(entry: Mapping[str, Any], key: str) -> float | None:
    """Milliseconds ``key`` names: one latency, or the geometric mean of all of them."""
    if key.startswith(GEOMEAN):
        values = [float(entry[k]) for k in _latency_keys(entry)]
        return float(np.exp(np.mean(np.log(values)))) if values and min(values) > 0 else None
    return float(entry[key]) if key in entry else None


def choose(
    measurements: Mapping[str, Mapping[str, Mapping[str, Any]]],
    quality_floor: float | None,
    *,
    batch_invariant: bool = True,
    invariance_tolerance: float = DEFAULT_INVARIANCE_TOLERANCE,
    latency_key: str | None = None,
    subject: str = "(quantization, engine) pair",
) -> Choice:
    """The fastest measured (graph, engine) pair that meets ``quality_floor`` and, when
    ``batch_invariant``, answers the same alone and batched (within ``invariance_tolerance``).

    ``latency_key`` defaults to the geometric mean of every latency the entry has (one text
    and a batch: a server sees both, and on an AVX2 CPU static INT8 was 2x slower than fp32 for
    one text while faster for a batch, so neither shape alone picks well). Ties
    go to ONNX Runtime (the engine every build has), then to the earlier graph. ``subject``
    names what is chosen in the error message.

    Raises:
        ValidationError: no pair qualifies; the message gives each pair's numbers and verdict.
    """
    verdicts: dict[str, dict[str, str]] = {}
    qualified: list[tuple[float, int, int, str, str, str]] = []
    for g_index, (graph, by_engine) in enumerate(measurements.items()):
        verdicts[graph] = {}
        for key, entry in by_engine.items():
            lk = latency_key or _default_cost_key(entry)
            fid = entry.get("fidelity")
            inv = entry.get("batch_invariance")
            if "error" in entry:
                why = f"cannot run: {entry['error']}"
            elif lk is None or _cost(entry, lk) is None:
                why = "not timed"
            elif quality_floor is not None and not float(fid if fid is not None else -1.0) >= quality_floor:
                why = f"below the quality floor: {float(fid if fid is not None else float('nan')):.4f} < {quality_floor}"
            elif batch_invariant and not float(inv if inv is not None else np.inf) <= invariance_tolerance:
                why = (f"batch-variant: alone vs batched differ by {float(inv if inv is not None else np.nan):.1e} > "
                       f"{invariance_tolerance:g} (allowed only with --allow-batch-variance)")
            else:
                qualified.append((float(_cost(entry, lk)), 0 if key == ONNXRUNTIME else 1, g_index, graph, key, lk))
                continue
            verdicts[graph][key] = why
    if not qualified:
        summary = "; ".join(
            f"{g}/{k}: {_numbers(measurements[g][k])} -> {why}" for g, by in verdicts.items() for k, why in by.items()
        ) or "nothing measured"
        raise ValidationError(
            f"no {subject} meets quality floor {quality_floor}"
            + (f" with batch invariance <= {invariance_tolerance:g}" if batch_invariant else "")
            + f": {summary}. Lower --quality-floor, prune less (--preset light), "
            "or pass --allow-batch-variance to let dynamic INT8 compete"
        )
    qualified.sort()
    best_ms, _, _, best_graph, best_key, best_lk = qualified[0]
    shape = best_lk if best_lk.startswith(GEOMEAN) else best_lk[len("latency_"):-len("_ms")]
    for ms, _, _, graph, key, lk in qualified:
        if (graph, key) == (best_graph, best_key):
            verdicts[graph][key] = f"chosen: fastest that qualifies ({shape} {ms:.2f} ms)"
        else:
            verdicts[graph][key] = f"qualifies, but slower: {shape} {ms:.2f} ms vs {best_ms:.2f} ms"
    return Choice(best_graph, best_key, best_lk, verdicts)


def best_engine(
    measurements: Mapping[str, Mapping[str, Any]],
    quality_floor: float | None,
    *,
    batch_invariant: bool = True,
    invariance_tolerance: float = DEFAULT_INVARIANCE_TOLERANCE,
    latency_key: str | None = None,
) -> str:
    """The fastest measured engine that meets ``quality_floor`` (and stays batch-invariant when
    the artifact claims ``batch_invariant``): :func:`choose` over one graph.

    Raises:
        ValidationError: no engine qualifies; the message lists each engine's numbers.
    """
    return choose({"graph": measurements}, quality_floor, batch_invariant=batch_invariant,
                  invariance_tolerance=invariance_tolerance, latency_key=latency_key, subject="engine").engine


def _numbers(entry: Mapping[str, Any]) -> str:
    """Short ``fidelity=..., batch_invariance=..., latency...`` text of one entry for error messages."""
    shown = {k: v for k, v in entry.items() if k not in ("engine", "precision", "threads")}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


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
    if entry["engine"] == OPENVINO:
        runtime["precision"] = entry["precision"]
    else:
        runtime["providers"] = ["CPUExecutionProvider"]
    return runtime


__all__ = [
    "Choice",
    "Scorer",
    "available_engines",
    "best_engine",
    "choose",
    "measure_engines",
    "measure_graphs",
    "runtime_recommendation",
]
