"""Client-supplied strings echoed in error messages and log lines stay short, whatever their size.

A refusal names what was wrong ("unknown model 'x'"), so it quotes the client. Quoting a
100 kB name verbatim breaks the refusal itself: the status message travels in a gRPC trailer,
and clients drop trailers over their metadata limit (8 kB by default), so the caller sees
RESOURCE_EXHAUSTED "Stream removed" instead of the answer, and every such request writes a
100 kB line to the server log. Each case here must get its proper code with a short message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_harness import ServerThread, make_config, serving, texts_request

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc

LONG = 100_000
MAX_DETAILS = 1024
MAX_LOG_LINE = 4096


def _long_model() -> pb.ModelInferRequest:
    return texts_request([b"hi"], model="m" * LONG)


def _long_version() -> pb.ModelInferRequest:
    request = texts_request([b"hi"])
    request.model_version = "9" * LONG
    return request


def _long_input_name() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-embed")
    request.inputs.add(name="x" * LONG, datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hi")
    return request


def _long_datatype() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny-embed")
    request.inputs.add(name="text", datatype="B" * LONG, shape=[1, 1]).contents.bytes_contents.append(b"hi")
    return request


def _many_outputs() -> pb.ModelInferRequest:
    request = texts_request([b"hi"])
    for i in range(2000):
        request.outputs.add(name=f"output-{i:04d}-" + "o" * 40)
    return request


CASES: dict[str, tuple[Callable[[], pb.ModelInferRequest], grpc.StatusCode]] = {
    "100 kB model name": (_long_model, grpc.StatusCode.NOT_FOUND),
    "100 kB version": (_long_version, grpc.StatusCode.NOT_FOUND),
    "100 kB input name": (_long_input_name, grpc.StatusCode.INVALID_ARGUMENT),
    "100 kB datatype": (_long_datatype, grpc.StatusCode.INVALID_ARGUMENT),
    "2000 unknown outputs": (_many_outputs, grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.fixture(scope="module")
def server(embedding_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact])) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal_quoting_a_huge_client_value_keeps_its_code_and_stays_short(
    stub: pb_grpc.GRPCInferenceServiceStub, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    build, code = CASES[case]
    with caplog.at_level(logging.INFO, logger="pruneserve"), pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(build(), timeout=30)
    details = err.value.details() or ""
    assert err.value.code() is code, f"{err.value.code().name}: {details[:200]}"
    assert len(details) <= MAX_DETAILS, len(details)
    longest = max((len(r.getMessage()) for r in caplog.records), default=0)
    assert longest <= MAX_LOG_LINE, f"a {longest}-character log line"


def test_short_names_are_still_quoted_in_full(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """The bound must not cost the ordinary message its precision."""
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(texts_request([b"hi"], model="no-such-model-name-0123456789"), timeout=30)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert "no-such-model-name-0123456789" in (err.value.details() or "")
