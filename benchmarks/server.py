"""Server-level benchmark: ``perf_analyzer`` over gRPC and HTTP against pruneserve and Triton, plus the ceiling.

Three things serve the same artifact (same ONNX Runtime session options, same tokenizer, same
thread count, same batching limits):

* ``pruneserve serve --engine onnxruntime`` (our server, on the same engine as the other two;
  when the artifact's manifest recommends another engine, ``pruneserve-<engine>`` rows show
  the server as ``serve`` runs it by default, for information);
* Triton Inference Server 2.51 from the ``nvidia-pytriton`` wheel, whose Python backend wraps
  the artifact's session + tokenizer behind Triton's dynamic batcher (``triton_peer.py``, run in
  its own venv under ``benchmarks/.peers/`` so its ``numpy<2`` pin cannot touch ours);
* the in-process ceiling: the same texts, tokenized and run straight through ONNX Runtime in
  full batches of ``concurrency`` texts, with no server at all.

Triton's ``perf_analyzer`` (from the ``tritonclient==2.50.0`` wheel, set up by
``setup_perf_analyzer.sh``) drives both servers with real texts (``--input-data`` JSON) at
each concurrency, over each protocol of ``--protocols``: gRPC (``-i grpc``) and KServe v2
HTTP/REST (``-i http``, Triton's binary-tensor extension; pruneserve's ``serve --http-port``,
Triton's own HTTP endpoint). Every server is started once and stays up, idle, while the others
are measured; each concurrency's loads (every server over every protocol) run back to back in
an order that rotates from one concurrency to the next, so the ratios between servers and
between protocols compare one moment's machine. Throughput, p50 and p99 come from
perf_analyzer; the mean batch size comes from each server's own Prometheus counters
(inferences / executions). Everything binds to 127.0.0.1, every load is bounded in time, and
every server started here is stopped here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pruneserve.engines.keys import ONNXRUNTIME
from pruneserve.engines.ort_settings import DEFAULT_SPINNING

from benchmarks._common import (
    BENCH_DIR,
    PEERS_DIR,
    REPO_ROOT,
    BenchConfig,
    PROTOCOLS,
    BenchmarkError,
    load_corpus,
    median,
    ort_session,
    percentile,
    python_exe,
    write_rows,
)

logger = logging.getLogger(__name__)

CONCURRENCIES: tuple[int, ...] = (1, 4, 16)
PYTRITON_SPEC = "nvidia-pytriton==0.5.14"  # bundles Triton Inference Server 2.51.0
TRITON_VENV = PEERS_DIR / "triton-venv"
PERF_ANALYZER_DIR = PEERS_DIR / "perf_analyzer"
MAX_BATCH_SIZE = 32
MAX_QUEUE_DELAY_MS = 2.0
#: ONNX Runtime intra-op spinning for every server and the in-process ceiling alike, so they
#: time the same session: ``pruneserve serve``'s default.
SPINNING: str = DEFAULT_SPINNING
READY_TIMEOUT_S = 180.0
#: A stability threshold no two windows can miss: perf_analyzer then reports after its trials.
NO_STABILITY = 1000

#: (inferences counter, executions counter) in each server's Prometheus text.
COUNTERS = {
    "pruneserve": ("pruneserve_inferences_total", "pruneserve_executions_total"),
    "triton": ("nv_inference_count", "nv_inference_exec_count"),
}

#: What the issues ask of the server, stated beside what was measured.
TARGETS = {
    "vs_inprocess_c16": 0.90,
    "vs_triton_c16": 1.20,
    "p50_over_inprocess_c1_ms": 1.0,
}


@dataclass
class ServerProcess:
    """A server this benchmark started (its own process group) and the ports it listens on."""

    kind: str
    proc: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    model: str
    log: Path
    http_port: int

    def url(self, protocol: str) -> str:
        """``host:port`` of the endpoint serving ``protocol`` (perf_analyzer's ``-u``)."""
        if protocol not in PROTOCOLS:
            raise BenchmarkError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        return f"127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"


# -- tools -------------------------------------------------------------------------------


def ensure_perf_analyzer() -> Path:
    """Run ``setup_perf_analyzer.sh`` (idempotent) and return the perf_analyzer wrapper's path."""
    script = BENCH_DIR / "setup_perf_analyzer.sh"
    env = dict(os.environ, PIP=f"{python_exe()} -m pip")
    proc = subprocess.run(
        ["bash", str(script), str(PERF_ANALYZER_DIR)], capture_output=True, text=True, timeout=900, env=env
    )
    if proc.returncode != 0:
        raise BenchmarkError(f"setup_perf_analyzer.sh failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def _base_python() -> str:
    """The interpreter the project's venv was made from (the peer venv needs its libpython)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else sys.executable)


def ensure_triton_venv() -> Path:
    """Create ``benchmarks/.peers/triton-venv`` with PyTriton, ONNX Runtime and tokenizers; return its python."""
    py = TRITON_VENV / "bin" / "python"
    check = [str(py), "-c", "import pytriton, onnxruntime, tokenizers"]
    if py.exists() and subprocess.run(check, capture_output=True, timeout=120).returncode == 0:
        return py
    logger.info("creating the Triton peer venv in %s (one-off, ~2 min)", TRITON_VENV)
    subprocess.run([_base_python(), "-m", "venv", str(TRITON_VENV)], check=True, timeout=300)
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", PYTRITON_SPEC, "onnxruntime", "tokenizers", "numpy<2"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise BenchmarkError(f"installing {PYTRITON_SPEC} into {TRITON_VENV} failed: {proc.stderr.strip()[-400:]}")
    return py


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1.

    All are bound at once before any is released: asking one at a time can hand back the port
    just released (it happened: gRPC and metrics got the same port and the server refused to start).
    """
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


# -- servers -----------------------------------------------------------------------------


def _libdir_of(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip()


def _http_ready(server: ServerProcess) -> bool:
    """Whether the server's HTTP endpoint answers 200 to KServe v2's server and model readiness."""
    base = f"http://{server.url('http')}/v2"
    for path in ("/health/ready", f"/models/{server.model}/ready"):
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                if resp.status != 200:
                    return False
        except OSError:  # not listening yet, or 503 (HTTPError is an OSError)
            return False
    return True


def _wait_ready(server: ServerProcess, timeout: float) -> None:
    """Wait until the server and its model are ready over gRPC and over HTTP, both of which are measured."""
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise BenchmarkError(
                    f"{server.kind} exited with {server.proc.returncode} before it was ready; "
                    f"log: {server.log}\n{_tail(server.log)}"
                )
            try:
                if client.is_server_ready() and client.is_model_ready(server.model) and _http_ready(server):
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.5)
    finally:
        client.close()
    raise BenchmarkError(f"{server.kind} was not ready within {timeout:.0f} s; log: {server.log}\n{_tail(server.log)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_server(server: ServerProcess, grace: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it if it has not exited within ``grace``."""
    if server.proc.poll() is not None:
        return
    pgid = os.getpgid(server.proc.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        server.proc.wait(grace)
    except subprocess.TimeoutExpired:
        logger.warning("%s did not stop within %.0f s; killing it", server.kind, grace)
        os.killpg(pgid, signal.SIGKILL)
        server.proc.wait(10)
    # Triton's own child (tritonserver) shares the group; make sure nothing of ours lingers.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def serving(
    kind: str,
    artifact: Path,
    model: str,
    threads: int,
    log_dir: Path,
    extra_args: Sequence[str] = (),
    floor: str | None = None,
    pythonpath: Path | None = None,
) -> Iterator[ServerProcess]:
    """Start ``kind`` ('pruneserve' or 'triton') on free 127.0.0.1 ports; always stop it afterwards.

    Both serve gRPC and HTTP/REST (pruneserve with ``serve --http-port``, Triton on its own
    HTTP endpoint), each on its own port; it is ready when both answer that the model is.

    ``extra_args`` are appended to ``pruneserve serve`` (e.g. ``--shadow-rate 0.01``) or to
    ``triton_peer.py`` (e.g. ``--intra-op-spinning always``). ``floor`` ('engine' or
    'transport') starts pruneserve through ``floor_server.py`` with that part taken away.
    ``pythonpath`` (from :func:`checkout_baseline`) runs pruneserve as of another commit.
    """
    grpc_port, metrics_port, http_port = free_ports(3)
    log_dir.mkdir(parents=True, exist_ok=True)
    stem = kind if floor is None else f"{kind}-floor-{floor}"
    log = log_dir / (f"{stem}.log" if not extra_args else f"{stem}-{'_'.join(extra_args).strip('-')}.log")
    common = [
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--max-batch-size", str(MAX_BATCH_SIZE), "--max-queue-delay-ms", str(MAX_QUEUE_DELAY_MS),
        "--threads", str(threads), "--intra-op-spinning", SPINNING,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cwd = None
    if pythonpath is not None:
        if kind != "pruneserve":
            raise BenchmarkError(f"a baseline checkout applies to pruneserve only, not {kind!r}")
        # Its package directory comes first, and is the working directory so that `-m` does
        # not import this checkout's `pruneserve` from the current directory instead.
        env["PYTHONPATH"] = str(pythonpath)
        cwd = str(pythonpath)
    if floor is not None and kind != "pruneserve":
        raise BenchmarkError(f"floor {floor!r} applies to pruneserve only, not {kind!r}")
    if kind == "pruneserve":
        entry = ["-m", "pruneserve.cli"] if floor is None else [str(BENCH_DIR / "floor_server.py"), "--floor", floor]
        cmd = [python_exe(), *entry, "serve", str(artifact), "--host", "127.0.0.1", "--http-port", str(http_port),
               "--metrics-host", "127.0.0.1", *common, *extra_args]  # fmt: skip
    elif kind == "triton":
        py = str(ensure_triton_venv())
        cmd = [py, str(BENCH_DIR / "triton_peer.py"), str(artifact), "--http-port", str(http_port),
               "--model-name", model, *common, *extra_args]  # fmt: skip
        # The Python backend stub links libpython: the interpreter's own LIBDIR must come first.
        libdir = _libdir_of(py)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    else:
        raise BenchmarkError(f"unknown server kind {kind!r}")
    logger.info("starting %s: %s", kind, " ".join(cmd))
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
    server = ServerProcess(kind, proc, grpc_port, metrics_port, model, log, http_port)
    try:
        _wait_ready(server, READY_TIMEOUT_S)
        yield server
    finally:
        stop_server(server)


@contextmanager
def checkout_baseline(rev: str) -> Iterator[Path]:
    """A directory to put first on PYTHONPATH that imports ``pruneserve`` as of commit ``rev``.

    A detached git worktree of this repository, with the package assembled as pyproject's
    ``package-dir`` maps it (``pruneserve/``, ``server/`` as ``pruneserve.server``,
    ``optimizer/`` as ``pruneserve.optimizer``); removed afterwards. The baseline runs in this
    venv, so it must not need packages the venv lacks.
    """
    work = Path(tempfile.mkdtemp(prefix="pruneserve-baseline-"))
    tree = work / "tree"
    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "--force", str(tree), rev],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise BenchmarkError(f"cannot check out baseline {rev!r}: {proc.stderr.strip()[-300:]}")
    try:
        package = work / "pkg" / "pruneserve"
        shutil.copytree(tree / "pruneserve", package)
        (package / "server").symlink_to(tree / "server", target_is_directory=True)
        (package / "optimizer").symlink_to(tree / "optimizer", target_is_directory=True)
        yield package.parent
    finally:
        subprocess.run(["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(tree)],
                       capture_output=True, timeout=120)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


def scrape(port: int, names: Sequence[str]) -> dict[str, float]:
    """Sum of every sample of each named metric in the server's Prometheus text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {n: 0.0 for n in names}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(3))
    return out


# -- load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSettings:
    """How long and how strictly perf_analyzer measures each concurrency."""

    interval_ms: int
    max_trials: int
    stability_pct: int

    @classmethod
    def for_mode(cls, quick: bool) -> LoadSettings:
        # Quick: three short windows (the fewest perf_analyzer accepts) and no stability demand,
        # since a busy development machine never stabilises; full: long windows, 15%.
        return cls(1500, 3, NO_STABILITY) if quick else cls(5000, 10, 15)

    @classmethod
    def smoke(cls) -> LoadSettings:
        """The shortest load: for tests that check the harness runs end to end, not what it measures."""
        return cls(300, 3, NO_STABILITY)

    @property
    def timeout_s(self) -> float:
        return self.max_trials * (self.interval_ms / 1000) * 3 + 60


def write_input_data(texts: Sequence[str], path: Path) -> Path:
    """perf_analyzer ``--input-data`` JSON: one step per text, ``text`` as a [1] BYTES tensor."""
    path.write_text(json.dumps({"data": [{"text": [t]} for t in texts]}), encoding="utf-8")
    return path


def run_perf_analyzer(
    pa: Path,
    server: ServerProcess,
    concurrency: int,
    input_json: Path,
    settings: LoadSettings,
    csv_out: Path,
    protocol: str = "grpc",
) -> dict[str, Any]:
    """One perf_analyzer run at one concurrency over ``protocol`` ('grpc' or 'http').

    Falls back to no stability demand if it cannot stabilise.
    """
    url = server.url(protocol)
    for stability in dict.fromkeys((settings.stability_pct, NO_STABILITY)):
        cmd = [
            str(pa), "-m", server.model, "-i", protocol, "-u", url,
            "--input-data", str(input_json), "--concurrency-range", str(concurrency),
            "-p", str(settings.interval_ms), "-r", str(settings.max_trials), "-s", str(stability),
            "--percentile=99", "-f", str(csv_out),
        ]  # fmt: skip
        before = scrape(server.metrics_port, COUNTERS[server.kind])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(
                f"perf_analyzer over {protocol} at concurrency {concurrency} ran past {settings.timeout_s:.0f} s"
            ) from None
        after = scrape(server.metrics_port, COUNTERS[server.kind])
        if proc.returncode == 0 and csv_out.is_file():
            row = _parse_pa_csv(csv_out)
            inf, exe = (after[n] - before[n] for n in COUNTERS[server.kind])
            row["mean_batch_size"] = inf / exe if exe else float("nan")
            row["stable"] = stability < NO_STABILITY
            row["command"] = " ".join(cmd)
            return row
        if stability == NO_STABILITY:
            break
        logger.info("perf_analyzer did not stabilise at %d%%; measuring without the stability demand", stability)
    raise BenchmarkError(
        f"perf_analyzer failed against {server.kind} over {protocol} at concurrency {concurrency} "
        f"(exit {proc.returncode}):\n"
        f"{(proc.stdout + proc.stderr).strip()[-800:]}"
    )


def _parse_pa_csv(path: Path) -> dict[str, Any]:
    import csv

    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    r = rows[-1]
    return {
        "throughput_infer_s": float(r["Inferences/Second"]),
        "p50_ms": float(r["p50 latency"]) / 1e3,
        "p90_ms": float(r["p90 latency"]) / 1e3,
        "p99_ms": float(r["p99 latency"]) / 1e3,
        "server_queue_ms": float(r.get("Server Queue", 0) or 0) / 1e3,
        "server_compute_ms": float(r.get("Server Compute Infer", 0) or 0) / 1e3,
    }


def inprocess_ceiling(
    artifact: Path,
    threads: int,
    texts: Sequence[str],
    concurrency: int,
    seconds: float,
    spinning: str = SPINNING,
    pause_s: float = 0.0,
) -> dict[str, Any]:
    """The same texts in full batches of ``concurrency``, tokenized and run straight through ONNX Runtime.

    No network, no queue: what a perfect server could do with these batches. Every text of a
    batch waits for the whole batch, so latency = the batch's time. ``pause_s`` sleeps between
    batches, as a closed-loop client's round trip leaves the engine idle between requests.
    """
    from tokenizers import Tokenizer

    man = json.loads((artifact / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(artifact / (man.get("tokenizer_file") or "tokenizer.json")))
    tok.enable_truncation(int(man["max_sequence_length"]))
    tok.enable_padding()
    sess = ort_session(artifact / man.get("model_file", "model.onnx"), threads, spinning)
    names = [i.name for i in sess.get_inputs()]
    out_name = sess.get_outputs()[0].name

    def one(batch: Sequence[str]) -> None:
        encs = tok.encode_batch(list(batch))
        feeds = {
            "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encs], dtype=np.int64),
        }
        sess.run([out_name], {n: feeds[n] for n in names})

    n = len(texts)
    batches = [[texts[(i * concurrency + j) % n] for j in range(concurrency)] for i in range(n)]
    for b in batches[:3]:
        one(b)
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    i = 0
    t_start = time.perf_counter()
    while time.perf_counter() < t_end or len(lat) < 5:
        t0 = time.perf_counter()
        one(batches[i % len(batches)])
        lat.append((time.perf_counter() - t0) * 1e3)
        i += 1
        if pause_s:
            time.sleep(pause_s)
    wall = time.perf_counter() - t_start
    return {
        "throughput_infer_s": len(lat) * concurrency / wall,
        "p50_ms": median(lat),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "mean_batch_size": float(concurrency),
        "stable": True,
        "command": f"in-process: tokenizers + onnxruntime, {threads} threads, spinning {spinning}, batches of {concurrency}"
        + (f", {pause_s * 1e3:g} ms pause between batches" if pause_s else ""),
    }


def pick_artifact(artifacts: dict[str, Path]) -> tuple[str, Path]:
    """The artifact the server comparison serves: the default preset when there is one."""
    if not artifacts:
        raise BenchmarkError("no artifact to serve: build one with `pruneserve optimize` or pass --artifact")
    label = "pruneserve-default" if "pruneserve-default" in artifacts else sorted(artifacts)[0]
    return label, artifacts[label]


def server_runs(servers: Sequence[str], manifest: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(row label, server kind, extra arguments) for every server run of the comparison.

    pruneserve runs on ONNX Runtime, so it, Triton and the in-process ceiling time the same
    session and the targets compare servers, not engines. When the manifest recommends another
    engine, one more run shows pruneserve as ``serve`` runs that artifact by default.
    """
    runs = [(kind, kind, ["--engine", ONNXRUNTIME] if kind == "pruneserve" else []) for kind in servers]
    recorded = (manifest.get("runtime") or {}).get("engine")
    if "pruneserve" in servers and recorded and recorded != ONNXRUNTIME:
        runs.append((f"pruneserve-{recorded}", "pruneserve", ["--engine", str(recorded)]))
    return runs


def run_server_bench(
    cfg: BenchConfig,
    artifacts: dict[str, Path],
    servers: Sequence[str] = ("pruneserve", "triton"),
    concurrencies: Sequence[int] = CONCURRENCIES,
    settings: LoadSettings | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Measure every server over every protocol of ``cfg.protocols`` and the in-process ceiling; write server.csv/json.

    Every server is started first and stays up. Then, at each concurrency, every (server,
    protocol) load runs back to back, each right after an in-process ceiling measurement, in an
    order that rotates from one concurrency to the next (so no load always runs first, or
    always right after the same other one). ``settings`` (default: ``cfg``'s mode) sets how long
    perf_analyzer measures; :meth:`LoadSettings.smoke` is the shortest.
    """
    notes: list[str] = []
    label, artifact = pick_artifact(artifacts)
    manifest = json.loads((artifact / "manifest.json").read_text())
    model = manifest["name"]
    texts = load_corpus()[:256]
    work = cfg.out_dir / "server"
    work.mkdir(parents=True, exist_ok=True)
    input_json = write_input_data(texts, work / "input_data.json")
    settings = settings or LoadSettings.for_mode(cfg.quick)
    pa = ensure_perf_analyzer()

    runs = server_runs(servers, manifest)
    rows: list[dict[str, Any]] = []
    seconds = min(20.0, settings.interval_ms / 1000 * settings.max_trials)
    # The ceiling is measured once up front and again right before every load at the same
    # concurrency (the servers idle meanwhile), and reported as the median: on a shared machine
    # the load moves, and a ceiling taken minutes before a server's run would compare that
    # server with another moment's machine.
    ceilings: dict[int, list[dict[str, Any]]] = {
        c: [inprocess_ceiling(artifact, cfg.threads, texts, c, seconds)] for c in concurrencies
    }
    with ExitStack() as stack:
        # An idle server costs nothing measurable (ONNX Runtime spins only inside a run), so all
        # stay up and the loads of one concurrency compare servers and protocols side by side.
        loads: list[tuple[str, ServerProcess, list[str], str]] = []
        for name, kind, extra in runs:
            try:
                srv = stack.enter_context(serving(kind, artifact, model, cfg.threads, work, extra))
            except BenchmarkError as exc:
                logger.error("%s: %s", name, exc)
                notes.append(f"{name} could not be measured: {str(exc).splitlines()[0]}")
                continue
            loads += [(name, srv, extra, protocol) for protocol in cfg.protocols]
        for i, c in enumerate(concurrencies):
            k = i % len(loads) if loads else 0
            for name, srv, extra, protocol in loads[k:] + loads[:k]:
                if srv.proc.poll() is not None:
                    notes.append(f"{name} over {protocol} at c={c} not measured: the server exited "
                                 f"with {srv.proc.returncode} (log: {srv.log})")  # fmt: skip
                    continue
                ceilings[c].append(inprocess_ceiling(artifact, cfg.threads, texts, c, seconds))
                csv_out = work / f"{name}_{protocol}_c{c}.csv"
                try:
                    row = run_perf_analyzer(pa, srv, c, input_json, settings, csv_out, protocol)
                except BenchmarkError as exc:
                    logger.error("%s over %s at c=%d: %s", name, protocol, c, exc)
                    notes.append(f"{name} over {protocol} at c={c} could not be measured: {str(exc).splitlines()[0]}")
                    continue
                rows.append({"server": name, "protocol": protocol, "concurrency": c, "engine_args": " ".join(extra),
                             **row})  # fmt: skip
    # Grouped for reading (server, then protocol, then concurrency), whatever order they ran in.
    order = {name: n for n, (name, _, _) in enumerate(runs)}
    rows.sort(key=lambda r: (order[r["server"]], cfg.protocols.index(r["protocol"]), r["concurrency"]))
    rows[:0] = [
        {"server": "in-process", "protocol": "", "concurrency": c, **_median_ceiling(ceilings[c])}
        for c in concurrencies
    ]
    _add_ratios(rows)
    for r in rows:
        r["artifact"] = label
        r["threads"] = cfg.threads
        r["max_batch_size"] = MAX_BATCH_SIZE
        r["max_queue_delay_ms"] = MAX_QUEUE_DELAY_MS
    write_rows(cfg.out_dir, "server", rows)
    return rows, notes


def _median_ceiling(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of each figure over the ceiling's measurements (see run_server_bench)."""
    out = dict(samples[-1])
    for key in ("throughput_infer_s", "p50_ms", "p90_ms", "p99_ms"):
        out[key] = median([s[key] for s in samples])
    out["command"] = f"{out['command']}; median of {len(samples)} measurements interleaved with the servers"
    return out


def row_protocol(row: Mapping[str, Any]) -> str:
    """A row's protocol: '' for the in-process ceiling, 'grpc' for rows written before HTTP was measured."""
    if row["server"] == "in-process":
        return ""
    return str(row.get("protocol") or "grpc")


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's ratios to the figures it is compared with at the same concurrency.

    ``vs_inprocess`` / ``p50_over_inprocess_ms``: to the in-process ceiling; ``vs_triton`` /
    ``p99_vs_triton``: to Triton over the same protocol; ``vs_grpc`` / ``p99_vs_grpc``: an HTTP
    row to the same server over gRPC (NaN where there is nothing to compare with).
    """
    nan = float("nan")
    by = {(r["server"], row_protocol(r), r["concurrency"]): r for r in rows}
    for r in rows:
        c, protocol = r["concurrency"], row_protocol(r)
        ceiling = by.get(("in-process", "", c))
        triton = by.get(("triton", protocol, c)) if protocol else None
        grpc = by.get((r["server"], "grpc", c)) if protocol and protocol != "grpc" else None
        r["vs_inprocess"] = r["throughput_infer_s"] / ceiling["throughput_infer_s"] if ceiling else nan
        r["vs_triton"] = r["throughput_infer_s"] / triton["throughput_infer_s"] if triton else nan
        r["p99_vs_triton"] = r["p99_ms"] / triton["p99_ms"] if triton else nan
        r["vs_grpc"] = r["throughput_infer_s"] / grpc["throughput_infer_s"] if grpc else nan
        r["p99_vs_grpc"] = r["p99_ms"] / grpc["p99_ms"] if grpc else nan
        r["p50_over_inprocess_ms"] = r["p50_ms"] - ceiling["p50_ms"] if ceiling else nan
