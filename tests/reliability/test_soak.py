"""A bounded soak: ``pruneserve serve`` in a subprocess under steady concurrent load for a fixed time.

Six clients of three kinds (tritonclient unary, our :class:`InferenceClient`, a raw
``ModelStreamInfer`` stream) send mixed batches to both tiny models on 127.0.0.1 for
``SOAK_SECONDS`` (default 20, ``PRUNESERVE_SOAK_SECONDS`` to change it), each capped at a
request count, then stop by themselves. Checked: no request failed, every request sent was
answered (and the server's own statistics agree), every answer equals the answer the same
text got alone (no cross-talk between batch-mates), and the server's RSS after warm-up stays
flat. Then SIGTERM: exit 0.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tc
from grpc_harness import texts_request
from serve_process import ServeProcess

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc
from pruneserve.server.client import InferenceClient, decode_outputs

SOAK_SECONDS = float(os.environ.get("PRUNESERVE_SOAK_SECONDS", "20"))
MAX_REQUESTS_PER_CLIENT = 20_000
WARM_UP_FRACTION = 0.3
#: Allowed RSS growth from the end of warm-up to the end: allocator and arena noise, far
#: below what a per-request leak over thousands of requests would add.
RSS_GROWTH_LIMIT = 48 * 2**20
TEXTS = (b"hello world", b"the quick brown fox", b"good dog", b"a very small red cat runs", b"sad", b"happy blue")


@dataclass
class Tally:
    """What one client sent and how each request ended."""

    name: str
    sent: int = 0
    answered: int = 0
    errors: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)


@pytest.fixture
def serve_process(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServeProcess]:
    proc = ServeProcess(
        [embedding_artifact, classifier_artifact],
        "--max-batch-size", "8", "--max-queue-delay-ms", "2", "--max-queue-size", "256", "--grace-seconds", "10",
    )  # fmt: skip
    yield proc
    proc.close()


def _expected(url: str) -> dict[tuple[str, bytes], np.ndarray]:
    """Each text's answer from each model, asked alone (the fp32 artifacts are batch-invariant)."""
    out: dict[tuple[str, bytes], np.ndarray] = {}
    with InferenceClient(url) as client:
        for text in TEXTS:
            out[("tiny-embed", text)] = client.infer_text("tiny-embed", [text.decode()])["embedding"][0]
            out[("tiny-cls", text)] = client.infer_text("tiny-cls", [text.decode()])["logits"][0]
    return out


def _check(tally: Tally, model: str, texts: list[bytes], output: np.ndarray, expected: dict) -> None:  # type: ignore[type-arg]
    for text, row in zip(texts, output, strict=True):
        if not np.allclose(row, expected[(model, text)], atol=1e-5):
            tally.wrong.append(f"{model} {text!r}")


def _pick(rng: np.random.Generator) -> tuple[str, list[bytes]]:
    model = "tiny-embed" if rng.random() < 0.5 else "tiny-cls"
    return model, [TEXTS[i] for i in rng.integers(0, len(TEXTS), int(rng.integers(1, 5)))]


def triton_client(url: str, stop_at: float, expected: dict, tally: Tally, seed: int) -> None:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    client = tc.InferenceServerClient(url)
    try:
        while time.monotonic() < stop_at and tally.sent < MAX_REQUESTS_PER_CLIENT:
            model, texts = _pick(rng)
            t = tc.InferInput("text", [len(texts), 1], "BYTES")
            t.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
            tally.sent += 1
            try:
                result = client.infer(model, [t], client_timeout=60)
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                tally.errors.append(repr(exc))
                continue
            tally.answered += 1
            _check(tally, model, texts, result.as_numpy("embedding" if model == "tiny-embed" else "logits"), expected)
    finally:
        client.close()


def our_client(url: str, stop_at: float, expected: dict, tally: Tally, seed: int) -> None:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    with InferenceClient(url, timeout=60) as client:
        while time.monotonic() < stop_at and tally.sent < MAX_REQUESTS_PER_CLIENT:
            model, texts = _pick(rng)
            tally.sent += 1
            try:
                outputs = client.infer_text(model, [t.decode() for t in texts])
            except Exception as exc:  # noqa: BLE001
                tally.errors.append(repr(exc))
                continue
            tally.answered += 1
            _check(tally, model, texts, outputs["embedding" if model == "tiny-embed" else "logits"], expected)


