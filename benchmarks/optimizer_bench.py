"""Optimizer benchmark: wall time and peak memory of ``pruneserve optimize``, per stage.

The command runs in a child process (as a user runs it); a sampler thread adds up the resident
memory of that process and its children every 100 ms for the peak. The per-stage seconds
come from the timings the pipeline records in the artifact's manifest.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks._common import BenchConfig, BenchmarkError, python_exe, write_rows

logger = logging.getLogger(__name__)

#: Keys under which a manifest may hold per-stage seconds (searched recursively).
_TIMING_KEYS = ("stage_seconds", "timings", "stage_timings", "stages_seconds", "durations")


class PeakRss:
    """Samples the summed RSS of a process tree until stopped; ``peak_mb`` is the maximum seen."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
                self.peak_mb = max(self.peak_mb, rss / 2**20)
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)


def find_stage_timings(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-stage ``{"stage", "seconds", "peak_rss_mb"}`` records found anywhere in the manifest.

    The pipeline writes ``[{"name", "seconds", "peak_rss_mb"}, ...]`` under a ``stages`` key
    (``manifest.pruning.stages``); a ``{stage: seconds}`` mapping under a timing key is read too.
    """
    stack: list[Any] = [manifest]
    while stack:
        node = stack.pop(0)
        if isinstance(node, Mapping):
            records = node.get("stages")
            if isinstance(records, list) and records and all(
                isinstance(r, Mapping) and "name" in r and isinstance(r.get("seconds"), (int, float)) for r in records
            ):
                return [
                    {"stage": str(r["name"]), "seconds": float(r["seconds"]), "peak_rss_mb": r.get("peak_rss_mb")}
                    for r in records
                ]
            for key in _TIMING_KEYS:
                val = node.get(key)
                if isinstance(val, Mapping) and val and all(isinstance(v, (int, float)) for v in val.values()):
                    return [{"stage": str(k), "seconds": float(v), "peak_rss_mb": None} for k, v in val.items()]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return []


def run_optimize(preset: str, out: Path, timeout: float, extra: list[str] | None = None) -> dict[str, Any]:
    """Run ``pruneserve optimize --preset PRESET --out OUT`` once; wall time, peak RSS, stage times.

    The log goes beside ``OUT`` (``optimize-PRESET.log``); on failure the error names it.
    """
    cmd = [python_exe(), "-m", "pruneserve.cli", "optimize", "--preset", preset, "--out", str(out), *(extra or [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    logger.info("timing: %s", " ".join(cmd))
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"optimize-{preset}.log"
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        with PeakRss(proc.pid) as rss:
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise BenchmarkError(f"`{' '.join(cmd)}` ran past {timeout:.0f} s") from None
    wall = time.perf_counter() - t0
    if rc != 0 or not (out / "manifest.json").is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise BenchmarkError(
            f"`pruneserve optimize --preset {preset}` failed (exit {rc}, log {log}): {' | '.join(tail)[:300]}"
        )
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "preset": preset,
        "wall_s": wall,
        "peak_rss_mb": rss.peak_mb,
        "stages": find_stage_timings(manifest),
        # Recorded in BENCHMARKS.md: the folder relative to the working directory, not this machine's path.
        "command": " ".join(cmd[1:]).replace("-m pruneserve.cli", "pruneserve").replace(str(out), _display_path(out)),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_optimizer_bench(cfg: BenchConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Time ``pruneserve optimize`` on the default model.

    ``--full`` reports ``--preset default`` built by the current optimizer code: the record the
    harness kept when it built the default artifact (``build_artifacts`` rebuilds it whenever
    ``optimizer/`` changed, so in ``make bench`` it is this run's build: same command, same
    measurement), else a fresh run. ``--quick`` reports any kept record (the default preset's
    when there is one) and runs ``--preset light`` only when there is no record at all.
    """
    from benchmarks.model import optimizer_fingerprint

    notes: list[str] = []
    assert cfg.artifact_cache is not None
    records = [cfg.artifact_cache / f"{p}.build.json" for p in ("default", "light", "aggressive")]
    if not cfg.quick:
        fingerprint = optimizer_fingerprint()
        records = [r for r in records[:1] if r.is_file() and json.loads(r.read_text()).get("optimizer") == fingerprint]
    cached = next((r for r in records if r.is_file()), None)
    preset = "default" if not cfg.quick else "light"
    if cached is not None:
        res = json.loads(cached.read_text())
        preset = res["preset"]
        notes.append(f"figures from the harness's build of the cached artifact ({res.get('measured_at', 'earlier')})")
    else:
        with tempfile.TemporaryDirectory(prefix="bench-optimize-") as tmp:
            try:
                res = run_optimize(preset, Path(tmp) / preset, timeout=3600)
            except BenchmarkError as exc:
                return [], [str(exc)]
    rows: list[dict[str, Any]] = [
        {"preset": preset, "stage": "total (wall, process tree)", "seconds": res["wall_s"],
         "peak_rss_mb": res["peak_rss_mb"], "command": res["command"]}
    ]  # fmt: skip
    rows += [{"preset": preset, **r, "command": ""} for r in res["stages"]]
    if not res["stages"]:
        notes.append("the manifest records no per-stage timings; only the total is shown")
    write_rows(cfg.out_dir, "optimizer", rows)
    return rows, notes
