"""The artifact's human-readable report: ``report.md`` plus PNG figures.

The report says what was done (pruning plan, recovery, fusion, quantization), how close the
result stays to the original model at every stage and on which data that was measured, how
fast it is against the baselines, and how large. Quality holds on the domain of the
calibration data; the report says so, because that was the largest effect measured
(~0.07 mean cosine between in-domain and other-domain text for the same pruned model).

Speed is stated for the artifact as it will be served: on the engine and precision in
``manifest.runtime`` (OpenVINO bf16, say), against the original model, in one headline
(:func:`headline`) that both ``report.md`` and the terminal summary open with.

Figures: head and FFN-neuron importance with the pruned ones marked, the quality-vs-compute
trade-off the search walked with the quality after recovery beside it, and latency per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneserve.engines.keys import OPENVINO

if TYPE_CHECKING:
    from torch import Tensor

    from pruneserve.artifact import Manifest
    from pruneserve.optimizer.pipeline import StageRecord
    from pruneserve.optimizer.plots import QualityPoint
    from pruneserve.optimizer.pruner import PruneResult
    from pruneserve.optimizer.quantize import QuantizeResult
    from pruneserve.optimizer.validate import Latency, ValidationReport

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
IMPORTANCE_PNG = "importance.png"
TRADEOFF_PNG = "tradeoff.png"
LATENCY_PNG = "latency.png"


def latency_chart(latency: Mapping[str, Latency], path: str | Path) -> Path:
    """Write a PNG: median latency per stage/runtime, one panel per input shape."""
    from pruneserve.optimizer.plots import _pyplot

    plt = _pyplot()
    shapes = list(next(iter(latency.values())).median_ms) if latency else []
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(5.5 * max(1, len(shapes)), 0.45 * len(latency) + 2))
    axes = list(axes) if len(shapes) > 1 else [axes]
    from pruneserve.optimizer.validate import served_row

    names = list(latency)
    served = served_row(names)
    for ax, shape in zip(axes, shapes):
        values = [latency[n].median_ms.get(shape, 0.0) for n in names]
        colors = ["tab:green" if n == served else "tab:olive" if n.startswith("artifact") else "tab:gray"
                  for n in names]
        ax.barh(range(len(names)), values, color=colors)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([_row_label(n, served) for n in names])
        ax.invert_yaxis()
        ax.set_xlabel("median latency (ms)")
        ax.set_title(shape)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _quality_rows(validation: ValidationReport) -> list[str]:
    final = validation.final_quality
    if final.task == "embedding":
        rows = ["| stage | score | mean cosine | min cosine |", "|---|---|---|---|"]
        rows += [f"| {stage} | {_fmt(q.score)} | {_fmt(q.mean_cosine)} | {_fmt(q.min_cosine)} |"
                 for stage, q in validation.quality.items()]
        return rows
    if final.accuracy is None:
        # Without labels there is no accuracy: what is measured is agreement, and it is named so.
        rows = ["| stage | score | agreement with the original's predictions |", "|---|---|---|"]
        rows += [f"| {stage} | {_fmt(q.score)} | {_fmt(q.agreement)} |" for stage, q in validation.quality.items()]
        return [*rows, "", "The data has no labels: the score is the agreement with the original model's "
                "predictions (no accuracy can be measured without labels)."]
    rows = ["| stage | score | accuracy on the labels | agreement with original |", "|---|---|---|---|"]
    rows += [f"| {stage} | {_fmt(q.score)} | {_fmt(q.accuracy)} | {_fmt(q.agreement)} |"
             for stage, q in validation.quality.items()]
    return rows


def _served_quality_lines(manifest: Manifest) -> list[str]:
    quality, on_engine = served_quality(manifest)
    if on_engine is None or quality is None:
        return []
    return [f"The stages above ran on ONNX Runtime; served on **{on_engine}**, the artifact's quality on the same "
            f"held-out examples is **{quality:.4f}** (measured by the engines stage).", ""]


def _row_label(name: str, served: str | None) -> str:
    """A latency row's name as the report shows it: the served row says so, the other artifact row too."""
    if name == served:
        return f"{name} (served)"
    if name.startswith("artifact"):
        return f"{name} on onnxruntime (not served)" if name == "artifact" else f"{name} (not served)"
    return name


