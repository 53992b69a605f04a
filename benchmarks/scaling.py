"""Scaling benchmark: latency vs sequence length and vs batch size, original vs our artifact.

Same method as the model level (real text truncated to exact lengths, interleaved medians),
over a sweep instead of two points; plotted as ``scaling.png`` (log-log).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from benchmarks._common import (
    BenchConfig,
    default_model_dir,
    interleaved_medians,
    load_corpus,
    median,
    shaped_batch,
    write_rows,
)
from benchmarks.model import REFERENCE, Runtime, baseline_cache, baseline_models, ort_runtime, torch_runtime

logger = logging.getLogger(__name__)


def sweeps(quick: bool, max_len: int) -> tuple[list[int], list[int]]:
    """(sequence lengths at batch 1, batch sizes at 128 tokens)."""
    seqs = [32, 128, 512] if quick else [32, 64, 128, 256, 512]
    batches = [1, 8, 32] if quick else [1, 2, 4, 8, 16, 32, 64]
    return [s for s in seqs if s <= max_len], batches


def run_scaling_bench(cfg: BenchConfig, artifacts: dict[str, Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Sweep sequence length and batch size; write scaling.csv/json and scaling.png.

    Each runtime runs up to its own longest accepted sequence (the original: its position
    embeddings; an artifact: its manifest's ``max_sequence_length``).
    """
    from tokenizers import Tokenizer

    notes: list[str] = []
    model_dir = cfg.model_dir or default_model_dir()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    corpus = load_corpus()
    original_max = int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 512))
    runtimes: list[Runtime] = [torch_runtime(model_dir, cfg.threads)]
    base = baseline_models(model_dir, baseline_cache(cfg, model_dir))
    runtimes.append(ort_runtime("ort-int8-dynamic", base["ort-int8-dynamic"], cfg.threads))
    limits = {rt.name: original_max for rt in runtimes}
    if artifacts:
        label = "pruneserve-default" if "pruneserve-default" in artifacts else sorted(artifacts)[0]
        man = json.loads((artifacts[label] / "manifest.json").read_text())
        runtimes.append(ort_runtime(label, artifacts[label] / man.get("model_file", "model.onnx"), cfg.threads))
        limits[label] = min(original_max, int(man["max_sequence_length"]))
    else:
        notes.append("no artifact available: the scaling plot shows the original only")
    seqs, batches = sweeps(cfg.quick, original_max)
    for name, limit in limits.items():
        if any(s > limit for s in seqs):
            notes.append(f"`{name}` accepts at most {limit} tokens: longer points are left out for it")
    repeats = 3 if cfg.quick else 10
    rows: list[dict[str, Any]] = []
    points = [("seq", 1, s) for s in seqs] + [("batch", b, 128) for b in batches]
    for sweep, b, s in points:
        batch = shaped_batch(tok, corpus, b, s, start=300)
        calls = {rt.name: (lambda rt=rt, batch=batch: rt.run(batch)) for rt in runtimes if s <= limits[rt.name]}
        samples = interleaved_medians(calls, repeats, warmup=1)
        ref = median(samples[REFERENCE])
        for name, times in samples.items():
            ms = median(times)
            rows.append({"sweep": sweep, "runtime": name, "batch": b, "seq": s, "median_ms": ms,
                         "ms_per_text": ms / b, "speedup_vs_pytorch": ref / ms})  # fmt: skip
    write_rows(cfg.out_dir, "scaling", rows)
    plot_scaling(rows, cfg.out_dir / "scaling.png")
    return rows, notes


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> Path:
    """Two log-log panels: latency vs sequence length (batch 1) and per-text time vs batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    for name in names:
        seq = [r for r in rows if r["runtime"] == name and r["sweep"] == "seq"]
        bat = [r for r in rows if r["runtime"] == name and r["sweep"] == "batch"]
        if seq:
            ax1.plot([r["seq"] for r in seq], [r["median_ms"] for r in seq], marker="o", label=name)
        if bat:
            ax2.plot([r["batch"] for r in bat], [r["ms_per_text"] for r in bat], marker="o", label=name)
    ax1.set(xscale="log", yscale="log", xlabel="sequence length (tokens), batch 1", ylabel="median latency (ms)",
            title="latency vs sequence length")  # fmt: skip
    ax2.set(xscale="log", yscale="log", xlabel="batch size, 128 tokens", ylabel="median ms per text",
            title="cost per text vs batch size")  # fmt: skip
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
