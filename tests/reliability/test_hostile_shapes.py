"""Hostile declared shapes: enormous or overflowing dimensions with tiny contents.

A shape is a client-controlled promise; the contents are what actually arrived. The server
must compare the two before acting on the promise: every such request is INVALID_ARGUMENT
(not INTERNAL) and costs memory in proportion to the message, not to the declared shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_harness import ServerThread, make_config, serving
from serve_process import ServeProcess

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc

HUGE = 2**63 - 1
# (datatype, encoding, shape) the server already refuses as INVALID_ARGUMENT.
REFUSED = [
    ("BYTES", "typed", [2**32, 2**32]),
    ("BYTES", "typed", [2**21, 2**21, 2**21]),
    ("INT64", "raw", [2**32, 2**32]),
    ("INT64", "raw", [4, 2**62]),
    ("INT64", "typed", [HUGE, 2]),
    ("BYTES", "raw", [0, 2**40]),
]
# Refused since the fix in server/servicer.py (the element count is bounded and compared
# with the buffer before anything is allocated or reshaped).
REFUSED_AFTER_FIX = [
    ("BYTES", "raw", [2**62, 4]),
    ("BYTES", "raw", [1, 2**32, 2**32]),
    ("BYTES", "raw", [2**21, 2**21, 2**21]),
    ("BYTES", "raw", [0, HUGE]),
    ("INT64", "raw", [HUGE, 0]),
    ("INT64", "typed", [0, HUGE]),
]


@pytest.fixture(scope="module")
def server(embedding_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact])) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _request(datatype: str, encoding: str, shape: list[int], raw: bytes = b"") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-embed")
    tensor = request.inputs.add(name="text" if datatype == "BYTES" else "input_ids", datatype=datatype, shape=shape)
    if encoding == "raw":
        request.raw_input_contents.append(raw)
    elif 0 in shape:
        pass  # a zero-element shape with no contents is self-consistent: only the shape is hostile
    elif datatype == "BYTES":
        tensor.contents.bytes_contents.append(b"hello")
    else:
        tensor.contents.int64_contents.extend([5, 6])
    return request


@pytest.mark.parametrize(("datatype", "encoding", "shape"), REFUSED + REFUSED_AFTER_FIX)
def test_enormous_declared_shape_is_invalid_argument(
    server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub, datatype: str, encoding: str, shape: list[int]
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_request(datatype, encoding, shape), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_declared_text_count_costs_no_memory_beyond_the_message(embedding_artifact: Path) -> None:
    server = ServeProcess([embedding_artifact])
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            before = server.peak_rss()
            # One empty text (a zero length prefix) in a message that declares 2**25 of them.
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_request("BYTES", "raw", [2**25, 1], raw=b"\0\0\0\0"), timeout=60)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            growth = server.peak_rss() - before
    finally:
        server.close()
    assert growth < 64 * 2**20, f"a 4-byte request raised the server's peak RSS by {growth / 2**20:.0f} MiB"
