"""End to end: a real Prometheus scrapes `pruneserve serve --shadow-rate 1`, and deploy/'s
``PruneserveLiveFidelityBelowFloor`` expression fires for a drifted model and not for a faithful one.

Two tiny artifacts carry ``reference.onnx`` and a quality floor of 0.95: ``drifted`` serves a
damaged copy of its reference (mean cosine ~0.85 on these texts), ``faithful`` serves the
reference itself. The alert expression is read from the rendered PrometheusRule (the file users
deploy), evaluated through Prometheus's HTTP API (no Alertmanager, no ``for:`` wait). The
server also captures drifted texts through a YAML config, and the capture is read back with the
optimizer's ``--data`` reader. Everything binds to 127.0.0.1, is bounded in time and is stopped
here; the test is skipped only when the ``prometheus`` binary is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# The helpers live beside the server and deploy tests (tests/ folders are not packages).
_TESTS = Path(__file__).resolve().parents[1]
for _folder in ("server", "deploy"):
    if str(_TESTS / _folder) not in sys.path:
        sys.path.insert(0, str(_TESTS / _folder))

import deploy_support  # noqa: E402
from shadow_support import expected_fidelity, make_shadowed_artifact  # noqa: E402

pytestmark = pytest.mark.integration

ALERT = "PruneserveLiveFidelityBelowFloor"
FLOOR = 0.95
TEXTS = [
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "cats and dogs are good",
    "red blue green",
    "a small model",
    "very fast server",
    "sad dog",
]
#: Longest the whole scenario may wait for Prometheus to see the drift.
DEADLINE_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Server:
    """``pruneserve serve`` in a subprocess; ports read from its log lines."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    grpc_port: int | None = None
    metrics_port: int | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := re.search(r"gRPC listening on 127\.0\.0\.1:(\d+)", line):
                self.grpc_port = int(m.group(1))
            if m := re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", line):
                self.metrics_port = int(m.group(1))
            if self.grpc_port and self.metrics_port:
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or not (self.grpc_port and self.metrics_port):
            raise AssertionError("pruneserve serve did not start:\n" + "".join(self.lines))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, Path, Path]]:
    drifted = make_shadowed_artifact(tmp_path / "drifted", name="drifted", damage=0.25, quality_floor=FLOOR)
    faithful = make_shadowed_artifact(tmp_path / "faithful", name="faithful", damage=0.0, quality_floor=FLOOR)
    capture = tmp_path / "drift.jsonl"
    config = tmp_path / "serve.yaml"
    config.write_text(f"capture_path: {capture}\ncapture_max_bytes: 65536\ncapture_backups: 1\n", encoding="utf-8")
    cmd = [
        sys.executable, "-m", "pruneserve.cli", "serve", str(drifted), str(faithful), "--config", str(config),
        "--shadow-rate", "1", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-host", "127.0.0.1",
        "--metrics-port", str(_free_port()), "--threads", "1", "--max-queue-delay-ms", "1", "--grace-seconds", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    srv = Server(proc)
    threading.Thread(target=srv.read, daemon=True).start()
    try:
        srv.wait_ready(120)
        yield srv, drifted, capture
    finally:
        _stop(proc)


@pytest.fixture
def prometheus(tmp_path: Path, server: tuple[Server, Path, Path]) -> Iterator[str]:
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip(f"the prometheus binary is not installed; {deploy_support.INSTALL_HINT}")
    srv = server[0]
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    # job="pruneserve" is what deploy/'s rules select (the ServiceMonitor's job label in-cluster).
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pruneserve\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{srv.metrics_port}']}}]\n",
        encoding="utf-8",
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [exe, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("prometheus did not start:\n" + (tmp_path / "prometheus.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)
        log.close()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """An instant query through Prometheus's HTTP API; the result vector."""
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def alert_expression() -> str:
    """The alert's expression from the PrometheusRule users deploy (rendered cpu overlay)."""
    for group in deploy_support.rule_groups(deploy_support.render("overlays/cpu")):
        for rule in group["rules"]:
            if rule.get("alert") == ALERT:
                return str(rule["expr"])
    raise AssertionError(f"deploy/ has no alert {ALERT}")


def _traffic(grpc_port: int, stop: threading.Event, errors: list[BaseException]) -> None:
    from pruneserve.server.client import InferenceClient

    try:
        with InferenceClient(f"127.0.0.1:{grpc_port}", timeout=30) as client:
            while not stop.is_set():
                for text in TEXTS:
                    for model in ("drifted", "faithful"):
                        client.infer_text(model, [text])
                stop.wait(0.1)  # a gentle rate: the machine is shared
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_live_fidelity_alert_fires_for_the_drifted_model_only(server, prometheus: str) -> None:
    from pruneserve.optimizer.data import read_examples

    srv, drifted, capture = server
    expr = alert_expression()
    assert "pruneserve_live_fidelity" in expr and "pruneserve_quality_floor" in expr
    stop, errors = threading.Event(), []
    traffic = threading.Thread(target=_traffic, args=(srv.grpc_port, stop, errors), daemon=True)
    traffic.start()
    mean = (
        'sum by (model) (rate(pruneserve_live_fidelity_sum{{job="pruneserve", model="{m}"}}[1m])) '
        '/ sum by (model) (rate(pruneserve_live_fidelity_count{{job="pruneserve", model="{m}"}}[1m]))'
    )
    firing: list[dict[str, Any]] = []
    faithful_mean: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and not errors:
            firing = query(prometheus, expr)
            faithful_mean = query(prometheus, mean.format(m="faithful"))
            if firing and faithful_mean:
                break
            time.sleep(1)
    finally:
        stop.set()
        traffic.join(60)
    assert not errors, f"traffic failed: {errors[0]!r}"
    assert firing, f"{ALERT} never fired within {DEADLINE_S:.0f} s; server log:\n" + "".join(srv.lines[-30:])
    assert {s["metric"]["model"] for s in firing} == {"drifted"}
    assert firing[0]["metric"]["version"] == "1"
    value = float(firing[0]["value"][1])
    expected = expected_fidelity(drifted, TEXTS)
    assert value < FLOOR
    assert value == pytest.approx(expected.mean(), abs=0.05)  # the window may cover a partial round of texts
    # The faithful model is measured (so its absence above is meaningful) and sits at 1.
    assert faithful_mean and float(faithful_mean[0]["value"][1]) == pytest.approx(1.0, abs=1e-6)
    floors = {s["metric"]["model"]: float(s["value"][1]) for s in query(prometheus, 'pruneserve_quality_floor{job="pruneserve"}')}
    assert floors == {"drifted": FLOOR, "faithful": FLOOR}
    compared = query(prometheus, 'sum(pruneserve_shadow_comparisons_total{job="pruneserve", outcome="compared"})')
    assert compared and float(compared[0]["value"][1]) > 0
    # The capture holds exactly the drifted texts under the floor, ready for `optimize --data`.
    below = {t for t, e in zip(TEXTS, expected) if e < FLOOR}
    assert capture.exists()
    assert {e.text for e in read_examples(capture)} == below
