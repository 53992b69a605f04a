"""Where a request's time goes, side by side: pruneserve variants, Triton and the in-process ceiling.

``python -m benchmarks.server_latency [--rounds 3] [--seconds 2] [--concurrency 1,16] [--variant NAME=ARGS] [--floors] [--baseline REV] [--ceiling-pause-ms MS]``
``python -m benchmarks.server_latency --stages`` (one request's stages in the data plane, no gRPC)

The harness's server benchmark (``benchmarks/server.py``) measures one server after the other;
on a machine shared with other jobs the load moves between them. Here every server is started
once and stays up (idle servers cost nothing measurable), and the perf_analyzer runs are
interleaved: each round measures every server and the in-process ceiling at each concurrency,
in a rotating order, and the figures are medians over rounds. Each round records the load
average, so a round taken under a different load can be seen.

Besides perf_analyzer's throughput and latency percentiles it records:

* the CPU time perf_analyzer itself used per request (``getrusage`` of the child), to show how
  much of the two shared cores the client takes;
* the CPU time each server's process group used per request (``/proc/PID/stat`` of every
  process in the group: Triton's ``tritonserver`` and Python stub included);
* for pruneserve, its own histograms per request: arrival-to-answer in the data plane, queue
  wait, and compute per batch; the gap between perf_analyzer's latency and the data plane's is
  the transport and the client (gRPC in both processes, protobuf, the loopback).

Servers get the same flags as in ``benchmarks/server.py`` (threads, max batch, queue delay);
a variant adds pruneserve flags (e.g. ``queue-delay=--no-dispatch-when-idle``), a Triton variant
``triton_peer.py`` flags (e.g. ``triton-spin=--intra-op-spinning always``). Results go
to ``benchmarks/results/server_latency.json`` (or ``--out``) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks._common import DEFAULT_RESULTS, load_corpus
from benchmarks.floor_server import FLOORS
from benchmarks.server import (
    SPINNING,
    LoadSettings,
    ServerProcess,
    _parse_pa_csv,
    checkout_baseline,
    ensure_perf_analyzer,
    inprocess_ceiling,
    scrape,
    serving,
    write_input_data,
)

logger = logging.getLogger("benchmarks.server_latency")

#: pruneserve's per-request histograms (sums and counts) scraped around each load.
HISTOGRAMS = (
    "pruneserve_request_duration_seconds",
    "pruneserve_queue_duration_seconds",
    "pruneserve_compute_duration_seconds",
)
COUNTERS = ("pruneserve_inferences_total", "pruneserve_executions_total")


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[2] is pgrp; fields[11], fields[12] are utime, stime (stat fields 14 and 15).
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def uptime() -> str:
    """The load averages, as ``uptime`` prints them."""
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10, check=False).stdout.strip()


def measure(
    pa: Path, server: ServerProcess, concurrency: int, input_json: Path, settings: LoadSettings, csv_out: Path
) -> dict[str, Any]:
    """One perf_analyzer load against ``server``, with the client's and the server's CPU per request."""
    cmd = [
        str(pa), "-m", server.model, "-i", "grpc", "-u", f"127.0.0.1:{server.grpc_port}",
        "--input-data", str(input_json), "--concurrency-range", str(concurrency),
        "-p", str(settings.interval_ms), "-r", str(settings.max_trials), "-s", str(settings.stability_pct),
        "--percentile=99", "-f", str(csv_out),
    ]  # fmt: skip
    names = [f"{h}_{s}" for h in HISTOGRAMS for s in ("sum", "count")] + list(COUNTERS)
    names += ["nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success"]
    pgid = os.getpgid(server.proc.pid)
    before, cpu0 = scrape(server.metrics_port, names), group_cpu_seconds(pgid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.timeout_s, check=False)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after, cpu1 = scrape(server.metrics_port, names), group_cpu_seconds(pgid)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed on {server.kind}: {(proc.stdout + proc.stderr)[-600:]}")
    row = _parse_pa_csv(csv_out)
    d = {n: after[n] - before[n] for n in names}
    requests = d["pruneserve_request_duration_seconds_count"] or d["nv_inference_request_success"]
    items, runs = (d[COUNTERS[0]], d[COUNTERS[1]]) if server.kind == "pruneserve" else (
        d["nv_inference_count"], d["nv_inference_exec_count"])  # fmt: skip
    row["mean_batch_size"] = items / runs if runs else float("nan")
    row["requests"] = requests
    row["server_cpu_ms_per_request"] = 1e3 * (cpu1 - cpu0) / requests if requests else float("nan")
    client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # perf_analyzer also sends warm-up and between-window requests the server counted too.
    row["client_cpu_ms_per_request"] = 1e3 * client_cpu / requests if requests else float("nan")
    if server.kind == "pruneserve":
        for h in HISTOGRAMS:
            n = d[f"{h}_count"]
            short = h.removeprefix("pruneserve_").removesuffix("_duration_seconds")
            row[f"dp_{short}_ms"] = 1e3 * d[f"{h}_sum"] / n if n else float("nan")
    row["command"] = " ".join(cmd)
    return row


def _median_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        out[key] = statistics.median(values) if len(values) == len(rows) else rows[-1][key]
    out["rounds"] = len(rows)
    return out


def run(
    artifact: Path,
    threads: int,
    variants: dict[str, list[str]],
    concurrencies: Sequence[int],
    rounds: int,
    seconds: float,
    out: Path,
    triton: bool = True,
    triton_variants: dict[str, list[str]] | None = None,
    ceiling_spinning: Sequence[str] = (SPINNING,),
    floors: Sequence[str] = (),
    baseline: str | None = None,
    ceiling_pause_ms: float = 0.0,
) -> dict[str, Any]:
    """Start every server, interleave the loads for ``rounds`` rounds; returns (and writes) the results.

    ``floors`` ('engine', 'transport') add pruneserve with that part taken away
    (``floor_server.py``), as rows ``floor-engine`` and ``floor-transport``. ``baseline`` (a
    git revision) adds pruneserve as of that commit, row ``baseline``, and its engine floor when
    floors are on (``baseline-floor-engine``): a code change measured side by side.
    ``ceiling_pause_ms`` adds an in-process row that pauses between batches
    (``in-process-pause``): the engine after an idle gap, as a server's is at low load.
    """
    manifest = json.loads((artifact / "manifest.json").read_text())
    model = manifest["name"]
    work = Path(tempfile.mkdtemp(prefix="server_latency_"))  # logs, perf_analyzer CSVs, input JSON
    work.mkdir(parents=True, exist_ok=True)
    texts = load_corpus()[:256]
    input_json = write_input_data(texts, work / "input_data.json")
    settings = LoadSettings(int(seconds * 1000), 3, 1000)
    pa = ensure_perf_analyzer()
    per: dict[tuple[str, int], list[dict[str, Any]]] = {}
    loads: list[str] = []
    with ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for name, args in variants.items():
            servers[name] = stack.enter_context(serving("pruneserve", artifact, model, threads, work / name, args))
        for floor in floors:
            name = f"floor-{floor}"
            servers[name] = stack.enter_context(
                serving("pruneserve", artifact, model, threads, work / name, floor=floor)
            )
        if baseline is not None:
            path = stack.enter_context(checkout_baseline(baseline))
            pairs = [("baseline", None)] + ([("baseline-floor-engine", "engine")] if "engine" in floors else [])
            for name, floor in pairs:
                servers[name] = stack.enter_context(
                    serving("pruneserve", artifact, model, threads, work / name, floor=floor, pythonpath=path)
                )
        if triton:
            servers["triton"] = stack.enter_context(serving("triton", artifact, model, threads, work / "triton"))
        for name, args in (triton_variants or {}).items():
            servers[name] = stack.enter_context(serving("triton", artifact, model, threads, work / name, args))
        ceilings = {
            ("in-process" if m == ceiling_spinning[0] else f"in-process-{m}"): (m, 0.0) for m in ceiling_spinning
        }
        if ceiling_pause_ms:
            ceilings["in-process-pause"] = (ceiling_spinning[0], ceiling_pause_ms / 1e3)
        order = [*servers, *ceilings]
        for r in range(rounds):
            loads.append(uptime())
            logger.info("round %d/%d: %s", r + 1, rounds, loads[-1])
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for c in concurrencies:
                for name in rotated:
                    if name in ceilings:
                        mode, pause = ceilings[name]
                        row = inprocess_ceiling(artifact, threads, texts, c, seconds * 3, mode, pause)
                    else:
                        row = measure(pa, servers[name], c, input_json, settings, work / f"{name}_c{c}.csv")
                    row["load"] = loads[-1].split("load average:")[-1].strip()
                    per.setdefault((name, c), []).append(row)
                    logger.info("  %s c=%d: %.1f/s p50 %.2f ms", name, c, row["throughput_infer_s"], row["p50_ms"])
        loads.append(uptime())
    results = [{"server": n, "concurrency": c, **_median_rows(rs)} for (n, c), rs in per.items()]
    by = {(r["server"], r["concurrency"]): r for r in results}
    for r in results:
        ceiling, peer = by.get(("in-process", r["concurrency"])), by.get(("triton", r["concurrency"]))
        r["p50_over_inprocess_ms"] = r["p50_ms"] - ceiling["p50_ms"] if ceiling else float("nan")
        r["vs_triton"] = r["throughput_infer_s"] / peer["throughput_infer_s"] if peer else float("nan")
        r["p99_vs_triton"] = r["p99_ms"] / peer["p99_ms"] if peer else float("nan")
    payload = {
        "artifact": str(artifact),
        "work_dir": str(work),
        "threads": threads,
        "variants": variants,
        "floors": list(floors),
        "baseline": baseline,
        "ceiling_pause_ms": ceiling_pause_ms,
        "rounds": rounds,
        "seconds_per_window": seconds,
        "loads": loads,
        "results": sorted(results, key=lambda r: (r["concurrency"], r["server"])),
        "per_round": {f"{n}@c{c}": rs for (n, c), rs in per.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    return payload


def table(payload: dict[str, Any]) -> str:
    """A markdown table of the medians."""
    head = (
        "| server | c | texts/s | p50 ms | p99 ms | p50 - in-process | vs Triton | p99 vs Triton | mean batch "
        "| server CPU ms/req | client CPU ms/req | data plane ms | queue ms | compute ms/batch |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(v: Any, fmt: str) -> str:
        return "-" if not isinstance(v, (int, float)) or math.isnan(v) else format(v, fmt)

    for r in payload["results"]:
        lines.append(
            f"| {r['server']} | {r['concurrency']} | {f(r['throughput_infer_s'], '.1f')} | {f(r['p50_ms'], '.2f')} "
            f"| {f(r['p99_ms'], '.2f')} | {f(r['p50_over_inprocess_ms'], '+.2f')} | {f(r['vs_triton'], '.2f')}x "
            f"| {f(r['p99_vs_triton'], '.2f')}x | {f(r.get('mean_batch_size'), '.2f')} "
            f"| {f(r.get('server_cpu_ms_per_request'), '.2f')} | {f(r.get('client_cpu_ms_per_request'), '.2f')} "
            f"| {f(r.get('dp_request_ms'), '.2f')} | {f(r.get('dp_queue_ms'), '.2f')} "
            f"| {f(r.get('dp_compute_ms'), '.2f')} |"
        )
    return "\n".join(lines)


def stages(artifact: Path, threads: int, requests: int = 512) -> dict[str, float]:
    """Median milliseconds of each stage of one request through the data plane, without gRPC.

    Sequential requests (concurrency 1) of real sentences through a started
    :class:`~pruneserve.server.dataplane.DataPlane`. The batcher's methods are wrapped (here,
    not in the server) to timestamp: arrival -> submit (validate + tokenize), submit -> the
    batch task starts (scheduler), -> the worker thread starts (executor hop), the engine run
    with assembling and splitting (execute), and the rest until ``infer`` returns (hop back to
    the loop, futures, outputs, metrics). ``direct`` is the same request prepared and executed
    straight on this thread, interleaved with the data-plane requests.
    """
    import asyncio

    import numpy as np
    from pruneserve.server import batcher as batcher_module
    from pruneserve.server.config import ServeConfig
    from pruneserve.server.dataplane import DataPlane
    from pruneserve.server.types import InferInput, InferRequest

    texts = load_corpus()[:256]
    model = json.loads((artifact / "manifest.json").read_text())["name"]
    marks: dict[str, float] = {}
    cls = batcher_module.DynamicBatcher
    submit, execute, run_batch = cls.submit, cls._execute, cls._run

    def timed_submit(self: Any, *a: Any, **k: Any) -> Any:
        marks["submit"] = time.perf_counter()
        return submit(self, *a, **k)

    def timed_execute(self: Any, batch: Any) -> Any:
        marks["exec0"] = time.perf_counter()
        out = execute(self, batch)
        marks["exec1"] = time.perf_counter()
        return out

    async def timed_run(self: Any, batch: Any) -> None:
        marks["run0"] = time.perf_counter()
        await run_batch(self, batch)

    def request(text: str) -> InferRequest:
        data = np.array([text.encode()], dtype=object).reshape(1, 1)
        return InferRequest(model, "", [InferInput("text", "BYTES", (1, 1), data)], [], "")

    async def main() -> dict[str, float]:
        dp = DataPlane(ServeConfig(artifacts=[str(artifact)], threads=threads, metrics_port=0))
        await dp.start()
        rt = dp.repository.get(model)
        spans: dict[str, list[float]] = {k: [] for k in ("prepare", "schedule", "to_worker", "execute", "back", "total", "direct")}
        try:
            for t in texts[:20]:
                await dp.infer(request(t))
            for i in range(requests):
                r = request(texts[i % len(texts)])
                t0 = time.perf_counter()
                p = rt.prepare(r, 32)
                raw, _ = rt.execute([p])
                rt.make_outputs(p, raw[0])
                t1 = time.perf_counter()
                await dp.infer(r)
                t2 = time.perf_counter()
                spans["direct"].append(t1 - t0)
                spans["prepare"].append(marks["submit"] - t1)
                spans["schedule"].append(marks["run0"] - marks["submit"])
                spans["to_worker"].append(marks["exec0"] - marks["run0"])
                spans["execute"].append(marks["exec1"] - marks["exec0"])
                spans["back"].append(t2 - marks["exec1"])
                spans["total"].append(t2 - t1)
        finally:
            await dp.stop(1)
        return {k: 1e3 * statistics.median(v) for k, v in spans.items()}

    cls.submit, cls._execute, cls._run = timed_submit, timed_execute, timed_run  # type: ignore[method-assign]
    try:
        return asyncio.run(main())
    finally:
        cls.submit, cls._execute, cls._run = submit, execute, run_batch  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run, print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.server_latency", description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, default=DEFAULT_RESULTS / "artifacts" / "default")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="perf_analyzer window (three per load)")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument(
        "--variant", action="append", default=[], metavar="NAME=ARGS",
        help="a pruneserve variant with extra serve flags (repeatable); 'pruneserve' with no flags is always run",
    )  # fmt: skip
    p.add_argument(
        "--triton-variant", action="append", default=[], metavar="NAME=ARGS",
        help="a Triton peer variant with extra triton_peer.py flags, e.g. triton-spin=--intra-op-spinning always (repeatable)",
    )  # fmt: skip
    p.add_argument("--no-triton", action="store_true")
    p.add_argument(
        "--ceiling-spinning", default=SPINNING, metavar="MODES",
        help="intra-op spinning of the in-process ceiling, comma-separated (off,run,always); the first is "
             "the one every p50 is compared with, the others are extra rows",
    )  # fmt: skip
    p.add_argument(
        "--floors", action="store_true",
        help="also run pruneserve with an instant engine (floor-engine) and with canned answers "
             "(floor-transport): what the server adds besides compute, and what gRPC alone costs",
    )  # fmt: skip
    p.add_argument(
        "--baseline", metavar="REV",
        help="also run pruneserve as of git revision REV (a temporary worktree), to measure a change side by side",
    )  # fmt: skip
    p.add_argument(
        "--ceiling-pause-ms", type=float, default=0.0, metavar="MS",
        help="also run the in-process ceiling with this pause between batches (row in-process-pause)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS / "server_latency.json")
    p.add_argument("--stages", action="store_true", help="only time one request's stages in the data plane (no gRPC)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stages:
        print(uptime())
        print("  ".join(f"{k} {v:.3f} ms" for k, v in stages(args.artifact, args.threads).items()))
        print(uptime())
        return 0
    variants: dict[str, list[str]] = {"pruneserve": []}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        variants[name] = shlex.split(flags)
    triton_variants = {n: shlex.split(f) for n, _, f in (v.partition("=") for v in args.triton_variant)}
    payload = run(
        args.artifact, args.threads, variants, [int(c) for c in args.concurrency.split(",")],
        args.rounds, args.seconds, args.out, triton=not args.no_triton, triton_variants=triton_variants,
        ceiling_spinning=args.ceiling_spinning.split(","), floors=FLOORS if args.floors else (),
        baseline=args.baseline, ceiling_pause_ms=args.ceiling_pause_ms,
    )  # fmt: skip
    print(table(payload))
    print("load:", *payload["loads"], sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
