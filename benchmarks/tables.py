"""Markdown tables for BENCHMARKS.md, each written between its own pair of markers.

Each CPU class measured has its own block of sections (see :func:`update_markdown`); a section
looks like ``<!-- bench:avx2:model:start -->`` ... ``<!-- bench:avx2:model:end -->``, and only the
sections of benchmarks that ran on this class are replaced, so ``--only server`` keeps the model
tables and a run on another CPU class keeps this one's.
Every table puts the ratios side by side and each target next to the measured ratio; where we
are behind, a sentence says so and why (computed from the same measurements).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.server import CONCURRENCIES, TARGETS, row_protocol

SECTIONS: tuple[str, ...] = ("machine", "pruning", "model", "server", "shadow", "optimizer", "scaling")


#: The heading a section gets when the harness first writes it into a CPU class's block.
TITLES: dict[str, str] = {
    "machine": "Machine and command",
    "pruning": "Pruning and recovery",
    "model": "Model level",
    "server": "Server level",
    "shadow": "Live-quality shadowing vs serving latency",
    "optimizer": "Optimizer cost",
    "scaling": "Scaling",
}


def _start(name: str) -> str:
    return f"<!-- bench:{name}:start -->"


def _end(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def _block(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(_start(name)) + r".*?" + re.escape(_end(name)), re.DOTALL)


def update_markdown(path: Path, sections: Mapping[str, str], cpu_class: str, class_title: str) -> Path:
    """Replace each named section's body in ``cpu_class``'s block of the report.

    Figures from different CPU classes are never compared, so each class has its own block,
    ``<!-- bench:<class>:start -->`` ... ``<!-- bench:<class>:end -->``, holding its sections
    (``<!-- bench:<class>:<section>:start -->`` ...). A class measured for the first time gets a
    new block at the end under ``## <class_title>``; a section it lacks is added at the end of its
    block under an ``###`` heading. Everything outside the sections (the prose) is kept.
    """
    if not re.fullmatch(r"[a-z0-9-]+", cpu_class):
        raise ValueError(f"cpu class {cpu_class!r} must be lower-case letters, digits and '-' (e.g. 'avx2')")
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    if not _block(cpu_class).search(text):
        text = text.rstrip() + f"\n\n## {class_title}\n\n{_start(cpu_class)}\n{_end(cpu_class)}\n"
    for name, body in sections.items():
        if name not in SECTIONS:
            raise ValueError(f"unknown section {name!r}; known: {SECTIONS}")
        key = f"{cpu_class}:{name}"
        block = f"{_start(key)}\n{body.rstrip()}\n{_end(key)}"
        pattern = _block(key)
        if pattern.search(text):
            text = pattern.sub(lambda _m, block=block: block, text, count=1)
        else:
            end = text.index(_end(cpu_class))
            text = text[:end] + f"### {TITLES[name]}\n\n{block}\n\n" + text[end:]
    path.write_text(text, encoding="utf-8")
    return path


def _f(v: Any, digits: int = 1) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _x(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"


def _sci(v: float) -> str:
    return "0" if v == 0 else f"{v:.0e}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def machine_section(info: Mapping[str, Any]) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in info.get("packages", {}).items())
    return "\n".join(
        [
            f"- **Machine:** {info.get('cpu')}, {info.get('cores')} cores; {info.get('os')}; "
            f"Python {info.get('python')}",
            f"- **CPU flags:** {', '.join(info.get('cpu_flags') or []) or 'unknown'} "
            f"(class `{info.get('cpu_class', 'unknown')}`)",
            f"- **Date:** {info.get('date')}",
            f"- **Packages:** {pkgs}",
            f"- **Command:** `{info.get('command')}`",
        ]
    )


def model_section(rows: Sequence[Mapping[str, Any]], ceilings: Mapping[str, Any] | None, notes: Sequence[str]) -> str:
    """One row per runtime: both shapes, ratios to PyTorch and to the ORT INT8 peer, quality, FLOPs."""
    by = {(r["runtime"], r["shape"]): r for r in rows}
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    body = []
    for n in names:
        a, b = by.get((n, "b1x32")), by.get((n, "b32x128"))
        if a is None or b is None:
            continue
        body.append(
            [
                f"`{n}`",
                _f(a["median_ms"], 2),
                _x(a["speedup_vs_pytorch"]),
                _x(a["speedup_vs_ort_int8"]),
                _f(b["median_ms"], 0),
                _f(b["texts_per_s"], 0),
                _x(b["speedup_vs_pytorch"]),
                _x(b["speedup_vs_ort_int8"]),
                f"{a['fidelity_mean']:.4f} ({a['fidelity_min']:.3f})",
                _sci(a["batch_invariance_max_abs"]),
                _f(b["gflop"], 1),
                f"{100 * b['share_int8_ceiling']:.0f}%",
            ]
        )
    parts = [
        table(
            ["runtime", "b1x32 ms", "vs PyTorch", "vs ORT INT8", "b32x128 ms", "texts/s", "vs PyTorch",
             "vs ORT INT8", "fidelity mean (min)", "alone vs batched", "GFLOP b32x128", "of int8 ceiling"],
            body,
        )  # fmt: skip
    ]
    if ceilings:
        m, k, n = ceilings["shape"]
        parts.append(
            f"\nCeilings on this machine, same run, ONNX Runtime, {ceilings['threads']} threads ({m}x{k} @ {k}x{n}): "
            f"fp32 MatMul **{ceilings['fp32_gflops']:.0f} GFLOP/s**, int8 MatMulInteger "
            f"**{ceilings['int8_gops']:.0f} GOP/s**. \"of int8 ceiling\" = the model's FLOPs / its median "
            "b32x128 time / the int8 ceiling."
        )
    parts.append(
        "\nFidelity: mean (min) cosine to the PyTorch fp32 original over real sentences from the default "
        "corpus (the optimizer's calibration domain; quality on other domains is lower, see the optimizer "
        "report). Alone vs batched: max |change| of a text's embedding computed alone vs padded in a "
        "batch of 16."
    )
    parts.append("\n" + peer_table(by, names))
    parts += _model_verdicts(by, names)
    if notes:
        parts.append("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(parts)


#: The peers each artifact is held against: (runtime, what it is). Ahead = ratio > 1.00x at equal shape.
MODEL_PEERS: tuple[tuple[str, str], ...] = (
    ("ort-int8-dynamic", "unpruned, fused + dynamic INT8 per-channel (ONNX Runtime's tools; Optimum O2 recipe)"),
    ("openvino-nncf-int8", "OpenVINO + NNCF post-training INT8 (issue 10's peer)"),
    ("pytorch-fp32", "the original in PyTorch fp32"),
)


def peer_table(by: Mapping[tuple[str, str], Mapping[str, Any]], names: Sequence[str]) -> str:
    """Each artifact's speed ratio to each peer at both shapes, beside the fidelity difference."""
    ours = [n for n in names if n.startswith("pruneserve-")]
    peers = [(p, what) for p, what in MODEL_PEERS if (p, "b1x32") in by]
    if not ours or not peers:
        return ""
    body = []
    for n in ours:
        for p, what in peers:
            cells = [f"`{n}`", f"`{p}`"]
            for shape in ("b1x32", "b32x128"):
                a, b = by.get((n, shape)), by.get((p, shape))
                cells.append("–" if a is None or b is None else _x(b["median_ms"] / a["median_ms"]))
            ratios = [by[(p, s)]["median_ms"] / by[(n, s)]["median_ms"] for s in ("b1x32", "b32x128")
                      if (n, s) in by and (p, s) in by]  # fmt: skip
            fid = by[(n, "b1x32")]["fidelity_mean"] - by[(p, "b1x32")]["fidelity_mean"]
            cells += [f"{fid:+.4f}", "> 1.00x", _verdict(all(r > 1.0 for r in ratios) if ratios else None), what]
            body.append(cells)
    headers = ["ours", "peer", "speed-up b1x32", "speed-up b32x128", "fidelity vs peer", "target", "verdict", "peer is"]
    return "Side by side (speed-up = peer's time / ours):\n\n" + table(headers, body)


