"""Figures for the pruning report: importance heatmaps and the search's trade-off curve.

matplotlib is imported lazily with the non-interactive Agg backend, so these work on servers
without a display and importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

    from pruneserve.optimizer.importance import Importance
    from pruneserve.optimizer.search import TraceStep


def _pyplot():  # noqa: ANN202 - the matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def importance_heatmap(
    importance: Importance, path: str | Path, *, head_mask: Tensor | None = None, title: str = ""
) -> Path:
    """Write a PNG: head scores per (layer, head), removed heads crossed out; FFN scores sorted per layer."""
    plt = _pyplot()
    heads = importance.heads.numpy()
    # A few neurons dominate; a log colour scale keeps the rest visible.
    ffn = importance.ffn.sort(dim=1, descending=True).values.clamp_min(1e-12).numpy()
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
    ax_f.set_title("FFN neuron importance (log scale)")
    fig.colorbar(image, ax=ax_f, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff_curve(trace: Sequence[TraceStep], path: str | Path, *, floor: float | None = None) -> Path:
    """Write a PNG of quality vs fraction of FLOPs removed along the search (rejected steps hollow)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    accepted = [t for t in trace if t.accepted]
    ax.plot([100 * t.flops_removed for t in accepted], [t.quality.score for t in accepted], "o-", label="accepted")
    rejected = [t for t in trace if not t.accepted]
    if rejected:
        ax.plot([100 * t.flops_removed for t in rejected], [t.quality.score for t in rejected], "o",
                mfc="none", label="rejected (below floor)")
    if floor is not None:
        ax.axhline(floor, color="red", linestyle="--", label=f"floor {floor}")
    ax.set_xlabel("FLOPs removed (%)")
    ax.set_ylabel("quality on the eval split (before recovery)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
