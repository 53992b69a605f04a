"""grpc.health.v1 reporting and the in-process half of graceful shutdown.

The shutdown test holds one request inside the engine (``GatedEngine``), starts the
shutdown, and checks, in order: health is NOT_SERVING, a new RPC is refused with
UNAVAILABLE while the held one is still running, and the held one is answered once it may
finish.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_harness import ServerThread, make_config, serving, texts_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny_artifacts import gate_model

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def server(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact, classifier_artifact], grace_seconds=20.0)) as srv:
        yield srv


def check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_reports_the_server_the_service_and_each_model(server: ServerThread) -> None:
    with grpc.insecure_channel(server.url) as ch:
        for service in ("", "inference.GRPCInferenceService", "tiny-embed", "tiny-cls"):
            assert check(ch, service) == SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            check(ch, "no-such-model")
        assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_shutdown_flips_health_refuses_new_rpcs_and_finishes_in_flight(server: ServerThread) -> None:
    engine = gate_model(server.server.dataplane, "tiny-embed")
    engine.gate.clear()
    held: list[object] = []

    def send_held() -> None:
        with grpc.insecure_channel(server.url) as ch:
            try:
                held.append(pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(texts_request([b"hello"]), timeout=60))
            except grpc.RpcError as exc:
                held.append(exc)

    sender = threading.Thread(target=send_held, daemon=True)
    sender.start()
    assert engine.entered.wait(30)

    with grpc.insecure_channel(server.url) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == SERVING
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(20.0), server.loop)
        assert next(watch).status == NOT_SERVING  # watchers hear it without polling
        for service in ("", "tiny-embed", "tiny-cls"):
            assert check(ch, service) == NOT_SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(texts_request([b"world"]), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert not held and not stopping.done()  # the held request is still running, shutdown waits for it
        watch.cancel()

    engine.gate.set()
    sender.join(30)
    stopping.result(30)
    assert isinstance(held[0], pb.ModelInferResponse), held
    assert len(held[0].outputs) == 1


def test_grace_bounds_the_wait_for_stuck_requests(embedding_artifact: Path) -> None:
    with serving(make_config([embedding_artifact])) as srv:
        engine = gate_model(srv.server.dataplane, "tiny-embed")
        engine.gate.clear()
        held: list[object] = []

        def send_held() -> None:
            with grpc.insecure_channel(srv.url) as ch:
                try:
                    held.append(pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(texts_request([b"hello"]), timeout=60))
                except grpc.RpcError as exc:
                    held.append(exc)

        sender = threading.Thread(target=send_held, daemon=True)
        sender.start()
        assert engine.entered.wait(30)
        # The engine never finishes within the grace: stop must still return, failing the request.
        srv.call(srv.server.stop(0.5), timeout=30)
        sender.join(30)
        engine.gate.set()
        assert isinstance(held[0], grpc.RpcError)
        assert held[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def test_shutdown_ends_idle_open_streams_instead_of_waiting_out_the_grace(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    def requests(first_answered: threading.Event) -> Iterator[pb.ModelInferRequest]:
        yield texts_request([b"hello"])
        first_answered.wait(30)
        # Keep the stream open and idle, like a client between bursts, until the test ends it.
        release.wait(60)

    release = threading.Event()
    answered = threading.Event()
    replies: list[pb.ModelStreamInferResponse] = []
    with grpc.insecure_channel(server.url) as ch:
        stream = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(requests(answered), timeout=60)
        replies.append(next(stream))
        answered.set()
        with caplog.at_level("WARNING", logger="pruneserve.server.app"):
            # grace_seconds is 20: without ending the stream, stop would wait all of it and warn.
            server.call(server.server.stop(20.0), timeout=60)
        rest = list(stream)  # the server ended the stream cleanly (no error raised)
        release.set()
    assert not replies[0].error_message and len(replies[0].infer_response.outputs) == 1
    assert rest == []
    assert not [r for r in caplog.records if "ran out" in r.getMessage()]