def _model_verdicts(by: Mapping[tuple[str, str], Mapping[str, Any]], names: Sequence[str]) -> list[str]:
    """Plain words: for each artifact, is it ahead of the unpruned INT8 peer, and if not, why."""
    out: list[str] = []
    peer = by.get(("ort-int8-dynamic", "b32x128"))
    for n in names:
        if not n.startswith("pruneserve-"):
            continue
        for shape in ("b1x32", "b32x128"):
            r = by.get((n, shape))
            if r is None or peer is None:
                continue
            ratio = r["speedup_vs_ort_int8"]
            if ratio >= 1.0:
                continue
            pr = by[("ort-int8-dynamic", shape)]
            flops_left = r["gflop"] / pr["gflop"]
            why = (
                f"it keeps {100 * flops_left:.0f}% of the peer's FLOPs but reaches "
                f"{100 * r['share_int8_ceiling']:.0f}% of the int8 ceiling against the peer's "
                f"{100 * pr['share_int8_ceiling']:.0f}%"
            )
            if flops_left > 0.9:
                why += " (little was pruned, so there is little to gain)"
            elif r["share_int8_ceiling"] < pr["share_int8_ceiling"]:
                why += " (smaller, ragged matrices use the cores less well)"
            made = f" (artifact: {r['note']})" if r.get("note") else ""
            out.append(
                f"- **Behind:** `{n}`{made} at {shape} runs at {ratio:.2f}x the unpruned ORT INT8 peer: {why}."
            )
    if out:
        out.insert(0, "")
    return out


