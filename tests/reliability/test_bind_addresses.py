"""The gRPC and metrics listeners bind exactly the addresses configured, each on its own.

On Linux every 127.0.0.0/8 address is local, so a server bound to 127.0.0.2 must answer
there and refuse connections to the same port on 127.0.0.1: that proves the bind address
is honoured rather than widened to all interfaces. The metrics endpoint gets a third
address. IPv6 loopback is checked with the literal as an operator would write it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_harness import make_config, serving

from pruneserve.server.client import InferenceClient


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` is accepted."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_grpc_and_metrics_listen_only_on_their_configured_addresses(embedding_artifact: Path) -> None:
    metrics_port = _free_port("127.0.0.3")
    config = make_config(
        [embedding_artifact], host="127.0.0.2", metrics_host="127.0.0.3", metrics_port=metrics_port
    )
    with serving(config) as srv:
        srv.server.start_metrics_endpoint()
        assert srv.server.address == f"127.0.0.2:{srv.port}"
        with InferenceClient(f"127.0.0.2:{srv.port}", timeout=10) as client:
            assert client.infer_text("tiny-embed", ["hello world"])["embedding"].shape == (1, 8)
        assert not _accepts("127.0.0.1", srv.port), "gRPC answered on an address it was not configured for"
        assert not _accepts("127.0.0.3", srv.port)

        body = urllib.request.urlopen(f"http://127.0.0.3:{metrics_port}/metrics", timeout=10).read().decode()
        assert "pruneserve_requests_total" in body
        assert not _accepts("127.0.0.1", metrics_port), "metrics answered on an address it was not configured for"
        assert not _accepts("127.0.0.2", metrics_port)


def test_metrics_port_zero_picks_a_free_port_and_no_metrics_serves_none(embedding_artifact: Path) -> None:
    with serving(make_config([embedding_artifact], metrics_host="127.0.0.3", metrics_port=0)) as srv:
        srv.server.start_metrics_endpoint()
        port = srv.server.metrics_port
        assert port  # bound, on a port the OS chose
        body = urllib.request.urlopen(f"http://127.0.0.3:{port}/metrics", timeout=10).read().decode()
        assert "pruneserve_requests_total" in body
    with serving(make_config([embedding_artifact], metrics=False)) as srv:
        srv.server.start_metrics_endpoint()
        assert srv.server.metrics_port is None


def test_serve_command_binds_the_flags_addresses(embedding_artifact: Path) -> None:
    """The same through ``pruneserve serve --host/--metrics-host`` in a subprocess."""
    grpc_port, metrics_port = _free_port("127.0.0.2"), _free_port("127.0.0.3")
    cmd = [
        sys.executable, "-m", "pruneserve.cli", "serve", str(embedding_artifact), "--threads", "1",
        "--host", "127.0.0.2", "--grpc-port", str(grpc_port), "--http-port", "0",
        "--metrics-host", "127.0.0.3", "--metrics-port", str(metrics_port), "--grace-seconds", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.2:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        urllib.request.urlopen(f"http://127.0.0.3:{metrics_port}/metrics", timeout=10).read()
        assert not _accepts("127.0.0.1", grpc_port)
        assert not _accepts("127.0.0.1", metrics_port)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"gRPC listening on 127.0.0.2:{grpc_port}" in err


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv6_loopback_literal_binds_grpc_and_metrics(embedding_artifact: Path) -> None:
    metrics_port = _free_port("::1")
    config = make_config([embedding_artifact], host="::1", metrics_host="::1", metrics_port=metrics_port)
    with serving(config) as srv:
        srv.server.start_metrics_endpoint()
        with InferenceClient(f"[::1]:{srv.port}", timeout=10) as client:
            assert client.infer_text("tiny-embed", ["hello"])["embedding"].shape == (1, 8)
        assert not _accepts("127.0.0.1", srv.port)
        urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=10).read()
