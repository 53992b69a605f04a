"""Graceful shutdown over HTTP: readiness turns 503 and new requests are refused with 503 while
the request in flight is answered; then the listener closes."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from grpc_harness import ServerThread, make_config
from tiny_artifacts import gate_model

BODY = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello world"]}]}).encode()


def call(url: str, body: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_stop_finishes_the_http_request_in_flight_and_refuses_new_ones(embedding_artifact: Path) -> None:
    srv = ServerThread(make_config([embedding_artifact], grace_seconds=30.0))
    try:
        base = f"http://127.0.0.1:{srv.server.http_port}"
        gated = gate_model(srv.server.dataplane, "tiny-embed")
        gated.gate.clear()
        results: list[int] = []
        in_flight = threading.Thread(target=lambda: results.append(call(f"{base}/v2/models/tiny-embed/infer", BODY)))
        in_flight.start()
        assert gated.entered.wait(30), "the request never reached the engine"
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(30.0), srv.loop)
        # Draining: readiness and new requests get 503 while the gated request is still running.
        for _ in range(3000):
            if call(f"{base}/v2/health/ready") == 503:
                break
            threading.Event().wait(0.01)
        assert call(f"{base}/v2/health/ready") == 503
        assert call(f"{base}/v2/health/live") == 200
        assert call(f"{base}/v2/models/tiny-embed/infer", BODY) == 503
        assert not stopping.done()
        gated.gate.set()
        in_flight.join(60)
        assert results == [200]
        stopping.result(60)
        try:
            call(f"{base}/v2/health/live")
            raise AssertionError("the HTTP listener is still open after stop")
        except (urllib.error.URLError, ConnectionError):
            pass
    finally:
        srv.stop()