def _latencies(manifest: Manifest) -> dict[str, Latency]:
    from pruneserve.optimizer.validate import Latency

    rows: Mapping[str, Any] = manifest.latency.get("median_ms") or {}
    return {name: Latency(**row) for name, row in rows.items()}


def served_as(manifest: Manifest) -> str:
    """The quantization, engine and precision the artifact is served with, in words."""
    runtime: Mapping[str, Any] = manifest.runtime or {}
    mode = (manifest.quantization or {}).get("mode")
    if runtime.get("engine") == OPENVINO:
        engine = f"OpenVINO {runtime.get('precision', 'f32')}"
    else:
        providers = runtime.get("providers") or ["CPUExecutionProvider"]
        engine = f"ONNX Runtime {providers[0]}"
    return f"{_MODE_WORDS.get(mode, mode)} on {engine}" if mode else engine


_MODE_WORDS = {"dynamic": "dynamic INT8", "static": "static INT8", "none": "fp32", "fp16": "fp16"}


def headline(manifest: Manifest) -> str:
    """One sentence: the artifact's latency as served against the original model's, and its quality."""
    from pruneserve.optimizer.validate import ORIGINAL, served_row, speedups

    latency = _latencies(manifest)
    served = served_row(latency)
    quality, on_engine = served_quality(manifest)
    floor = f" (floor {manifest.quality_floor:g})" if manifest.quality_floor is not None else ""
    where = f" on {on_engine}" if on_engine else ""
    tail = f"; quality {quality:.4f}{where}{floor}" if quality is not None else ""
    if served is None:
        return f"As served ({served_as(manifest)}): latency not measured{tail}."
    lat = latency[served]
    timed = "" if served != "artifact" or _same_provider(manifest, lat.provider) else (
        f", timed here on {lat.provider} (the target's provider is not on this machine)")
    text = f"As served ({served_as(manifest)}{timed}): " + ", ".join(
        f"{k} {v:.2f} ms" for k, v in lat.median_ms.items())
    if ORIGINAL not in latency:
        return text + f"; no baseline timed (validate.baselines is off){tail}."
    ups = speedups(latency, served).get(ORIGINAL, {})
    versus = ", ".join(
        f"{k} {ups[k]:.2f}x" if k in ups else f"{k} not credible (see the warnings)" for k in lat.median_ms
        if k in latency[ORIGINAL].median_ms)
    return text + f"; speed-up vs the {ORIGINAL}: {versus}{tail}."


def served_quality(manifest: Manifest) -> tuple[float | None, str | None]:
    """The artifact's held-out quality as served, and the engine it was measured on when that is
    not ONNX Runtime (whose figure is the quality table's last stage)."""
    runtime: Mapping[str, Any] = manifest.runtime or {}
    if runtime.get("engine") == OPENVINO:
        precision = runtime.get("precision", "f32")
        fidelity = (manifest.engines or {}).get(f"openvino-{precision}", {}).get("fidelity")
        if isinstance(fidelity, (int, float)):
            return float(fidelity), f"OpenVINO {precision}"
    score = (manifest.quality or {}).get("final", {}).get("score")
    return (float(score) if isinstance(score, (int, float)) else None), None


def _same_provider(manifest: Manifest, provider: str) -> bool:
    providers = (manifest.runtime or {}).get("providers") or ["CPUExecutionProvider"]
    return providers[0] == provider


def _latency_rows(validation: ValidationReport, speedups: Mapping[str, Mapping[str, float]]) -> list[str]:
    from pruneserve.optimizer.validate import served_row

    served = served_row(validation.latency)
    if served is None:
        return ["No latency was measured."]
    shapes = list(validation.latency[served].median_ms)
    header = "| runtime | provider / precision | " + " | ".join(f"{s} ms" for s in shapes) + " | " + \
        " | ".join(f"served artifact's speed-up {s}" for s in shapes) + " |"
    rows = [header, "|" + "---|" * (2 + 2 * len(shapes))]
    for name, lat in validation.latency.items():
        ups = speedups.get(name, {})
        cells = [f"{lat.median_ms.get(s, float('nan')):.2f}" for s in shapes]
        up_cells = ["–" if name.startswith("artifact") else (f"{ups[s]:.2f}x" if s in ups else "–") for s in shapes]
        label = _row_label(name, served)
        if name == served:
            label, cells = f"**{label}**", [f"**{c}**" for c in cells]
        rows.append(f"| {label} | {lat.provider} | " + " | ".join(cells) + " | " + " | ".join(up_cells) + " |")
    return rows


