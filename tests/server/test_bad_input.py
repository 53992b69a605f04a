"""Property tests: generated ModelInfer requests across the whole bad-input space.

Each strategy builds one kind of malformed request together with the status code and the
words its message must contain. The server must answer every one with that code and a
short, specific message, keep serving good requests afterwards, and keep its memory
bounded across thousands of bad requests.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_harness import ServerThread, make_config, serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from tiny_artifacts import MAX_LEN, VOCAB, WORDS

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc
from pruneserve.server.servicer import serialize_bytes_tensor
from pruneserve.server.types import DATATYPE_TO_NUMPY

MAX_BATCH = 4
MODELS = ("tiny-embed", "tiny-cls")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass
class Case:
    """A bad request, the status it must get, and words (any one suffices) its message must hold."""

    kind: str
    request: pb.ModelInferRequest
    code: grpc.StatusCode
    needles: tuple[str, ...]


# -- building blocks --------------------------------------------------------------------------
models = st.sampled_from(MODELS)
sentences = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
batch = st.integers(1, MAX_BATCH)


def _request(model: str) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model)


def _add_raw(request: pb.ModelInferRequest, name: str, datatype: str, shape: list[int], raw: bytes) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)


def _texts(model: str, texts: list[bytes], shape: list[int] | None = None) -> pb.ModelInferRequest:
    request = _request(model)
    _add_raw(request, "text", "BYTES", shape if shape is not None else [len(texts), 1], serialize_bytes_tensor(texts))
    return request


# -- one strategy per kind of mistake -------------------------------------------------------------
@st.composite
def wrong_text_dtype(draw: st.DrawFn) -> Case:
    datatype = draw(st.sampled_from(["INT64", "INT32", "FP32", "FP64", "BOOL", "UINT8", "FP16"]))
    n = draw(batch)
    size = n * DATATYPE_TO_NUMPY[datatype].itemsize
    request = _request(draw(models))
    _add_raw(request, "text", datatype, [n, 1], draw(st.binary(min_size=size, max_size=size)))
    return Case("text-dtype", request, INVALID, ("must be BYTES",))


@st.composite
def wrong_ids_dtype(draw: st.DrawFn) -> Case:
    datatype = draw(st.sampled_from(["FP32", "FP64", "BOOL", "FP16"]))
    b, s = draw(batch), draw(st.integers(1, 8))
    size = b * s * DATATYPE_TO_NUMPY[datatype].itemsize
    request = _request(draw(models))
    _add_raw(request, "input_ids", datatype, [b, s], draw(st.binary(min_size=size, max_size=size)))
    return Case("ids-dtype", request, INVALID, ("must be INT64",))


@st.composite
def unknown_datatype(draw: st.DrawFn) -> Case:
    datatype = draw(
        st.text(string.ascii_letters + string.digits, max_size=8).filter(lambda d: d not in DATATYPE_TO_NUMPY)
    )
    request = _request(draw(models))
    request.inputs.add(name="text", datatype=datatype, shape=[1, 1]).contents.bytes_contents.append(b"hello")
    return Case("unknown-datatype", request, INVALID, ("unknown datatype",))


@st.composite
def typed_count_mismatch(draw: st.DrawFn) -> Case:
    declared, actual = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    if declared == actual:
        actual += 1
    request = _request(draw(models))
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[declared, 1])
    tensor.contents.bytes_contents.extend(draw(sentences).encode() for _ in range(actual))
    return Case("typed-count", request, INVALID, (f"holds {actual}",))


@st.composite
def raw_bytes_count_mismatch(draw: st.DrawFn) -> Case:
    declared, actual = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    if declared == actual:
        actual += 1
    texts = [draw(sentences).encode() for _ in range(actual)]
    return Case(
        "raw-bytes-count", _texts(draw(models), texts, [declared, 1]), INVALID, ("end after", "bytes after the")
    )


@st.composite
def hostile_length_prefix(draw: st.DrawFn) -> Case:
    claimed = draw(st.integers(64, 2**32 - 1))
    body = draw(st.binary(max_size=32))
    raw = claimed.to_bytes(4, "little") + body
    request = _request(draw(models))
    _add_raw(request, "text", "BYTES", [1, 1], raw)
    return Case("hostile-length", request, INVALID, ("declares",))


@st.composite
def raw_length_mismatch(draw: st.DrawFn) -> Case:
    b, s = draw(batch), draw(st.integers(1, 8))
    size = draw(st.integers(0, 2 * b * s * 8).filter(lambda n: n != b * s * 8))
    request = _request(draw(models))
    _add_raw(request, "input_ids", "INT64", [b, s], bytes(size))
    return Case("raw-length", request, INVALID, (f"need {b * s * 8}",))


@st.composite
def negative_dim(draw: st.DrawFn) -> Case:
    shape = [draw(st.integers(-(2**40), -1)), draw(st.integers(-3, 3))]
    request = _request(draw(models))
    request.inputs.add(name="text", datatype="BYTES", shape=draw(st.permutations(shape)))
    return Case("negative-dim", request, INVALID, (">= 0",))


@st.composite
def empty_batch(draw: st.DrawFn) -> Case:
    request = _request(draw(models))
    if draw(st.booleans()):
        _add_raw(request, "text", "BYTES", [0, 1], b"")
    else:
        _add_raw(request, "input_ids", "INT64", [0, draw(st.integers(1, 8))], b"")
    return Case("empty-batch", request, INVALID, ("empty batch",))


@st.composite
def batch_over_limit(draw: st.DrawFn) -> Case:
    n = draw(st.integers(MAX_BATCH + 1, MAX_BATCH + 12))
    return Case("batch-over-limit", _texts(draw(models), [b"hello"] * n), INVALID, (f"max_batch_size is {MAX_BATCH}",))


@st.composite
def text_too_long(draw: st.DrawFn) -> Case:
    words = draw(st.lists(st.sampled_from(WORDS), min_size=MAX_LEN, max_size=MAX_LEN + 40))
    texts = [draw(sentences).encode() for _ in range(draw(st.integers(0, MAX_BATCH - 1)))]
    texts.insert(draw(st.integers(0, len(texts))), " ".join(words).encode())
    return Case("text-too-long", _texts(draw(models), texts), INVALID, (f"at most {MAX_LEN}",))


@st.composite
def non_utf8(draw: st.DrawFn) -> Case:
    # These bytes never occur in UTF-8, whatever surrounds them.
    never_utf8 = draw(st.sampled_from([b"\xc0", b"\xc1", b"\xf8", b"\xfe", b"\xff"]))
    bad = draw(st.binary(max_size=8)) + never_utf8 + draw(st.binary(max_size=8))
    texts = [draw(sentences).encode() for _ in range(draw(st.integers(0, MAX_BATCH - 1)))]
    texts.insert(draw(st.integers(0, len(texts))), bad)
    return Case("non-utf8", _texts(draw(models), texts), INVALID, ("UTF-8",))


@st.composite
def ids_out_of_vocab(draw: st.DrawFn) -> Case:
    b, s = draw(batch), draw(st.integers(1, MAX_LEN))
    ids = np.array(draw(st.lists(st.integers(0, len(VOCAB) - 1), min_size=b * s, max_size=b * s)), dtype="<i8").reshape(
        b, s
    )
    bad = draw(st.one_of(st.integers(len(VOCAB), 2**62), st.integers(-(2**62), -1)))
    ids[draw(st.integers(0, b - 1)), draw(st.integers(0, s - 1))] = bad
    request = _request(draw(models))
    _add_raw(request, "input_ids", "INT64", [b, s], ids.tobytes())
    if draw(st.booleans()):
        _add_raw(request, "attention_mask", "INT64", [b, s], np.ones((b, s), "<i8").tobytes())
    return Case("ids-out-of-vocab", request, INVALID, ("vocabulary",))


@st.composite
def missing_inputs(draw: st.DrawFn) -> Case:
    request = _request(draw(models))
    if draw(st.booleans()):
        b, s = draw(batch), draw(st.integers(1, 8))
        _add_raw(request, "attention_mask", "INT64", [b, s], np.ones((b, s), "<i8").tobytes())
    return Case("missing-input", request, INVALID, ("needs input",))


@st.composite
def unknown_input(draw: st.DrawFn) -> Case:
    name = draw(st.text(string.ascii_letters + "_", min_size=1, max_size=12).filter(
        lambda n: n not in ("text", "input_ids", "attention_mask", "token_type_ids")
    ))  # fmt: skip
    request = _request(draw(models))
    request.inputs.add(name=name, datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hello")
    return Case("unknown-input", request, INVALID, ("unknown inputs",))


@st.composite
def duplicated_input(draw: st.DrawFn) -> Case:
    request = _request(draw(models))
    for _ in range(draw(st.integers(2, 3))):
        request.inputs.add(name="text", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hello")
    return Case("duplicated-input", request, INVALID, ("more than once",))


@st.composite
def unknown_model(draw: st.DrawFn) -> Case:
    name = draw(
        st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=20).filter(lambda n: n not in MODELS)
    )
    return Case("unknown-model", _texts(name, [draw(sentences).encode()]), NOT_FOUND, (name,))


@st.composite
def unknown_version(draw: st.DrawFn) -> Case:
    version = str(draw(st.integers(2, 10**9)))
    request = _texts(draw(models), [draw(sentences).encode()])
    request.model_version = version
    return Case("unknown-version", request, NOT_FOUND, (version,))


bad_requests = st.one_of(
    wrong_text_dtype(), wrong_ids_dtype(), unknown_datatype(), typed_count_mismatch(), raw_bytes_count_mismatch(),
    hostile_length_prefix(), raw_length_mismatch(), negative_dim(), empty_batch(), batch_over_limit(),
    text_too_long(), non_utf8(), ids_out_of_vocab(), missing_inputs(), unknown_input(), duplicated_input(),
    unknown_model(), unknown_version(),
)  # fmt: skip


# -- the server and the checks --------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact, classifier_artifact], max_batch_size=MAX_BATCH)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def check_refused(stub: pb_grpc.GRPCInferenceServiceStub, case: Case) -> None:
    note(f"{case.kind}: {case.request}")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(case.request, timeout=30)
    details = err.value.details() or ""
    assert err.value.code() is case.code, f"{case.kind}: got {err.value.code().name}: {details}"
    assert any(n in details for n in case.needles), f"{case.kind}: message {details!r} lacks any of {case.needles}"
    assert len(details) < 600 and "Traceback" not in details and "/work" not in details


def assert_healthy(server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    with grpc.insecure_channel(server.url) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    for model in MODELS:
        response = stub.ModelInfer(_texts(model, [b"hello world", b"good dog"]), timeout=30)
        assert response.outputs[0].shape[0] == 2


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=bad_requests)
def test_every_bad_request_gets_the_right_code_and_a_clear_message(
    stub: pb_grpc.GRPCInferenceServiceStub, case: Case
) -> None:
    check_refused(stub, case)


def test_server_stays_healthy_and_bounded_across_thousands_of_bad_requests(
    server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    process = psutil.Process()
    samples: list[int] = []
    sent = 0

    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=bad_requests)
    def hammer(case: Case) -> None:
        nonlocal sent
        check_refused(stub, case)
        sent += 1
        if sent % 250 == 0:
            samples.append(process.memory_info().rss)

    hammer()
    assert sent >= 1500, f"only {sent} bad requests were generated"
    assert_healthy(server, stub)
    # After a warm-up, memory must stop growing: no per-request leak (allow allocator noise).
    growth = max(samples[2:]) - samples[1]
    assert growth < 40 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {sent} bad requests: {samples}"
