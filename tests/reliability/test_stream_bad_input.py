"""Generated bad requests over ``ModelStreamInfer``: each answered on the stream, the stream goes on.

A unary call's failure ends only that call; on a stream a bad message must not end the
stream or disturb the good messages around it. The bad requests are the same 18 generated
kinds as ``tests/server/test_bad_input.py`` (imported from there, so both stay in step),
interleaved with good ones on one stream per example: every message must be answered exactly
once, under its own id, bad ones with an ``error_message`` that says what was wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_harness import ServerThread, make_config, serving, texts_request
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_bad_input import MAX_BATCH, MODELS, Case, assert_healthy, bad_requests

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc

EXAMPLES = 60


@pytest.fixture(scope="module")
def server(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact, classifier_artifact], max_batch_size=MAX_BATCH)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _stream(stub: pb_grpc.GRPCInferenceServiceStub, messages: list[pb.ModelInferRequest]) -> dict[str, list[pb.ModelStreamInferResponse]]:
    """Send ``messages`` on one stream and half-close it; replies grouped by id.

    The server answers everything it read before it ends the stream, so the replies are
    complete when the iterator ends.
    """
    replies: dict[str, list[pb.ModelStreamInferResponse]] = {}
    for reply in stub.ModelStreamInfer(iter(messages), timeout=60):
        replies.setdefault(reply.infer_response.id, []).append(reply)
    return replies


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(cases=st.lists(bad_requests, min_size=4, max_size=16), goods=st.lists(st.sampled_from(MODELS), min_size=1, max_size=6))
def test_bad_messages_on_a_stream_are_answered_in_place_and_the_stream_goes_on(
    stub: pb_grpc.GRPCInferenceServiceStub, cases: list[Case], goods: list[str]
) -> None:
    messages: list[pb.ModelInferRequest] = []
    expected: dict[str, Case | None] = {}
    for i, case in enumerate(cases):
        case.request.id = f"bad-{i}"
        messages.append(case.request)
        expected[case.request.id] = case
        if i < len(goods):  # interleave good messages between the bad ones
            good = texts_request([b"hello world", b"good dog"], model=goods[i])
            good.id = f"good-{i}"
            messages.append(good)
            expected[good.id] = None
    note(f"{len(cases)} bad, {len(messages) - len(cases)} good: {[c.kind for c in cases]}")
    replies = _stream(stub, messages)
    assert sorted(replies) == sorted(expected), "a message went unanswered or was answered under another id"
    for rid, case in expected.items():
        [reply] = replies[rid]
        if case is None:
            assert not reply.error_message, reply.error_message
            assert list(reply.infer_response.outputs[0].shape)[0] == 2
        else:
            assert reply.error_message, f"{case.kind} was answered as if it were good"
            assert any(n in reply.error_message for n in case.needles), (case.kind, reply.error_message)
            assert "Traceback" not in reply.error_message and len(reply.error_message) < 600


def test_server_is_healthy_after_the_streams(server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert_healthy(server, stub)