def _pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:.0f}%"


def pruning_section(artifacts: Mapping[str, Path]) -> str:
    """Quality after each recovery stage of every built artifact, from its ``pruning.json``.

    One row per artifact and stage: the stages are cumulative (``refit`` comes on top of the
    pruned model, ``distillation`` on top of the refit), measured by the optimizer on its
    held-out split.
    """
    body: list[list[str]] = []
    for label, path in sorted(artifacts.items()):
        record_path = Path(path) / "pruning.json"
        if not record_path.is_file():
            continue
        rec = json.loads(record_path.read_text())
        heads, ffn = rec.get("heads_per_layer", []), rec.get("ffn_per_layer", [])
        flops = rec.get("flops", {})
        removed = 1 - flops["after"] / flops["before"] if flops.get("before") else float("nan")
        recovery = rec.get("config", {}).get("recovery", {})
        for stage in rec.get("quality", {}).get("stages", []):
            q = stage["quality"]
            method = stage["method"]
            if method == "distillation":
                method = (f"+ distillation ({recovery.get('distill_steps')} steps, "
                          f"{recovery.get('lr_schedule', 'constant')} rate from {float(recovery.get('lr', 'nan')):.1e})")
            elif method != "pruned":
                method = f"+ {method.replace('_', ' ')}"
            body.append([
                f"`{label}`", "/".join(map(str, heads)), str(sum(ffn)), _pct(removed), method,
                f"{q['mean_cosine']:.4f} ({q['min_cosine']:.3f})", _f(float(stage.get("seconds", 0.0)), 1),
            ])  # fmt: skip
    if not body:
        return "_No artifact with a pruning record was built in this run._"
    headers = ["artifact", "heads per layer", "FFN neurons", "FLOPs removed (128 tokens)", "stage",
               "held-out mean (min) cosine", "stage seconds"]  # fmt: skip
    return table(headers, body) + (
        "\n\nFrom each artifact's `pruning.json`, written by the `pruneserve optimize --preset ...` builds of "
        "this run; stages are cumulative, quality is the mean (min) cosine to the original model on the "
        "optimizer's 500 held-out sentences (never used for scoring, recovery or calibration)."
    )


