"""Figures for the pruning report: importance heatmaps and the search's trade-off curve.

Each figure is built by a ``*_figure`` function that returns the matplotlib ``Figure`` (so a
test can read the data it shows) and written by the function that saves it. matplotlib is
imported lazily with the non-interactive Agg backend, so these work on servers without a
display and importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from pruneserve.optimizer.importance import Importance
    from pruneserve.optimizer.search import TraceStep

#: Labels of the trade-off figure's series (tests find the plotted data by them).
SEARCH_ACCEPTED = "search step, before recovery"
SEARCH_REJECTED = "rejected step, before recovery"
PRUNED_FFN = "pruned FFN neurons"


@dataclass(frozen=True)
class QualityPoint:
    """A quality measured on the final plan, drawn beside the search's path (after recovery, the artifact)."""

    label: str
    flops_removed: float  # fraction of the model's FLOPs, as :class:`TraceStep` measures it
    score: float


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ffn_sorted(ffn: np.ndarray, kept: Sequence[Sequence[int]] | None) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's FFN scores sorted high to low, and which of them were pruned (same order).

    ``kept`` holds the kept neuron indices per layer (``PruningPlan.ffn``); ``None`` marks none.
    """
    order = np.argsort(-ffn, axis=1, kind="stable")
    scores = np.take_along_axis(ffn, order, axis=1)
    pruned = np.zeros(ffn.shape, dtype=bool)
    if kept is not None:
        for layer, indices in enumerate(kept):
            pruned[layer] = True
            pruned[layer, list(indices)] = False
    return scores, np.take_along_axis(pruned, order, axis=1)


def importance_figure(
    importance: Importance, *, head_mask: Tensor | None = None, ffn_kept: Sequence[Sequence[int]] | None = None,
    title: str = "",
) -> Figure:
    """Head scores per (layer, head) with removed heads crossed out; FFN scores sorted per layer
    with the pruned neurons shaded (``ffn_kept``: the kept indices per layer)."""
    plt = _pyplot()
    heads = importance.heads.numpy()
    # A few neurons dominate; a log colour scale keeps the rest visible.
    ffn, pruned = ffn_sorted(importance.ffn.clamp_min(1e-12).numpy(), ffn_kept)
    fig, (ax_h, ax_f) = plt.subplots(1, 2, figsize=(12, 0.6 * heads.shape[0] + 2.5), width_ratios=(1, 1.3))
    image = ax_h.imshow(heads, cmap="viridis", aspect="auto")
    ax_h.set_xlabel("head")
    ax_h.set_ylabel("layer")
    ax_h.set_xticks(range(heads.shape[1]))
    ax_h.set_yticks(range(heads.shape[0]))
    ax_h.set_title(f"head importance before pruning ({importance.method}, {importance.loss})")
    fig.colorbar(image, ax=ax_h, fraction=0.046)
    if head_mask is not None:
        for layer, head in (head_mask == 0).nonzero().tolist():
            ax_h.text(head, layer, "x", ha="center", va="center", color="red", fontsize=12, fontweight="bold")
    from matplotlib.colors import LogNorm

    image = ax_f.imshow(ffn, cmap="magma", aspect="auto", interpolation="nearest", norm=LogNorm())
    ax_f.set_xlabel("FFN neurons, sorted by importance")
    ax_f.set_yticks(range(ffn.shape[0]))
    ax_f.set_title("FFN neuron importance (log scale)" + (f"; {PRUNED_FFN} shaded cyan" if ffn_kept is not None else ""))
    fig.colorbar(image, ax=ax_f, fraction=0.046)
    if ffn_kept is not None:
        from matplotlib.colors import ListedColormap

        # The pruned neurons over their scores: an opaque-enough single colour no score maps to.
        ax_f.imshow(np.ma.masked_where(~pruned, np.ones(pruned.shape)), cmap=ListedColormap(["cyan"]),
                    aspect="auto", interpolation="nearest", alpha=0.75, vmin=0, vmax=1, label=PRUNED_FFN)
        ax_f.set_yticklabels([f"{layer}: kept {int((~row).sum())}/{row.size}" for layer, row in enumerate(pruned)])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def importance_heatmap(
    importance: Importance, path: str | Path, *, head_mask: Tensor | None = None,
    ffn_kept: Sequence[Sequence[int]] | None = None, title: str = "",
) -> Path:
    """Write :func:`importance_figure` as a PNG."""
    return _save(importance_figure(importance, head_mask=head_mask, ffn_kept=ffn_kept, title=title), path)


def tradeoff_figure(
    trace: Sequence[TraceStep], *, floor: float | None = None, after: Sequence[QualityPoint] = ()
) -> Figure:
    """Quality vs fraction of FLOPs removed: the search's steps (scored before recovery, rejected
    ones hollow) and ``after``, the final plan's quality after recovery and as the artifact,
    joined to the last accepted step by a dotted line so the gain from recovery shows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    accepted = [t for t in trace if t.accepted]
    ax.plot([100 * t.flops_removed for t in accepted], [t.quality.score for t in accepted], "o-",
            label=SEARCH_ACCEPTED)
    rejected = [t for t in trace if not t.accepted]
    if rejected:
        ax.plot([100 * t.flops_removed for t in rejected], [t.quality.score for t in rejected], "o",
                mfc="none", label=SEARCH_REJECTED)
    styles = [("*", "tab:green", 14), ("D", "tab:purple", 8), ("s", "tab:brown", 8)]
    start = accepted[-1] if accepted else None
    for number, point in enumerate(after):
        marker, color, size = styles[min(number, len(styles) - 1)]
        if start is not None:
            ax.plot([100 * start.flops_removed, 100 * point.flops_removed], [start.quality.score, point.score],
                    ":", color=color, linewidth=1)
        ax.plot([100 * point.flops_removed], [point.score], marker, color=color, markersize=size,
                linestyle="none", label=f"{point.label}: {point.score:.4f}")
    if floor is not None:
        ax.axhline(floor, color="red", linestyle="--", label=f"quality floor {floor:g}")
    ax.set_xlabel("FLOPs removed (%)")
    ax.set_ylabel("quality on the held-out split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tradeoff_curve(
    trace: Sequence[TraceStep], path: str | Path, *, floor: float | None = None, after: Sequence[QualityPoint] = ()
) -> Path:
    """Write :func:`tradeoff_figure` as a PNG."""
    return _save(tradeoff_figure(trace, floor=floor, after=after), path)


def _save(fig: Figure, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
