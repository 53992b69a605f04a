"""Numpy measurement shared by the optimizer, the server and the benchmarks: fidelity,
batch invariance and interleaved timing, on any *runner* (a callable from named feeds to the
graph's first output).

One home so that the number the optimizer records in the manifest, the number the server
probes at load and the number a benchmark prints are the same computation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Feeds = Mapping[str, np.ndarray]
#: Runs a graph's first output on named feeds.
Runner = Callable[[Feeds], np.ndarray]

#: Largest answer change (max abs, alone vs batched with others) for a graph to count as
#: batch-invariant, in the optimizer's choice and the server's facts alike (issue 10: <= 1e-4).
#: Static INT8 and fp32 keep answers fixed up to float rounding in the non-quantized ops
#: (~1e-8 measured on MiniLM): far below dynamic INT8's ~3e-2.
DEFAULT_INVARIANCE_TOLERANCE = 1e-4


# -- fidelity ------------------------------------------------------------------------------
def cosine_rows(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine of each row pair in float64, clipped to [-1, 1].

    A zero row has cosine 0 with anything; NaN stays NaN, so a broken graph never looks
    faithful. Clipping keeps rounding (1 + 1e-16 for identical rows) at 1.
    """
    a = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    b = np.asarray(want, dtype=np.float64).reshape(len(want), -1)
    if a.shape != b.shape:
        raise ValueError(f"output shape {a.shape} differs from the reference's {b.shape}")
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(axis=1) / np.where(den > 0, den, 1.0)
    return np.clip(np.where(den == 0, 0.0, cos), -1.0, 1.0)


def cosines(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> np.ndarray:
    """:func:`cosine_rows` over two lists of ``[batch, dim]`` arrays, concatenated."""
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs vs {len(want)} references")
    return np.concatenate([cosine_rows(g, w) for g, w in zip(got, want)]) if got else np.zeros(0)


def mean_cosine(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    """Mean row-wise cosine between two lists of ``[batch, dim]`` arrays (the embedding fidelity)."""
    return float(cosines(got, want).mean())


def fidelity(run: Runner, eval_feeds: Sequence[Feeds], reference_outputs: Sequence[np.ndarray]) -> float:
    """Mean cosine between ``run``'s outputs on ``eval_feeds`` and the reference outputs."""
    return mean_cosine([run(f) for f in eval_feeds], reference_outputs)


# -- batch invariance ----------------------------------------------------------------------
def split_items(feeds_list: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    """Every row of every batch as its own ``[1, length]`` feeds, trimmed to its real length."""
    items: list[dict[str, np.ndarray]] = []
    for feeds in feeds_list:
        mask = np.asarray(feeds["attention_mask"])
        for row in range(mask.shape[0]):
            length = max(1, int(mask[row].sum()))
            items.append({k: np.asarray(v)[row : row + 1, :length] for k, v in feeds.items()})
    return items


def stack_items(items: Sequence[Feeds], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad ``[1, length]`` items to the longest and stack them (mask 0 on padding)."""
    length = max(int(next(iter(i.values())).shape[1]) for i in items)
    out: dict[str, np.ndarray] = {}
    for name in items[0]:
        fill = pad_id if name == "input_ids" else 0
        rows = [np.pad(np.asarray(i[name]), ((0, 0), (0, length - i[name].shape[1])), constant_values=fill) for i in items]
        out[name] = np.concatenate(rows).astype(np.int64)
    return out


def alone_vs_batched(batched: np.ndarray, alone: Sequence[np.ndarray]) -> float:
    """Largest abs difference between each row ``i`` of ``batched`` and ``alone[i]`` (the same
    text run on its own); 0 for answers that do not depend on batch-mates."""
    worst = 0.0
    for i, row in enumerate(alone):
        worst = max(worst, float(np.abs(np.asarray(row) - np.asarray(batched[i])).max()))
    return worst


def batch_invariance(
    run: Runner, eval_feeds: Sequence[Feeds], *, probes: int = 4, batch_size: int = 8, seed: int = 0, pad_id: int = 0
) -> float:
    """Largest change of a text's output between running it alone and inside batches.

    For each probe text: alone; in a batch of identical copies; and in batches with random
    other texts of other lengths (so it is padded, and sits at a random row). Returns the max
    abs difference to the alone answer over all of them; 0 for a perfectly invariant graph.

    Raises:
        ValueError: fewer than two texts in ``eval_feeds``.
    """
    items = split_items(eval_feeds)
    if len(items) < 2:
        raise ValueError(f"batch invariance needs at least two evaluation texts, got {len(items)}")
    rng = np.random.default_rng(seed)
    lengths = np.array([i["input_ids"].shape[1] for i in items])
    # Probe the shortest texts: they get the most padding when batched with longer ones.
    order = np.argsort(lengths, kind="stable")
    worst = 0.0
    for p in order[: min(probes, len(items))]:
        probe = items[int(p)]
        alone = run(probe)[0]
        same = run(stack_items([probe] * min(batch_size, 4), pad_id))
        worst = max(worst, alone_vs_batched(same, [alone] * len(same)))
        others = [i for i in range(len(items)) if i != p and lengths[i] != lengths[p]] or [
            i for i in range(len(items)) if i != p
        ]
        for _ in range(2):
            mates = list(rng.choice(others, size=min(batch_size - 1, len(others)), replace=False))
            at = int(rng.integers(0, len(mates) + 1))
            batch = [items[int(m)] for m in mates]
            batch.insert(at, probe)
            out = run(stack_items(batch, pad_id))
            worst = max(worst, alone_vs_batched(out[at : at + 1], [alone]))
    return worst


def probe_feeds(
    input_names: Sequence[str], *, vocab_size: int = 100, texts: int = 6, max_length: int = 12, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """A small synthetic batch for :func:`batch_invariance` at load: ``texts`` random token
    sequences of different lengths (so batching pads them), ids in ``[1, vocab_size)``.

    Only ``input_names`` are produced (``token_type_ids`` zeros), so the feeds fit the graph.
    """
    if texts < 2 or max_length < 2 or vocab_size < 2:
        raise ValueError(
            f"probe needs texts >= 2, max_length >= 2 and vocab_size >= 2; got {texts}, {max_length}, {vocab_size}"
        )
    rng = np.random.default_rng(seed)
    lengths = np.linspace(2, max_length, texts).astype(int)
    ids = np.zeros((texts, max_length), np.int64)
    mask = np.zeros((texts, max_length), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, vocab_size, size=length)
        mask[row, :length] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return [{k: v for k, v in feeds.items() if k in input_names}]


# -- timing --------------------------------------------------------------------------------
def median_ms(samples: Sequence[float]) -> float:
    """Median of second samples, in milliseconds rounded to microseconds."""
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
    return {k: (median_ms(b1), median_ms(b32)) for k, (b1, b32) in samples.items()}


__all__ = [
    "DEFAULT_INVARIANCE_TOLERANCE",
    "Feeds",
    "Runner",
    "alone_vs_batched",
    "batch_invariance",
    "cosine_rows",
    "cosines",
    "fidelity",
    "interleaved_samples",
    "mean_cosine",
    "median_ms",
    "probe_feeds",
    "split_items",
    "stack_items",
    "time_interleaved",
]