def stream_client(url: str, stop_at: float, expected: dict, tally: Tally, seed: int) -> None:  # type: ignore[type-arg]
    """One long ModelStreamInfer stream: send a request, read its answer, repeat."""
    rng = np.random.default_rng(seed)
    outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    in_flight: dict[str, tuple[str, list[bytes]]] = {}

    def requests() -> Iterator[pb.ModelInferRequest]:
        while (item := outbox.get()) is not None:
            yield item

    def send_next() -> bool:
        if time.monotonic() >= stop_at or tally.sent >= MAX_REQUESTS_PER_CLIENT:
            outbox.put(None)
            return False
        model, texts = _pick(rng)
        request = texts_request(texts, model=model)
        request.id = f"s{tally.sent}"
        in_flight[request.id] = (model, texts)
        tally.sent += 1
        outbox.put(request)
        return True

    with grpc.insecure_channel(url) as channel:
        responses = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=SOAK_SECONDS + 120)
        send_next()
        try:
            for response in responses:
                if response.error_message:
                    tally.errors.append(response.error_message)
                    in_flight.pop(response.infer_response.id, None)
                else:
                    model, texts = in_flight.pop(response.infer_response.id)
                    tally.answered += 1
                    decoded = decode_outputs(response.infer_response)
                    _check(tally, model, texts, decoded["embedding" if model == "tiny-embed" else "logits"], expected)
                if not send_next():
                    break
        except grpc.RpcError as exc:
            tally.errors.append(f"stream ended: {exc.code().name} {exc.details()}")
        finally:
            outbox.put(None)
    if in_flight:
        tally.errors.append(f"stream requests never answered: {sorted(in_flight)}")


def _server_successes(url: str) -> int:
    client = tc.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])


def test_soak_concurrent_clients_no_errors_every_request_answered_flat_memory(serve_process: ServeProcess) -> None:
    url = serve_process.url
    expected = _expected(url)
    baseline = _server_successes(url)
    server = psutil.Process(serve_process.proc.pid)
    kinds = [triton_client, triton_client, triton_client, our_client, our_client, stream_client]
    tallies = [Tally(f"{kind.__name__}-{i}") for i, kind in enumerate(kinds)]
    started = time.monotonic()
    stop_at = started + SOAK_SECONDS
    threads = [
        threading.Thread(target=kind, args=(url, stop_at, expected, tally, i), daemon=True)
        for i, (kind, tally) in enumerate(zip(kinds, tallies, strict=True))
    ]
    for thread in threads:
        thread.start()

    samples: list[tuple[float, int]] = []
    while any(t.is_alive() for t in threads) and time.monotonic() < stop_at + 120:
        samples.append((time.monotonic() - started, server.memory_info().rss))
        time.sleep(0.5)
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads), "a client did not stop by itself"
    samples.append((time.monotonic() - started, server.memory_info().rss))

    sent = sum(t.sent for t in tallies)
    answered = sum(t.answered for t in tallies)
    errors = [f"{t.name}: {e}" for t in tallies for e in t.errors]
    wrong = [f"{t.name}: {w}" for t in tallies for w in t.wrong]
    assert errors == [], errors[:10]
    assert answered == sent, {t.name: (t.sent, t.answered) for t in tallies}
    assert wrong == [], wrong[:10]
    assert all(t.answered > 0 for t in tallies), {t.name: t.answered for t in tallies}
    # The server counted exactly the requests the clients saw answered: none lost or doubled.
    assert _server_successes(url) - baseline == answered

    after_warm_up = [rss for t, rss in samples if t >= WARM_UP_FRACTION * SOAK_SECONDS]
    assert len(after_warm_up) >= 4, samples
    growth = max(after_warm_up) - after_warm_up[0]
    mib = [round(rss / 2**20, 1) for _, rss in samples]
    print(
        f"\nsoak: {SOAK_SECONDS:.0f} s, {len(tallies)} clients, {sent} requests sent, {answered} answered, "
        f"0 errors; server RSS after warm-up {after_warm_up[0] / 2**20:.1f} MiB, growth {growth / 2**20:.1f} MiB "
        f"(samples, MiB: {mib[0]} .. {mib[-1]})"
    )
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth / 2**20:.1f} MiB after warm-up: {mib}"

    serve_process.proc.send_signal(signal.SIGTERM)
    assert serve_process.proc.wait(30) == 0, serve_process.log()
