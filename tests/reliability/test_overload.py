"""Overload over a real socket: a flood past ``max_queue_size`` is refused at once, cancelled work is dropped.

The engine is held by :class:`tiny_artifacts.GatedEngine` (its runs block until the test opens
the gate), so "at once" is proven by order, not by a clock: every refusal has arrived while
the batch that holds the server up is still blocked, and liveness, readiness, metadata and
health are answered meanwhile. Nothing here asserts a duration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_harness import ServerThread, make_config, serving, texts_request
from tiny_artifacts import VOCAB, gate_model

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc

MAX_QUEUE = 4
FLOOD = 40


@pytest.fixture
def server(embedding_artifact: Path) -> Iterator[ServerThread]:
    config = make_config([embedding_artifact], max_queue_size=MAX_QUEUE, max_batch_size=MAX_QUEUE, max_queue_delay_ms=0.0)
    with serving(config) as srv:
        yield srv


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _wait(predicate: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _requests_with_outcome(server: ServerThread, outcome: str) -> float:
    registry = server.server.dataplane.metrics.registry
    return sum(
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "pruneserve_requests_total" and s.labels.get("outcome") == outcome
    )


def test_flood_past_the_queue_is_refused_while_the_queue_is_still_blocked(
    server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    dp = server.server.dataplane
    engine = gate_model(dp, "tiny-embed")
    engine.gate.clear()
    blocker = stub.ModelInfer.future(texts_request([b"hello"]), timeout=60)
    assert engine.entered.wait(30), "the first request never reached the engine"

    flood = [stub.ModelInfer.future(texts_request([b"the quick brown fox"]), timeout=60) for _ in range(FLOOD)]
    # Exactly MAX_QUEUE of the flood fit in the queue; every other one must be answered
    # while the engine is still blocked, i.e. without waiting behind the queue.
    _wait(lambda: sum(f.done() for f in flood) >= FLOOD - MAX_QUEUE, "the surplus to be refused")
    refused = [f for f in flood if f.done()]
    waiting = [f for f in flood if not f.done()]
    assert not engine.gate.is_set() and not blocker.done()
    assert len(refused) == FLOOD - MAX_QUEUE and len(waiting) == MAX_QUEUE
    assert dp.batcher("tiny-embed").pending == MAX_QUEUE
    for f in refused:
        error = f.exception()
        assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"max_queue_size {MAX_QUEUE}" in (error.details() or "")
    # Overload of the data plane never blocks the control plane: probes are answered meanwhile.
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ModelReady(pb.ModelReadyRequest(name="tiny-embed"), timeout=10).ready
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny-embed"), timeout=10).name == "tiny-embed"
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not engine.gate.is_set() and not blocker.done()

    engine.gate.set()
    # Everything accepted is answered, correctly shaped: nothing lost, nothing failed.
    for f in [blocker, *waiting]:
        response = f.result(timeout=60)
        assert isinstance(response, pb.ModelInferResponse) and list(response.outputs[0].shape) == [1, 8]
    assert engine.batch_sizes == [1, MAX_QUEUE]  # the queued four ran together, once
    assert _requests_with_outcome(server, "resource_exhausted") == FLOOD - MAX_QUEUE
    assert _requests_with_outcome(server, "success") == 1 + MAX_QUEUE
    # The server is back to normal: new requests queue and run again.
    assert len(stub.ModelInfer(texts_request([b"good dog"]), timeout=30).outputs) == 1


def test_a_client_that_cancels_while_queued_is_dropped_not_computed(
    server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    dp = server.server.dataplane
    engine = gate_model(dp, "tiny-embed")
    engine.gate.clear()
    blocker = stub.ModelInfer.future(texts_request([b"hello"]), timeout=60)
    assert engine.entered.wait(30)
    queued = stub.ModelInfer.future(texts_request([b"cat"]), timeout=60)
    kept = stub.ModelInfer.future(texts_request([b"dog"]), timeout=60)
    _wait(lambda: dp.batcher("tiny-embed").pending == 2, "two queued requests")
    assert queued.cancel()
    # The server has seen the cancellation once it counts the request as cancelled.
    _wait(lambda: _requests_with_outcome(server, "cancelled") == 1, "the server to see the cancellation")
    engine.gate.set()
    assert len(blocker.result(timeout=60).outputs) == 1
    assert len(kept.result(timeout=60).outputs) == 1
    _wait(lambda: dp.batcher("tiny-embed").pending == 0, "the queue to empty")
    cat, dog = VOCAB["cat"], VOCAB["dog"]
    assert not any((run["input_ids"] == cat).any() for run in engine.runs), "cancelled work reached the engine"
    assert any((run["input_ids"] == dog).any() for run in engine.runs)


def test_queued_requests_past_their_deadline_are_answered_and_never_computed(
    server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    dp = server.server.dataplane
    engine = gate_model(dp, "tiny-embed")
    engine.gate.clear()
    blocker = stub.ModelInfer.future(texts_request([b"hello"]), timeout=60)
    assert engine.entered.wait(30)
    # A full queue of short-deadline requests: each must end DEADLINE_EXCEEDED on its own,
    # while the engine is still blocked, and free its queue slot.
    expiring = [stub.ModelInfer.future(texts_request([b"cat"]), timeout=0.5) for _ in range(MAX_QUEUE)]
    for f in expiring:
        error = f.exception(timeout=30)
        assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert not engine.gate.is_set()
    engine.gate.set()
    assert len(blocker.result(timeout=60).outputs) == 1
    _wait(lambda: dp.batcher("tiny-embed").pending == 0, "the queue to empty")
    assert not any((run["input_ids"] == VOCAB["cat"]).any() for run in engine.runs)
    # The slots the expired requests held are free again: a full queue's worth is accepted.
    answers = [stub.ModelInfer.future(texts_request([b"dog"]), timeout=60) for _ in range(MAX_QUEUE)]
    assert all(len(f.result(timeout=60).outputs) == 1 for f in answers)
