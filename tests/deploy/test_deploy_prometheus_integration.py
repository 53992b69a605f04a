"""A real Prometheus scraping a real ``pruneserve serve``, queried through its HTTP API.

Starts ``pruneserve serve`` (the CLI, as the Deployment runs it) on a tiny artifact and
Debian's ``prometheus`` binary by hand (temp config and data dir, 127.0.0.1, no systemd),
loaded with the PrometheusRule's groups. After a known number of requests it checks that
the counter, ``rate()`` of successes and ``histogram_quantile()`` of request latency have the
expected shape, that every alert and recording rule evaluates without error (and the
no-ready-pods alert stays quiet while the model is ready), and that the dashboard's and the
prometheus-adapter's queries run. Everything is bounded in time and torn down in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from deploy_support import (
    INSTALL_HINT,
    REPO,
    adapter_query,
    adapter_values,
    dashboard,
    dashboard_queries,
    render,
    rule_groups,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NAMESPACE = "pruneserve-it"
POD = "pruneserve-it-0"
MODEL = "tiny-embed"
SUCCESSES = 30
SCRAPE_INTERVAL_S = 1


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: all bound at once, so none is handed out twice."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for(
    what: str, check: Callable[[], Any], timeout_s: float, proc: subprocess.Popen[bytes] | None = None
) -> Any:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}")
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:  # not up yet
            last = exc
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def _process(cmd: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` (output to ``log``); SIGTERM then SIGKILL it on exit, whatever happened."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


class PromAPI:
    """The few Prometheus HTTP API calls the test needs."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - localhost only
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.base}/-/ready", timeout=5) as response:  # noqa: S310
            return response.status == 200


QUALITY_FLOOR = 0.99


@pytest.fixture
def tiny_artifact(tmp_path: Path) -> Path:
    """A tiny embedding artifact with a reference model of other random weights, so live
    fidelity is far below the manifest's quality floor and the fidelity alert must trip."""
    sys.path.insert(0, str(REPO / "tests" / "server"))
    try:
        from tiny_artifacts import make_artifact
    finally:
        sys.path.remove(str(REPO / "tests" / "server"))
    path = make_artifact(tmp_path / "artifacts" / "tiny-embed", task="embedding", name=MODEL, with_reference=True)
    # manifest.json is not among the hashed files; the floor is what the optimizer would promise.
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    manifest["quality_floor"] = QUALITY_FLOOR
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return path