def _ms(entry: Mapping[str, Any], key: str | None) -> str:
    value = entry.get(key) if key else None
    return f"{value:.2f}" if isinstance(value, (int, float)) else "–"


def _selection_lines(manifest: Manifest) -> list[str]:
    """The quantization/engine choice: every candidate on every engine, its numbers and verdict."""
    selection: Mapping[str, Any] = manifest.quantization.get("selection") or {}
    if not selection:
        return []
    lines = ["## Quantization and engine choice", "", f"How: {selection.get('by')}."]
    if not selection.get("measured"):
        invariance = selection.get("batch_invariance_onnxruntime_cpu")
        lines += ["", "Batch invariance on ONNX Runtime's CPU provider: "
                  + (f"{invariance:.1e}" if isinstance(invariance, (int, float)) else "not measured") + ".", ""]
        return lines
    chosen = selection.get("chosen", {})
    lines += [
        "",
        f"Quality floor {selection.get('quality_floor') or 'none'}; batch invariance required: "
        f"{'yes' if selection.get('batch_invariance_required') else 'no'} (max abs difference alone vs batched "
        f"<= {selection.get('invariance_tolerance'):g}); fastest by `{selection.get('latency_key')}`; "
        f"{selection.get('threads')} threads, {selection.get('rounds')} rounds interleaved over every pair, "
        "quality on the held-out split. "
        f"**Chosen: {chosen.get('quantization')} on {chosen.get('engine')}** "
        f"(`pruneserve serve --engine auto` follows `manifest.runtime`: {manifest.runtime.get('engine')}).",
        "",
    ]
    shapes: list[str] = []
    for cand in selection.get("candidates", {}).values():
        for entry in cand.get("engines", {}).values():
            shapes += [k for k in entry if k.startswith("latency_b") and k.endswith("_ms") and k not in shapes]
    header = "| candidate | engine | quality | batch invariance | " + " | ".join(
        s[len("latency_"):-len("_ms")] + " ms" for s in shapes) + " | verdict |"
    lines += [header, "|" + "---|" * (5 + len(shapes))]
    for mode, cand in selection.get("candidates", {}).items():
        if "error" in cand:
            lines.append(f"| {mode} | – | – | – | " + " | ".join("–" for _ in shapes) + f" | {cand['why']} |")
            continue
        for key, entry in cand.get("engines", {}).items():
            verdict = cand.get("verdicts", {}).get(key, entry.get("error", ""))
            if "error" in entry:
                verdict = f"cannot run: {entry['error'][:160]}"
            fid, inv = entry.get("fidelity"), entry.get("batch_invariance")
            lines.append(
                f"| {mode} | {key} | {_fmt(fid)} | {'–' if inv is None else f'{inv:.1e}'} | "
                + " | ".join(_ms(entry, s) for s in shapes) + f" | {verdict} |"
            )
    lines.append("")
    return lines