def server_section(rows: Sequence[Mapping[str, Any]], notes: Sequence[str]) -> str:
    """Throughput/latency per server, protocol and concurrency, then each target beside the measured ratio."""
    body = [
        [
            r["server"], r.get("protocol") or "–", str(r["concurrency"]), _f(r["throughput_infer_s"], 1),
            _f(r["p50_ms"], 2), _f(r["p99_ms"], 2), _f(r.get("mean_batch_size"), 2), _pct(r["vs_inprocess"]),
            _x(r["vs_triton"]), _x(r["p99_vs_triton"]), _x(r.get("vs_grpc", math.nan)),
            _x(r.get("p99_vs_grpc", math.nan)), "yes" if r.get("stable") else "no",
        ]
        for r in rows
    ]  # fmt: skip
    headers = ["server", "protocol", "concurrency", "texts/s", "p50 ms", "p99 ms", "mean batch", "of in-process",
               "vs Triton", "p99 vs Triton", "vs own gRPC", "p99 vs own gRPC", "stable"]  # fmt: skip
    parts = [table(headers, body)]
    if rows:
        r0 = rows[0]
        parts.append(
            f"\nArtifact `{r0.get('artifact')}`; every server: {r0.get('threads')} ONNX Runtime threads, max batch "
            f"{r0.get('max_batch_size')}, max queue delay {r0.get('max_queue_delay_ms')} ms, 127.0.0.1. Load: "
            "perf_analyzer (tritonclient 2.50.0 wheel) over gRPC (`-i grpc`) and KServe v2 HTTP/REST (`-i http`, "
            "binary tensors), one real sentence per request; every server stays up through the run and, at each "
            "concurrency, every (server, protocol) load runs back to back in a rotating order, so the ratios compare "
            "one moment's machine. `vs Triton` compares with Triton over the same protocol; `vs own gRPC` an HTTP "
            "row with the same server over gRPC. Mean batch = the server's own counters (inferences / executions). "
            "In-process = the same texts in full batches of `concurrency`, tokenized and run straight through ONNX "
            "Runtime (the median of its measurements, one before every load). `pruneserve` runs with `--engine "
            "onnxruntime`, so it, Triton and the in-process ceiling time the same ONNX Runtime session and the "
            "targets compare servers, not engines; a `pruneserve-<engine>` row is the server on the engine the "
            "artifact's manifest recommends (as `serve` runs it by default), for information. `stable` = "
            "perf_analyzer's stability check passed (quick runs skip it)."
        )
    parts.append("\n" + targets_table(rows))
    if notes:
        parts.append("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(parts)


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**behind**")


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Issue 4's three targets for pruneserve, over each protocol measured, beside the measured value and a verdict.

    The targets were set over gRPC; over HTTP they are held to the same bar against Triton's own
    HTTP endpoint, so a slower transport of ours shows as behind rather than hiding in the table.
    """
    nan = float("nan")
    by = {(r["server"], row_protocol(r), r["concurrency"]): r for r in rows}
    protocols = [p for p in ("grpc", "http") if any(k[0] == "pruneserve" and k[1] == p for k in by)] or ["grpc"]
    hi, lo = max(CONCURRENCIES), min(CONCURRENCIES)
    body = []
    for protocol in protocols:
        ps_hi, ps_lo = by.get(("pruneserve", protocol, hi), {}), by.get(("pruneserve", protocol, lo), {})
        share = ps_hi.get("vs_inprocess", nan)
        speed, p99 = ps_hi.get("vs_triton", nan), ps_hi.get("p99_vs_triton", nan)
        gap = ps_lo.get("p50_over_inprocess_ms", nan)
        name = "gRPC" if protocol == "grpc" else "HTTP"
        body += [
            [
                f"{name}: throughput at c={hi} vs in-process",
                f">= {TARGETS['vs_inprocess_c16']:.0%}",
                _pct(share),
                _verdict(None if math.isnan(share) else share >= TARGETS["vs_inprocess_c16"]),
            ],
            [
                f"{name}: throughput at c={hi} vs Triton ({name}), with a lower p99",
                f">= {TARGETS['vs_triton_c16']:.1f}x, p99 < 1.00x",
                f"{_x(speed)}, p99 {_x(p99)}",
                _verdict(None if math.isnan(speed) else speed >= TARGETS["vs_triton_c16"] and p99 < 1.0),
            ],
            [
                f"{name}: p50 at c={lo} over in-process",
                f"<= {TARGETS['p50_over_inprocess_c1_ms']:.0f} ms",
                "–" if math.isnan(gap) else f"{gap:+.2f} ms",
                _verdict(None if math.isnan(gap) else gap <= TARGETS["p50_over_inprocess_c1_ms"]),
            ],
        ]
    return "Targets (issue 4, per protocol):\n\n" + table(["target", "required", "measured", "verdict"], body)


def optimizer_section(rows: Sequence[Mapping[str, Any]], notes: Sequence[str]) -> str:
    body = [[r["stage"], _f(r["seconds"], 1), _f(r.get("peak_rss_mb") or None, 0)] for r in rows]
    parts = [table(["stage", "seconds", "peak RSS MiB"], body)]
    if rows:
        parts.append(
            f"\nCommand: `{rows[0].get('command')}` on the default model (all-MiniLM-L6-v2). Total: wall time "
            "and peak RSS of the whole process tree, sampled every 100 ms by the harness; stages: the "
            "pipeline's own records in the manifest (`pruning.stages`; the final write is not among them)."
        )
    if notes:
        parts.append("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(parts)


def scaling_section(rows: Sequence[Mapping[str, Any]], png: str, notes: Sequence[str]) -> str:
    names = list(dict.fromkeys(r["runtime"] for r in rows))
    points = list(dict.fromkeys((r["sweep"], r["batch"], r["seq"]) for r in rows))
    by = {(r["runtime"], r["sweep"], r["batch"], r["seq"]): r for r in rows}
    body = []
    for sweep, b, s in points:
        cells = [f"{'length' if sweep == 'seq' else 'batch'} sweep: b{b}x{s}"]
        for n in names:
            r = by.get((n, sweep, b, s))
            cells.append("–" if r is None else f"{r['median_ms']:.1f} ({_x(r['speedup_vs_pytorch'])})")
        body.append(cells)
    parts = [
        f"![latency vs sequence length and batch size]({png})",
        "",
        "Median ms (speed-up vs PyTorch fp32):",
        "",
        table(["shape", *[f"`{n}`" for n in names]], body),
    ]
    if notes:
        parts.append("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n".join(parts)
