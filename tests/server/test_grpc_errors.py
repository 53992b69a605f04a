"""Every error a client can meet, over a real socket: the status code and a message that says what was wrong.

Slow paths (a full queue, an expired deadline) are made deterministic with
:class:`tiny_artifacts.GatedEngine`, which holds engine runs until the test opens its gate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_harness import ServerThread, ids_request, make_config, serving, texts_request
from tiny_artifacts import MAX_LEN, VOCAB, gate_model, tokenize
from tritonclient.utils import InferenceServerException

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.servicer import serialize_bytes_tensor

MAX_BATCH = 4
Build = Callable[[], pb.ModelInferRequest]


@pytest.fixture(scope="module")
def server(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact, classifier_artifact], max_batch_size=MAX_BATCH)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _typed(name: str, datatype: str, shape: list[int], field: str, values: list) -> pb.ModelInferRequest:  # type: ignore[type-arg]
    request = pb.ModelInferRequest(model_name="tiny-embed")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def _duplicated() -> pb.ModelInferRequest:
    request = texts_request([b"hello"])
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(serialize_bytes_tensor([b"world"]))
    return request


def _mixed() -> pb.ModelInferRequest:
    request = texts_request([b"hello"])
    request.inputs[0].contents.bytes_contents.append(b"hello")
    return request


def _raw_count() -> pb.ModelInferRequest:
    request = texts_request([b"hello"])
    request.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 1])
    return request


def _unknown_output() -> pb.ModelInferRequest:
    request = texts_request([b"hello"])
    request.outputs.add(name="pooler")
    return request


INVALID: dict[str, tuple[Build, str]] = {
    "wrong-input-name": (
        lambda: _typed("texts", "BYTES", [1, 1], "bytes_contents", [b"hi"]),
        "unknown inputs ['texts']",
    ),
    "wrong-dtype": (lambda: _typed("text", "INT64", [1, 1], "int64_contents", [5]), "must be BYTES"),
    "unknown-dtype": (lambda: _typed("text", "STRING", [1, 1], "bytes_contents", [b"hi"]), "unknown datatype 'STRING'"),
    "wrong-shape": (
        lambda: _typed("text", "BYTES", [1, 2], "bytes_contents", [b"a", b"b"]),
        "expected [batch] or [batch, 1]",
    ),
    "negative-dim": (lambda: _typed("text", "BYTES", [-1, 1], "bytes_contents", [b"a"]), "must be >= 0"),
    "typed-count": (lambda: _typed("text", "BYTES", [2, 1], "bytes_contents", [b"a"]), "holds 1"),
    "misplaced-contents": (lambda: _typed("input_ids", "INT64", [1, 2], "fp32_contents", [1.0, 2.0]), "int64_contents"),
    "raw-length": (lambda: ids_request(np.array([[2, 7, 3]]), raw=b"\0" * 16), "need 24"),
    "raw-bytes-overrun": (lambda: texts_request([b"hello"], shape=[2, 1]), "end after 1 of 2 elements"),
    "raw-count": (_raw_count, "raw_input_contents"),
    "raw-and-typed": (_mixed, "one encoding"),
    "duplicated-input": (_duplicated, "more than once"),
    "no-inputs": (lambda: pb.ModelInferRequest(model_name="tiny-embed"), "needs input 'text'"),
    "empty-batch": (lambda: texts_request([], shape=[0, 1]), "empty batch"),
    "too-many-items": (lambda: texts_request([b"hi"] * (MAX_BATCH + 1)), f"max_batch_size is {MAX_BATCH}"),
    "text-too-long": (lambda: texts_request([b"hello " * (MAX_LEN + 5)]), f"at most {MAX_LEN}"),
    "non-utf8": (lambda: texts_request([b"ok", b"\xff\xfe bad"]), "not valid UTF-8"),
    "ids-out-of-vocab": (lambda: ids_request(np.array([[2, len(VOCAB) + 50, 3]])), "outside this model's vocabulary"),
    "negative-id": (lambda: ids_request(np.array([[2, -4, 3]])), "outside this model's vocabulary"),
    "unknown-output": (_unknown_output, "unknown outputs ['pooler']"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub, case: str) -> None:
    build, needle = INVALID[case]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(build(), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert needle in err.value.details()


def test_bad_requests_are_counted_in_metrics(server: ServerThread, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    registry = server.server.dataplane.metrics.registry

    def count() -> float:
        labels = {"model": "tiny-embed", "version": "", "outcome": "invalid_argument", "protocol": "grpc"}
        return registry.get_sample_value("pruneserve_requests_total", labels) or 0.0

    before = count()
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(INVALID["typed-count"][0](), timeout=30)  # refused by the servicer's decoding
    assert count() == before + 1


@pytest.mark.parametrize(("model", "version", "needle"), [("nope", "", "'nope'"), ("tiny-embed", "3", "3")])
def test_unknown_model_or_version_is_not_found(server: ServerThread, model: str, version: str, needle: str) -> None:
    client = tc.InferenceServerClient(server.url)
    t = tc.InferInput("text", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[b"hello"]], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [t], model_version=version)
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert needle in err.value.message()
    client.close()


def test_message_over_the_size_limit_is_refused(embedding_artifact: Path) -> None:
    with (
        serving(make_config([embedding_artifact], max_message_bytes=4096)) as srv,
        grpc.insecure_channel(srv.url) as ch,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(texts_request([b"x" * 10_000]), timeout=30)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()
        assert len(stub.ModelInfer(texts_request([b"hello"]), timeout=30).raw_output_contents) == 1


# -- slow paths with a gated engine ---------------------------------------------------------
@pytest.fixture
def gated_server(embedding_artifact: Path) -> Iterator[ServerThread]:
    config = make_config([embedding_artifact], max_queue_size=1, max_batch_size=MAX_BATCH, max_queue_delay_ms=0.0)
    with serving(config) as srv:
        yield srv


def _async_infer(url: str, text: bytes, results: list[object], timeout: float | None = None) -> threading.Thread:
    def run() -> None:
        with grpc.insecure_channel(url) as ch:
            try:
                results.append(pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(texts_request([text]), timeout=timeout))
            except grpc.RpcError as exc:
                results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_full_queue_is_resource_exhausted(gated_server: ServerThread) -> None:
    dp = gated_server.server.dataplane
    engine = gate_model(dp, "tiny-embed")
    engine.gate.clear()
    results: list[object] = []
    running = _async_infer(gated_server.url, b"hello", results)
    assert engine.entered.wait(30)
    queued = _async_infer(gated_server.url, b"world", results)
    _wait(lambda: dp.batcher("tiny-embed").pending >= 1, "a queued request")
    with grpc.insecure_channel(gated_server.url) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(texts_request([b"one too many"]), timeout=30)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_size 1" in err.value.details()
    engine.gate.set()
    running.join(30)
    queued.join(30)
    assert all(isinstance(r, pb.ModelInferResponse) for r in results), results


def test_deadline_is_honoured_and_expired_work_is_dropped(gated_server: ServerThread) -> None:
    dp = gated_server.server.dataplane
    engine = gate_model(dp, "tiny-embed")
    engine.gate.clear()
    results: list[object] = []
    blocker = _async_infer(gated_server.url, b"hello", results)
    assert engine.entered.wait(30)
    expiring: list[object] = []
    _async_infer(gated_server.url, b"cat", expiring, timeout=0.3).join(30)
    assert isinstance(expiring[0], grpc.RpcError)
    assert expiring[0].code() is grpc.StatusCode.DEADLINE_EXCEEDED
    engine.gate.set()
    blocker.join(30)
    assert isinstance(results[0], pb.ModelInferResponse)
    # The expired request must never reach the engine: only the blocker's run happened.
    _wait(lambda: dp.batcher("tiny-embed").pending == 0, "the queue to empty")
    cat = tokenize(["cat"])[0][0, 1]
    assert not any((run["input_ids"] == cat).any() for run in engine.runs)


# -- unexpected failures -------------------------------------------------------------------------
class ExplodingDataPlane(DataPlane):
    """A data plane with a bug in ModelMetadata (stands in for any unexpected exception)."""

    def model_metadata(self, name: str, version: str = ""):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"secret internals of {name} at /srv/private/path")


def test_unexpected_exception_is_internal_with_a_generic_message(
    embedding_artifact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config([embedding_artifact])
    srv = ServerThread(config, ExplodingDataPlane(config))
    try:
        with (
            caplog.at_level(logging.ERROR, logger="pruneserve.server.interceptors"),
            grpc.insecure_channel(srv.url) as ch,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelMetadata(
                    pb.ModelMetadataRequest(name="tiny-embed"), metadata=[("x-request-id", "rid-42")], timeout=30
                )
            # The server survives its own bug.
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        assert err.value.code() is grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details() and "/srv" not in err.value.details()
        assert "rid-42" in err.value.details()
        records = [r for r in caplog.records if getattr(r, "request_id", None) == "rid-42"]
        assert records and records[0].exc_info is not None
        assert "secret internals" in str(records[0].exc_info[1])
    finally:
        srv.stop()


def test_engine_failure_is_internal_without_internals(gated_server: ServerThread) -> None:
    poison = VOCAB["cat"]
    gate_model(gated_server.server.dataplane, "tiny-embed", poison_id=poison)
    with grpc.insecure_channel(gated_server.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(texts_request([b"cat"]), timeout=30)
        assert err.value.code() is grpc.StatusCode.INTERNAL
        assert "poisoned" not in err.value.details()
        assert len(stub.ModelInfer(texts_request([b"dog"]), timeout=30).outputs) == 1


def test_client_request_ids_cannot_forge_or_flood_log_lines() -> None:
    from pruneserve.server.interceptors import MAX_REQUEST_ID_CHARS, REQUEST_ID, bind_request_id

    rid = bind_request_id("abc\nERROR forged line\r" + "x" * 10_000)
    assert rid.startswith("abcERROR forged line") and "\n" not in rid and "\r" not in rid
    assert len(rid) == MAX_REQUEST_ID_CHARS and REQUEST_ID.get() == rid
    assert len(bind_request_id("")) == 16  # none given: a fresh one


def test_each_refusal_is_logged_once_with_its_request_id(
    stub: pb_grpc.GRPCInferenceServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    request = texts_request([b"hello"], model="nope")
    request.id = "refused-1"
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError):
        stub.ModelInfer(request, timeout=30)
    lines = [r for r in caplog.records if "refused-1" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert (lines[0].request_id, lines[0].code, lines[0].levelname) == ("refused-1", "NOT_FOUND", "INFO")