def _send_requests(grpc_port: int, count: int) -> list[float]:
    """``count`` single-text requests to ``MODEL``; returns client-side latencies in seconds."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    latencies = []
    try:
        for i in range(count):
            text = np.array([[f"the quick brown fox {i}".encode()]], dtype=object)
            item = triton.InferInput("text", [1, 1], "BYTES")
            item.set_data_from_numpy(text)
            start = time.perf_counter()
            result = client.infer(MODEL, [item], client_timeout=30)
            latencies.append(time.perf_counter() - start)
            assert result.as_numpy("embedding").shape == (1, 8)
        # One request for a model that does not exist: outcome not_found.
        item = triton.InferInput("text", [1, 1], "BYTES")
        item.set_data_from_numpy(np.array([[b"hello"]], dtype=object))
        with pytest.raises(triton.InferenceServerException):
            client.infer("no-such-model", [item], client_timeout=30)
    finally:
        client.close()
    return latencies


def _health_serving(grpc_port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _scalar(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_prometheus_scrapes_the_server_and_evaluates_the_rules(tmp_path: Path, tiny_artifact: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip(f"prometheus is not installed; {INSTALL_HINT}")
    grpc_port, metrics_port, prom_port = _free_ports(3)

    # The PrometheusRule's groups, evaluated every second instead of every 30 s.
    groups = rule_groups(render("overlays/cpu"))
    for group in groups:
        group["interval"] = f"{SCRAPE_INTERVAL_S}s"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    # The labels the ServiceMonitor's scrape would attach in a cluster (job = Service name).
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "pruneserve",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    check = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr

    serve_cmd = [
        sys.executable, "-m", "pruneserve.cli", "serve", str(tiny_artifact),
        "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
        "--threads", "1", "--max-queue-delay-ms", "1", "--grace-seconds", "5", "--shadow-rate", "1",
    ]  # fmt: skip
    prom_cmd = [
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (
        _process(serve_cmd, tmp_path / "serve.log", env=env, cwd=tmp_path) as server,
        _process(prom_cmd, tmp_path / "prometheus.log", cwd=tmp_path) as prom_proc,
    ):
        try:
            _run_scenario(server, prom_proc, grpc_port, PromAPI(prom_port))
        except BaseException:
            for log in ("serve.log", "prometheus.log"):
                print(f"--- {log} ---\n{(tmp_path / log).read_text(errors='replace')[-4000:]}")
            raise
        # SIGTERM drains and exits cleanly (what Kubernetes does at pod deletion).
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def _run_scenario(
    server: subprocess.Popen[bytes], prom_proc: subprocess.Popen[bytes], grpc_port: int, api: PromAPI
) -> None:
    _wait_for("the server's health to be SERVING", lambda: _health_serving(grpc_port), 90, server)
    _wait_for("prometheus to be ready", api.ready, 60, prom_proc)
    _wait_for(
        "the first scrape of the server",
        lambda: api.query(f'up{{job="pruneserve",pod="{POD}"}} == 1'),
        60,
        prom_proc,
    )

    # Two bursts a few scrapes apart, so rate() sees the counter move inside its window.
    half = SUCCESSES // 2
    latencies = _send_requests(grpc_port, half)
    _wait_for(
        "a scrape after the first burst",
        lambda: api.query(f'pruneserve_requests_total{{outcome="success",model="{MODEL}"}} == {half}'),
        30,
    )
    latencies += _send_requests(grpc_port, SUCCESSES - half)
    successes = f'pruneserve_requests_total{{job="pruneserve",outcome="success",model="{MODEL}"}}'
    _wait_for("the scraped counter to reach every success", lambda: api.query(f"{successes} == {SUCCESSES}"), 30)

    # Exact counts: every request counted once, under its outcome.
    assert _scalar(api.query(successes)) == SUCCESSES
    not_found = api.query('sum(pruneserve_requests_total{job="pruneserve",outcome="not_found"})')
    assert _scalar(not_found) == 2  # the two bursts each sent one unknown-model request
    assert _scalar(api.query(f'sum(pruneserve_inferences_total{{model="{MODEL}"}})')) == SUCCESSES

    # rate(): positive, finite and no more than every success inside the window.
    rate = _scalar(api.query(f"sum(rate({successes}[30s]))"))
    assert 0 < rate <= SUCCESSES / 1.0
    # histogram_quantile(): ordered quantiles, inside the histogram's range, and no larger
    # than the slowest request seen by the client plus one bucket step.
    from pruneserve.server.metrics import DURATION_BUCKETS

    quantiles = {}
    for q in (0.5, 0.9, 0.99):
        expr = (
            f"histogram_quantile({q}, sum by (le) "
            f'(rate(pruneserve_request_duration_seconds_bucket{{job="pruneserve",model="{MODEL}"}}[1m])))'
        )
        quantiles[q] = _scalar(api.query(expr))
    assert all(math.isfinite(v) and 0 < v <= DURATION_BUCKETS[-1] for v in quantiles.values()), quantiles
    assert quantiles[0.5] <= quantiles[0.9] <= quantiles[0.99]
    bucket_above = next((b for b in DURATION_BUCKETS if b >= max(latencies)), DURATION_BUCKETS[-1])
    assert quantiles[0.99] <= bucket_above
    mean_batch = _scalar(
        api.query(
            f'sum(rate(pruneserve_inferences_total{{model="{MODEL}"}}[1m])) '
            f'/ sum(rate(pruneserve_executions_total{{model="{MODEL}"}}[1m]))'
        )
    )
    assert mean_batch >= 1.0

    # Every rule loaded and evaluated without error; the recording rules produce series.
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in api.get("/api/v1/rules")["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

    rules = _wait_for("one evaluation of every rule", evaluated, 30)
    expected = {r.get("alert") or r.get("record") for g in rule_groups(render("overlays/cpu")) for r in g["rules"]}
    assert {r["name"] for r in rules} == expected
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    alerts = {r["name"]: r for r in rules if r["type"] == "alerting"}
    assert alerts["PruneserveNoReadyPods"]["state"] == "inactive"  # the model is ready
    assert alerts["PruneserveHighErrorRatio"]["state"] == "inactive"  # not_found is the caller's error

    # Live fidelity: every request was shadowed on the (very different) reference model, so
    # the mean is under the manifest's floor and the alert is pending (its `for` not yet met).
    _wait_for(
        "shadow comparisons to be scraped",
        lambda: api.query(f'pruneserve_live_fidelity_count{{model="{MODEL}"}} > 0'),
        30,
    )
    assert _scalar(api.query(f'pruneserve_quality_floor{{model="{MODEL}"}}')) == QUALITY_FLOOR

    def fidelity_alert_state() -> str | None:
        rules = [r for g in api.get("/api/v1/rules")["groups"] for r in g["rules"]]
        state = next(r["state"] for r in rules if r["name"] == "PruneserveLiveFidelityBelowFloor")
        return state if state != "inactive" else None

    assert _wait_for("the live-fidelity alert to trip", fidelity_alert_state, 30) == "pending"
    _wait_for(
        "the recording rules to produce series",
        lambda: (
            api.query(f'pruneserve:requests:rate5m{{model="{MODEL}",outcome="success"}} > 0')
            and api.query(f'pruneserve:batch_size:mean_5m{{model="{MODEL}"}} >= 1')
        ),
        30,
    )

    # The dashboard's queries run (variables filled as Grafana would).
    for expr in dashboard_queries(dashboard()):
        if expr.startswith("label_values("):
            metric = expr[len("label_values(") :].rsplit(",", 1)[0].replace("$namespace", NAMESPACE)
            assert api.query(metric), expr
            continue
        filled = expr.replace("$namespace", NAMESPACE).replace("$model", ".*").replace("$__rate_interval", "1m")
        api.query(filled)  # status success, or PromAPI raises
    panel_p99 = next(
        e
        for e in dashboard_queries(dashboard())
        if "histogram_quantile(0.99, sum by (model, le) (rate(pruneserve_request" in e
    )
    assert api.query(
        panel_p99.replace("$namespace", NAMESPACE).replace("$model", ".*").replace("$__rate_interval", "1m")
    )

    # The HPA's custom metric, as prometheus-adapter would query it for this pod.
    rules_by_name = {r["name"]["as"]: r for r in adapter_values()["rules"]["custom"]}
    pending = api.query(adapter_query(rules_by_name["pruneserve_pending_requests"], namespace=NAMESPACE, pods=[POD]))
    assert [p["metric"] for p in pending] == [{"pod": POD}]
    assert float(pending[0]["value"][1]) == 0  # nothing queued once every request has returned
    per_second = api.query(
        adapter_query(rules_by_name["pruneserve_inferences_per_second"], namespace=NAMESPACE, pods=[POD])
    )
    assert [p["metric"] for p in per_second] == [{"pod": POD}] and float(per_second[0]["value"][1]) > 0
