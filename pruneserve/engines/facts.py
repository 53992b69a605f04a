"""What the server knows about the engine it runs: batch invariance as measured, not assumed.

The optimizer measures batch invariance per (graph, engine, precision) and records it in
``manifest.engines[key]["batch_invariance"]`` (and, for the recommended runtime, the top-level
``manifest.batch_invariant``). :func:`batch_invariance_fact` reads the fact for the key the
server actually runs (:attr:`Engine.key`); for a key the manifest never measured it says so
and, when asked, measures it at load with a small synthetic probe through
:func:`~pruneserve.engines.measure.batch_invariance`, the same computation the optimizer ran.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pruneserve.engines.base import Engine
from pruneserve.engines.keys import ONNXRUNTIME, OPENVINO, engine_key
from pruneserve.engines.measure import DEFAULT_INVARIANCE_TOLERANCE, Feeds, batch_invariance, probe_feeds

if TYPE_CHECKING:
    from pruneserve.artifact import Manifest

logger = logging.getLogger(__name__)

#: Where a fact came from: the optimizer's measurement, a probe at load, or the fallback assumption.
FactSource = Literal["manifest", "probe", "assumed"]


@dataclass(frozen=True)
class InvarianceFact:
    """Whether answers of ``key`` are independent of batch-mates, and how that is known.

    Attributes:
        key: the engine key (``openvino-bf16``, ``onnxruntime``, ...).
        invariant: the verdict.
        source: ``manifest`` (measured by the optimizer), ``probe`` (measured at load) or
            ``assumed`` (not measured: the artifact's claim, kept only at the graph's own precision).
        max_abs_diff: the measured alone-vs-batched difference, when measured.
    """

    key: str
    invariant: bool
    source: FactSource
    max_abs_diff: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ("manifest", "probe", "assumed"):
            raise ValueError(f"fact source {self.source!r} is not manifest, probe or assumed")
        if self.source == "probe" and self.max_abs_diff is None:
            raise ValueError("a probed fact needs its measured max_abs_diff; pass the probe's result")

    def describe(self) -> str:
        """One line for logs: the verdict, the key and where it comes from."""
        verdict = "batch-invariant" if self.invariant else "not batch-invariant"
        how = {"manifest": "measured by the optimizer", "probe": "measured at load", "assumed": "not measured, assumed"}
        diff = f" (alone vs batched max abs diff {self.max_abs_diff:.1e})" if self.max_abs_diff is not None else ""
        return f"{verdict} on {self.key}, {how[self.source]}{diff}"


def recommended_key(runtime: Mapping[str, Any]) -> str:
    """The engine key of ``manifest.runtime``'s recommendation (ONNX Runtime when it names none)."""
    engine = str(runtime.get("engine") or ONNXRUNTIME)
    precision = str(runtime.get("precision") or ("f32" if engine == OPENVINO else "fp32-graph"))
    return engine_key(engine, precision)


def recorded_invariance(
    manifest: Manifest, key: str, tolerance: float = DEFAULT_INVARIANCE_TOLERANCE
) -> InvarianceFact | None:
    """The optimizer's fact for ``key``, or None when the manifest did not measure it.

    ``manifest.engines[key]["batch_invariance"]`` (max abs diff) is compared with
    ``tolerance``; without it, ``manifest.batch_invariant`` speaks for the recommended runtime's key.
    """
    entry = manifest.engines.get(key) if isinstance(manifest.engines, Mapping) else None
    diff = entry.get("batch_invariance") if isinstance(entry, Mapping) else None
    if isinstance(diff, (int, float)) and not isinstance(diff, bool) and np.isfinite(diff):
        return InvarianceFact(key, float(diff) <= tolerance, "manifest", float(diff))
    if key == recommended_key(manifest.runtime):
        return InvarianceFact(key, bool(manifest.batch_invariant), "manifest")
    return None


def probe_invariance(
    engine: Engine, input_names: Sequence[str], output: str, *, vocab_size: int = 100
) -> float:
    """Alone-vs-batched max abs diff of ``engine``'s ``output`` on a few synthetic token batches."""
    feeds = probe_feeds(input_names, vocab_size=max(2, min(vocab_size, 1000)))

    def run(f: Feeds) -> np.ndarray:
        return engine.run(f, [output])[output]

    return batch_invariance(run, feeds, probes=3, batch_size=4)


def batch_invariance_fact(
    manifest: Manifest,
    engine: Engine,
    *,
    probe: bool = False,
    vocab_size: int | None = None,
    tolerance: float = DEFAULT_INVARIANCE_TOLERANCE,
) -> InvarianceFact:
    """Whether ``engine`` serving ``manifest``'s graph answers independently of batch-mates.

    The recorded fact for :attr:`Engine.key` when the optimizer measured it; else, with
    ``probe``, a measurement at load (:func:`probe_invariance`); else the assumption the
    server made before facts were recorded: the artifact's claim, kept only when the engine
    runs the graph at its own precision. An unmeasured key is logged either way.
    """
    key = engine.key
    recorded = recorded_invariance(manifest, key, tolerance)
    if recorded is not None:
        return recorded
    measured = sorted(k for k, v in manifest.engines.items() if isinstance(v, Mapping) and "batch_invariance" in v)
    if probe:
        try:
            diff = probe_invariance(engine, manifest.inputs, manifest.output_names[0], vocab_size=vocab_size or 100)
        except Exception as exc:  # noqa: BLE001 - any engine failure: fall back to the assumption, said so
            logger.warning("model %s: batch-invariance probe on %s failed (%s); assuming instead", manifest.name, key, exc)
        else:
            fact = InvarianceFact(key, diff <= tolerance, "probe", diff)
            logger.info("model %s: the optimizer did not measure %s (measured: %s); %s",
                        manifest.name, key, measured or "none", fact.describe())
            return fact
    fact = InvarianceFact(key, bool(manifest.batch_invariant) and engine.exact, "assumed")
    logger.warning(
        "model %s runs on %s, which the optimizer did not measure (measured: %s): %s; "
        "pass --probe-invariance to measure it at load",
        manifest.name, key, measured or "none", fact.describe(),
    )
    return fact


__all__ = [
    "FactSource",
    "InvarianceFact",
    "batch_invariance_fact",
    "probe_invariance",
    "recommended_key",
    "recorded_invariance",
]