def render_markdown(
    manifest: Manifest,
    pruned: PruneResult,
    quantized: QuantizeResult,
    validation: ValidationReport,
    stages: Sequence[StageRecord],
    sizes: Mapping[str, int],
    figures: Sequence[str],
) -> str:
    """The text of ``report.md``."""
    from pruneserve.optimizer.validate import served_row, speedup_outliers
    from pruneserve.optimizer.validate import speedups as compute_speedups

    p = manifest.pruning
    heads_orig = p["heads_original_per_layer"]
    kept = p["kept_heads_per_layer"]
    total_heads = heads_orig * len(kept)
    speedups = compute_speedups(validation.latency)
    outliers = speedup_outliers(validation.latency)
    for note in outliers:
        logger.warning("report: %s", note)
    served = served_row(validation.latency)
    lines = [
        f"# {manifest.name}: optimization report",
        "",
        f"**{headline(manifest)}**",
        "",
        f"Source: `{manifest.source.get('path')}` (weights sha256 `{str(manifest.source.get('sha256'))[:16]}…`), "
        f"task **{manifest.task}**, target **{manifest.target}** "
        f"(providers used here: {', '.join(validation.providers_used)}).",
        "",
        "## What was done",
        "",
        f"- **Pruned** {total_heads - sum(kept)} of {total_heads} attention heads "
        f"(kept per layer: {kept}) and FFN neurons to {p['ffn_sizes_per_layer']} per layer "
        f"(of {p['ffn_size_original']}).",
        f"- Parameters {p['params']['before']:,} -> {p['params']['after']:,}; FLOPs at {p['flops']['seq_len']} tokens "
        f"{p['flops']['before'] / 1e9:.2f} G -> {p['flops']['after'] / 1e9:.2f} G "
        f"({100 * (1 - p['flops']['after'] / max(p['flops']['before'], 1)):.0f}% removed).",
        "- **Recovered** with: " + ", ".join(f"{r['method']} ({r['seconds']:.0f} s)" for r in p["recovery"][1:])
        if len(p["recovery"]) > 1 else "- **No recovery** was run.",
        f"- **Exported** to ONNX opset {manifest.opset}; fp32 graph vs pruned PyTorch max abs diff "
        f"{validation.parity_max_abs_diff:.2g}.",
        "- **Fused** with ONNX Runtime's transformer optimizer: "
        + ", ".join(f"{k} {v}" for k, v in manifest.fusion.get("counts", {}).items() if v) + ".",
        f"- **Quantized**: {quantized.mode}" + (", per-channel weights" if quantized.per_channel else "")
        + (f", calibrated on {quantized.calibration_size} texts" if quantized.calibration_size else "")
        + (f", kept in float: {quantized.excluded_nodes}" if quantized.excluded_nodes else "") + ".",
        f"- **Batch-invariant**: {'yes' if manifest.batch_invariant else 'no'}"
        + ("" if manifest.batch_invariant else
           " (dynamic INT8 takes activation scales over the whole padded batch, so an answer moves slightly "
           "with its batch-mates)") + ".",
        "",
        "## Quality against the original model",
        "",
        f"Measured on **{validation.quality_examples} held-out examples** from **{validation.quality_data}** "
        "(never used for scoring, recovery or calibration). Floor: "
        f"{_fmt(validation.quality_floor)}.",
        "",
        *_quality_rows(validation),
        "",
        *_served_quality_lines(manifest),
        "Quality holds on text like the calibration data. On other kinds of text it can be clearly lower "
        "(measured on MiniLM: ~0.07 mean cosine lower on general English after calibrating on Python docs). "
        "Calibrate with a sample of your own traffic (`--data`).",
        "",
        "## Speed",
        "",
        f"Median latency on this machine ({manifest.latency.get('threads')} threads, synthetic full-length inputs, "
        "ONNX Runtime's threads spinning inside a run only, as `pruneserve serve` runs them). "
        f"The artifact is served as {served_as(manifest)}; its row is **{served}**"
        + (" (timed by the engines stage, interleaved with the other candidates)" if served != "artifact" else "")
        + ", and every speed-up is a baseline's median over that row's.",
        "",
        *_latency_rows(validation, speedups),
        "",
        *_selection_lines(manifest),
        "## Sizes",
        "",
        "| file | bytes |",
        "|---|---|",
        *[f"| {name} | {size:,} |" for name, size in sizes.items()],
        "",
        "## Stages",
        "",
        "| stage | seconds | peak RSS (MB) |",
        "|---|---|---|",
        *[f"| {s.name} | {s.seconds:.1f} | {s.peak_rss_mb:.0f} |" for s in stages],
        "",
    ]
    warnings = [*validation.warnings, *outliers]
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    if figures:
        lines += ["## Figures", "", *[f"![{Path(f).stem}]({f})" for f in figures], ""]
    return "\n".join(lines)


