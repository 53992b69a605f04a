"""SIGTERM / SIGINT under load: ``pruneserve serve`` in a subprocess, clients sending throughout.

Counts every request sent and how it ended: each one must be answered or refused with
UNAVAILABLE (never cancelled, failed or lost), the requests in flight when the signal
arrives must be answered, and the process must exit 0 within the grace period.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from serve_process import ServeProcess  # tests/server/serve_process.py, shared with tests/reliability

GRACE_S = 10.0
CLIENTS = 4


@dataclass
class Outcome:
    started: float
    ended: float
    code: str  # "OK" or the status code's name
    message: str = ""


@pytest.fixture
def serve_process(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(
        [embedding_artifact, classifier_artifact], "--max-queue-delay-ms", "50", "--grace-seconds", str(GRACE_S)
    )
    yield proc
    proc.close()


def client_loop(url: str, signalled: threading.Event, outcomes: list[Outcome]) -> None:
    """Send requests back to back; stop at the first refusal after the signal."""
    client = tc.InferenceServerClient(url)
    t = tc.InferInput("text", [2, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"hello world"], [b"the lazy dog"]], dtype=object))
    try:
        for _ in range(10_000):
            started = time.monotonic()
            try:
                result = client.infer("tiny-cls", [t], client_timeout=60)
                assert result.as_numpy("label").shape == (2, 1)
                outcomes.append(Outcome(started, time.monotonic(), "OK"))
            except InferenceServerException as exc:
                code = (exc.status() or "").removeprefix("StatusCode.")
                outcomes.append(Outcome(started, time.monotonic(), code, exc.message() or ""))
                if signalled.is_set() or code != "UNAVAILABLE":
                    return
    finally:
        client.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_under_load_answers_every_accepted_request(serve_process: ServeProcess, signum: int) -> None:
    url = serve_process.url
    signalled = threading.Event()
    per_client: list[list[Outcome]] = [[] for _ in range(CLIENTS)]
    threads = [threading.Thread(target=client_loop, args=(url, signalled, out), daemon=True) for out in per_client]
    for thread in threads:
        thread.start()
    # Let every client get answers before the signal.
    deadline = time.monotonic() + 60
    while min(len(o) for o in per_client) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    signal_at = time.monotonic()
    serve_process.proc.send_signal(signum)
    signalled.set()
    rc = serve_process.proc.wait(GRACE_S + 20)
    exited_after = time.monotonic() - signal_at
    for thread in threads:
        thread.join(30)

    outcomes = [o for out in per_client for o in out]
    answered = [o for o in outcomes if o.code == "OK"]
    refused = [o for o in outcomes if o.code == "UNAVAILABLE"]
    log = serve_process.log()
    assert rc == 0, log
    assert exited_after < GRACE_S + 5, log
    assert f"{signal.Signals(signum).name} received" in log
    # Every request sent was either answered or refused as UNAVAILABLE: none lost or failed.
    assert len(outcomes) == len(answered) + len(refused), [o for o in outcomes if o.code not in ("OK", "UNAVAILABLE")]
    assert all(o.code == "OK" for o in outcomes if o.ended < signal_at)
    # Requests in flight at the signal: those the server had accepted are answered (a request
    # still on the wire may instead arrive after draining began and be refused, which is fine).
    in_flight = [o for o in outcomes if o.started < signal_at < o.ended]
    assert any(o.code == "OK" for o in in_flight), "no accepted request was in flight at the signal"
    assert all(o.code == "OK" or "shutting down" in o.message for o in in_flight), in_flight
    # Every client saw the server go away (its last request refused), after the signal.
    assert all(out and out[-1].code == "UNAVAILABLE" and out[-1].ended > signal_at for out in per_client), per_client
    assert len(answered) >= 3 * CLIENTS
