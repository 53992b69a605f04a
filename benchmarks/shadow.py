"""Serving latency with live-quality shadowing off and on (issue 8: it must not change measurably).

The same artifact, given a ``reference.onnx`` (the unpruned fp32 export of the original model,
exactly what ``pruneserve optimize --with-reference`` ships), is served by ``pruneserve serve``
with ``--shadow-rate 0`` (off, the default), ``0.01`` (the rate the docs suggest) and ``1``
(every request; a stress case), alternating the rates over rounds so that drift on the machine
hits every rate alike. perf_analyzer measures p50/p99 and throughput at concurrency 1 and 4;
the server's own counters say how many comparisons ran and how many were dropped.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import BenchConfig, load_corpus, write_rows
from benchmarks.server import (
    LoadSettings,
    ensure_perf_analyzer,
    pick_artifact,
    run_perf_analyzer,
    scrape,
    serving,
    write_input_data,
)

logger = logging.getLogger(__name__)

RATES: tuple[float, ...] = (0.0, 0.01, 1.0)
CONCURRENCIES: tuple[int, ...] = (1, 4)
SHADOW_COUNTER = "pruneserve_shadow_comparisons_total"


def with_reference(artifact: Path, model_dir: Path | None, work: Path) -> Path:
    """``artifact`` itself if it ships a reference, else a copy with the original's fp32 export added."""
    from pruneserve.artifact import MANIFEST_NAME, REFERENCE_FILE, load_artifact, write_artifact

    art = load_artifact(artifact)
    if art.manifest.reference_file:
        return artifact
    out = work / f"{artifact.name}-with-reference"
    if out.is_dir():
        try:
            if load_artifact(out).manifest.reference_file:
                return out
        except Exception:  # noqa: BLE001 - a stale copy is rebuilt below
            pass
    from pruneserve.optimizer.adapters import load_model
    from pruneserve.optimizer.export import export_onnx

    loaded = load_model(model_dir)
    ref = export_onnx(loaded.encoder, work / "reference.onnx").path
    manifest = art.manifest
    manifest.reference_file = REFERENCE_FILE
    sources: dict[str, Any] = {name: art.file(name) for name in manifest.files if name != MANIFEST_NAME}
    sources[REFERENCE_FILE] = ref
    write_artifact(out, manifest, sources, overwrite=True)
    return out


def run_shadow_bench(
    cfg: BenchConfig, artifacts: dict[str, Path], rounds: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """p50/p99/throughput per shadow rate and concurrency (medians over rounds); writes shadow.csv/json."""
    label, artifact = pick_artifact(artifacts)
    work = cfg.out_dir / "shadow"
    work.mkdir(parents=True, exist_ok=True)
    served = with_reference(artifact, cfg.model_dir, work)
    model = json.loads((served / "manifest.json").read_text())["name"]
    input_json = write_input_data(load_corpus()[:256], work / "input_data.json")
    settings = LoadSettings.for_mode(cfg.quick)
    pa = ensure_perf_analyzer()
    rounds = rounds or (2 if cfg.quick else 3)

    samples: dict[tuple[float, int], list[dict[str, Any]]] = {}
    for r in range(rounds):
        order = RATES if r % 2 == 0 else tuple(reversed(RATES))
        for rate in order:
            with serving("pruneserve", served, model, cfg.threads, work, ("--shadow-rate", str(rate))) as srv:
                for c in CONCURRENCIES:
                    row = run_perf_analyzer(pa, srv, c, input_json, settings, work / f"rate{rate}_c{c}.csv")
                    counts = _shadow_counts(srv.metrics_port)
                    samples.setdefault((rate, c), []).append({**row, **counts})
    rows = [_summarise(rate, c, runs, label) for (rate, c), runs in sorted(samples.items())]
    _add_ratios(rows)
    write_rows(cfg.out_dir, "shadow", rows)
    notes = [
        f"Artifact `{label}` plus the original model's fp32 export as reference.onnx; "
        f"{rounds} rounds, rates alternated each round; medians over rounds.",
    ]
    return rows, notes


def _shadow_counts(metrics_port: int) -> dict[str, float]:
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {"compared": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        m = re.match(rf'^{SHADOW_COUNTER}\{{.*outcome="(\w+)".*\}}\s+(\S+)', line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
    out["requests"] = scrape(metrics_port, ["pruneserve_inferences_total"])["pruneserve_inferences_total"]
    return out


def _summarise(rate: float, c: int, runs: Sequence[dict[str, Any]], label: str) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)

    return {
        "artifact": label,
        "shadow_rate": rate,
        "concurrency": c,
        "throughput_infer_s": med("throughput_infer_s"),
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "compared": sum(r["compared"] for r in runs),
        "dropped": sum(r["dropped"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "rounds": len(runs),
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {r["concurrency"]: r for r in rows if r["shadow_rate"] == 0.0}
    for r in rows:
        b = base.get(r["concurrency"])
        r["p50_vs_off"] = r["p50_ms"] / b["p50_ms"] if b and b["p50_ms"] else float("nan")
        r["p99_vs_off"] = r["p99_ms"] / b["p99_ms"] if b and b["p99_ms"] else float("nan")
        r["throughput_vs_off"] = (
            r["throughput_infer_s"] / b["throughput_infer_s"] if b and b["throughput_infer_s"] else float("nan")
        )


def shadow_section(rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    """The BENCHMARKS.md table: each rate beside shadowing off, same run."""
    from benchmarks.tables import table

    body = table(
        ["shadow rate", "concurrency", "texts/s", "p50 ms", "p99 ms", "p50 vs off", "p99 vs off",
         "compared", "dropped"],
        [
            [f"{r['shadow_rate']:g}", str(r["concurrency"]), f"{r['throughput_infer_s']:.1f}", f"{r['p50_ms']:.2f}",
             f"{r['p99_ms']:.2f}", f"{r['p50_vs_off']:.2f}x", f"{r['p99_vs_off']:.2f}x", f"{r['compared']:.0f}",
             f"{r['dropped']:.0f}"]
            for r in rows
        ],
    )  # fmt: skip
    return body + "\n\n" + "\n".join(f"- {n}" for n in notes)