def write_report(
    folder: Path,
    manifest: Manifest,
    pruned: PruneResult,
    quantized: QuantizeResult,
    validation: ValidationReport,
    stages: Sequence[StageRecord],
    *,
    head_mask: Tensor | None = None,
    floor: float | None = None,
    extra_sizes: Mapping[str, int] | None = None,
) -> dict[str, Path]:
    """Write ``report.md`` and the figures into ``folder``; returns artifact name -> path."""
    from pruneserve.optimizer import plots

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files[IMPORTANCE_PNG] = plots.importance_heatmap(
        pruned.importance, folder / IMPORTANCE_PNG, head_mask=head_mask, ffn_kept=pruned.plan.ffn, title=manifest.name
    )
    if pruned.trace:
        files[TRADEOFF_PNG] = plots.tradeoff_curve(
            pruned.trace, folder / TRADEOFF_PNG, floor=floor, after=final_quality_points(pruned, validation))
    files[LATENCY_PNG] = latency_chart(validation.latency, folder / LATENCY_PNG)
    sizes: dict[str, int] = {"model.onnx": quantized.path.stat().st_size, **(extra_sizes or {})}
    text = render_markdown(manifest, pruned, quantized, validation, stages, sizes, list(files))
    (folder / REPORT_FILE).write_text(text, encoding="utf-8")
    files[REPORT_FILE] = folder / REPORT_FILE
    logger.info("report: wrote %s", ", ".join(files))
    return files


def final_quality_points(pruned: PruneResult, validation: ValidationReport | None = None) -> list[QualityPoint]:
    """The final plan's quality after recovery (when recovery ran) and, given ``validation``, as
    the shipped artifact, at the FLOPs it removes: what the trade-off figure shows beside the
    search's steps, which were scored before recovery (``pruneserve prune`` passes no validation)."""
    from pruneserve.optimizer.plots import QualityPoint

    removed = 1.0 - pruned.flops_after / max(pruned.flops_before, 1)
    points = []
    if len(pruned.recovery) > 1:
        points.append(QualityPoint("after recovery", removed, pruned.quality.score))
    if validation is not None:
        points.append(QualityPoint(f"artifact ({list(validation.quality)[-1]})", removed,
                                   validation.final_quality.score))
    return points


def summary_lines(manifest: Manifest) -> list[str]:
    """A few lines for the terminal after ``optimize`` finishes: the headline first."""
    from pruneserve.optimizer.validate import ORIGINAL, served_row, speedup_outliers, speedups

    q: dict[str, Any] = manifest.quality
    lines = [headline(manifest), f"quality ({q.get('data')}): " + ", ".join(
        f"{k} {v.get('score', float('nan')):.4f}" for k, v in q.get("stages", {}).items())]
    latency = _latencies(manifest)
    served = served_row(latency)
    names = [n for n in (ORIGINAL, "original fused INT8", served) if n is not None and n in latency]
    width = max((len(_row_label(n, served)) for n in names), default=0) + 2
    for name in names:
        lines.append(f"{_row_label(name, served):<{width}}"
                     + "  ".join(f"{k} {v:.2f} ms" for k, v in latency[name].median_ms.items()))
    # Recomputed from the medians, against the served row (a manifest's own block may predate that).
    for name, ups in speedups(latency, served).items():
        if ups:
            lines.append(f"speed-up vs {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ups.items()))
    lines += [f"warning: {note}" for note in speedup_outliers(latency, served)]
    selection: dict[str, Any] = manifest.quantization.get("selection") or {}
    chosen = selection.get("chosen") or {}
    if chosen:
        others = [f"{mode}: {cand.get('why')}" for mode, cand in selection.get("candidates", {}).items()
                  if not cand.get("chosen")]
        lines.append(f"chosen: quantization {chosen.get('quantization')} on engine {chosen.get('engine')} "
                     f"(batch-invariant: {'yes' if manifest.batch_invariant else 'no'}); serve --engine auto uses "
                     f"{manifest.runtime.get('engine')}")
        lines += [f"  not chosen: {line[:300]}" for line in others]
    return lines
