"""Every RPC of the gRPC service, called over a real socket with tritonclient and our stubs.

Outputs are compared with :func:`conftest.reference_forward`, an independent numpy
recomputation of the tiny graphs, so a transport bug (wrong order, wrong encoding, wrong
shape) cannot pass by agreeing with itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_harness import ServerThread, make_config, serving
from tiny_artifacts import LABELS, reference_forward, tokenize
from tritonclient.utils import InferenceServerException

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc
from pruneserve.server.client import InferenceClient
from pruneserve.server.servicer import serialize_bytes_tensor

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "cats and dogs are good"]


@pytest.fixture(scope="module")
def server(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact, classifier_artifact], max_batch_size=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def expected(artifact: Path, texts: list[str]) -> np.ndarray:
    ids, mask, types = tokenize(texts)
    return reference_forward(artifact / "model.onnx", ids, mask, types)


def text_input(texts: list[str]) -> tc.InferInput:
    t = tc.InferInput("text", [len(texts), 1], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object).reshape(-1, 1))
    return t


# -- health and metadata ---------------------------------------------------------------------
def test_live_ready_and_model_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny-embed")
    assert client.is_model_ready("tiny-cls", "1")
    assert not client.is_model_ready("tiny-cls", "7")
    assert not client.is_model_ready("no-such-model")


def test_server_metadata_advertises_the_extensions_it_serves(client: tc.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta.name == "pruneserve"
    assert meta.version
    # perf_analyzer calls ModelStatistics only when "statistics" is advertised: it must work.
    assert "statistics" in meta.extensions
    assert client.get_inference_statistics("tiny-embed").model_stats


def test_model_metadata_describes_both_model_kinds(client: tc.InferenceServerClient) -> None:
    emb = client.get_model_metadata("tiny-embed")
    assert emb.name == "tiny-embed" and list(emb.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in emb.inputs}
    assert inputs["text"] == ("BYTES", [-1, 1])
    assert inputs["input_ids"] == ("INT64", [-1, -1])
    assert {t.name: (t.datatype, list(t.shape)) for t in emb.outputs} == {"embedding": ("FP32", [-1, 8])}
    cls = client.get_model_metadata("tiny-cls", "1")
    outputs = {t.name: (t.datatype, list(t.shape)) for t in cls.outputs}
    assert outputs == {"logits": ("FP32", [-1, len(LABELS)]), "label": ("BYTES", [-1, 1])}


def test_model_config_is_truthful_for_triton_tools(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("tiny-cls").config
    assert config.name == "tiny-cls"
    assert config.max_batch_size == 8
    assert config.platform == "onnxruntime_onnx"
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    inputs = {i.name: i for i in config.input}
    assert inputs["text"].data_type == tc.model_config_pb2.TYPE_STRING and list(inputs["text"].dims) == [1]
    assert inputs["input_ids"].data_type == tc.model_config_pb2.TYPE_INT64 and list(inputs["input_ids"].dims) == [-1]
    assert all(i.optional for i in config.input)  # text OR ids: no single input is mandatory
    outputs = {o.name: o for o in config.output}
    assert outputs["logits"].data_type == tc.model_config_pb2.TYPE_FP32 and list(outputs["logits"].dims) == [3]
    assert outputs["label"].data_type == tc.model_config_pb2.TYPE_STRING and list(outputs["label"].dims) == [1]
    assert config.parameters["labels"].string_value == ",".join(LABELS)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_metadata("no-such-model"),
        lambda c: c.get_model_metadata("tiny-embed", "9"),
        lambda c: c.get_model_config("no-such-model"),
        lambda c: c.get_inference_statistics("no-such-model"),
    ],
    ids=["metadata-model", "metadata-version", "config", "statistics"],
)
def test_metadata_rpcs_for_unknown_models_are_not_found(client: tc.InferenceServerClient, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as err:
        call(client)
    assert err.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in err.value.message() or "9" in err.value.message()


def test_statistics_count_the_requests_served(client: tc.InferenceServerClient) -> None:
    before = client.get_inference_statistics("tiny-cls", "1").model_stats[0]
    client.infer("tiny-cls", [text_input(TEXTS[:2])])
    after = client.get_inference_statistics("tiny-cls", "1").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 2
    assert after.execution_count >= before.execution_count + 1
    assert after.last_inference >= before.last_inference and after.last_inference > 0
    everything = client.get_inference_statistics().model_stats
    assert {s.name for s in everything} == {"tiny-cls", "tiny-embed"}


# -- inference over tritonclient (raw contents) -------------------------------------------------
def test_text_embedding_matches_the_reference(client: tc.InferenceServerClient, embedding_artifact: Path) -> None:
    result = client.infer("tiny-embed", [text_input(TEXTS)], request_id="req-1")
    emb = result.as_numpy("embedding")
    assert emb.dtype == np.float32 and emb.shape == (3, 8)
    np.testing.assert_allclose(emb, expected(embedding_artifact, TEXTS), atol=1e-5)
    assert result.get_response().id == "req-1"
    assert result.get_response().model_version == "1"


def test_classifier_returns_logits_and_labels(client: tc.InferenceServerClient, classifier_artifact: Path) -> None:
    result = client.infer("tiny-cls", [text_input(TEXTS)])
    logits = result.as_numpy("logits")
    ref = expected(classifier_artifact, TEXTS)
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    labels = result.as_numpy("label")
    assert labels.shape == (3, 1)
    assert [x.decode() for x in labels[:, 0]] == [LABELS[i] for i in ref.argmax(axis=1)]


def test_requested_outputs_are_honoured(client: tc.InferenceServerClient, classifier_artifact: Path) -> None:
    result = client.infer("tiny-cls", [text_input(TEXTS[:1])], outputs=[tc.InferRequestedOutput("label")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["label"]
    assert result.as_numpy("logits") is None
    ref = expected(classifier_artifact, TEXTS[:1])
    assert result.as_numpy("label")[0, 0].decode() == LABELS[int(ref.argmax())]


def test_token_inputs_match_text_inputs(client: tc.InferenceServerClient, embedding_artifact: Path) -> None:
    ids, mask, types = tokenize(TEXTS)
    inputs = []
    for name, arr in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types)):
        t = tc.InferInput(name, list(arr.shape), "INT64")
        t.set_data_from_numpy(arr)
        inputs.append(t)
    emb = client.infer("tiny-embed", inputs).as_numpy("embedding")
    np.testing.assert_allclose(emb, expected(embedding_artifact, TEXTS), atol=1e-5)


def test_streaming_infer_answers_every_request_with_its_id(
    client: tc.InferenceServerClient, embedding_artifact: Path
) -> None:
    import queue

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i, text in enumerate(TEXTS):
            client.async_stream_infer("tiny-embed", [text_input([text])], request_id=f"s{i}")
        client.async_stream_infer("no-such-model", [text_input(["x"])], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(len(TEXTS) + 1)]
    finally:
        client.stop_stream()
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "no-such-model" in errors[0].message()
    by_id = {r.get_response().id: r.as_numpy("embedding") for r, e in got if e is None}
    assert set(by_id) == {"s0", "s1", "s2"}
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(by_id[f"s{i}"], expected(embedding_artifact, [text]), atol=1e-5)


# -- inference with typed contents (our stubs) ------------------------------------------------
def test_typed_text_contents_get_typed_outputs(
    stub: pb_grpc.GRPCInferenceServiceStub, classifier_artifact: Path
) -> None:
    request = pb.ModelInferRequest(model_name="tiny-cls", id="typed")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    tensor.contents.bytes_contents.extend(t.encode() for t in TEXTS[:2])
    response = stub.ModelInfer(request, timeout=30)
    assert not response.raw_output_contents
    out = {o.name: o for o in response.outputs}
    ref = expected(classifier_artifact, TEXTS[:2])
    assert list(out["logits"].shape) == [2, 3]
    np.testing.assert_allclose(np.array(out["logits"].contents.fp32_contents).reshape(2, 3), ref, atol=1e-5)
    assert [b.decode() for b in out["label"].contents.bytes_contents] == [LABELS[i] for i in ref.argmax(axis=1)]
    assert response.id == "typed"


def test_typed_token_contents(stub: pb_grpc.GRPCInferenceServiceStub, embedding_artifact: Path) -> None:
    ids, mask, _ = tokenize(TEXTS[:2])
    request = pb.ModelInferRequest(model_name="tiny-embed")
    for name, arr in (("input_ids", ids), ("attention_mask", mask)):
        request.inputs.add(name=name, datatype="INT64", shape=list(arr.shape)).contents.int64_contents.extend(
            arr.ravel().tolist()
        )
    response = stub.ModelInfer(request, timeout=30)
    emb = np.array(response.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(emb, expected(embedding_artifact, TEXTS[:2]), atol=1e-5)


def test_raw_bytes_contents_use_little_endian_length_prefixes(
    stub: pb_grpc.GRPCInferenceServiceStub, classifier_artifact: Path
) -> None:
    request = pb.ModelInferRequest(model_name="tiny-cls")
    request.inputs.add(name="text", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(serialize_bytes_tensor(t.encode() for t in TEXTS[:2]))
    assert request.raw_input_contents[0][:4] == len(TEXTS[0]).to_bytes(4, "little")
    response = stub.ModelInfer(request, timeout=30)
    names = [o.name for o in response.outputs]
    label_raw = response.raw_output_contents[names.index("label")]
    # Decode by hand: 4-byte little-endian length, then the bytes.
    labels, offset = [], 0
    while offset < len(label_raw):
        n = int.from_bytes(label_raw[offset : offset + 4], "little")
        labels.append(label_raw[offset + 4 : offset + 4 + n].decode())
        offset += 4 + n
    ref = expected(classifier_artifact, TEXTS[:2])
    assert labels == [LABELS[i] for i in ref.argmax(axis=1)]
    assert list(response.outputs[names.index("label")].shape) == [2]  # a [batch] text gives [batch] labels


# -- reflection, our client and the CLI ---------------------------------------------------------
def test_reflection_lists_the_services(server: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {s.name for s in response.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        assert response.file_descriptor_response.file_descriptor_proto


def test_our_client(server: ServerThread, embedding_artifact: Path) -> None:
    with InferenceClient(server.url, timeout=30) as c:
        assert c.server_live() and c.server_ready() and c.model_ready("tiny-embed")
        assert c.model_metadata("tiny-embed").name == "tiny-embed"
        out = c.infer_text("tiny-embed", TEXTS[:2], outputs=["embedding"], request_id="ours")
        np.testing.assert_allclose(out["embedding"], expected(embedding_artifact, TEXTS[:2]), atol=1e-5)
        ids, mask, types = tokenize(TEXTS[:1])
        out = c.infer("tiny-embed", {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        np.testing.assert_allclose(out["embedding"], expected(embedding_artifact, TEXTS[:1]), atol=1e-5)


def test_cli_infer_prints_json(
    server: ServerThread, classifier_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pruneserve.cli import main

    rc = main(["infer", "--url", server.url, "--model", "tiny-cls", "--text", TEXTS[0], "--text", TEXTS[1]])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    ref = expected(classifier_artifact, TEXTS[:2])
    np.testing.assert_allclose(np.array(payload["outputs"]["logits"]), ref, atol=1e-5)
    assert payload["outputs"]["label"] == [[LABELS[i]] for i in ref.argmax(axis=1)]
    rc = main(["infer", "--url", server.url, "--model", "no-such-model", "--text", "x"])
    assert rc == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["infer", "--url", server.url, "--model", "tiny-cls", "--ready"]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": "tiny-cls", "server_ready": True, "model_ready": True}
    assert main(["infer", "--url", server.url, "--model", "no-such-model", "--ready"]) == 1
    assert main(["infer", "--url", server.url, "--model", "tiny-cls"]) == 2  # nothing to send


def test_a_stream_the_client_abandons_leaves_nothing_behind(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import gc
    import threading

    done = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        request = pb.ModelInferRequest(model_name="tiny-embed", id="abandoned")
        request.inputs.add(name="text", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(b"hello")
        yield request
        done.wait(30)

    with caplog.at_level("ERROR", logger="asyncio"), grpc.insecure_channel(server.url) as channel:
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests(), timeout=30)
        assert next(call).infer_response.id == "abandoned"
        call.cancel()
        done.set()
        # Wait for the server to see the cancel (however slow the machine), not a fixed time.
        for _ in range(3000):
            if server.server._drain.in_flight == 0:
                break
            server.call(asyncio.sleep(0.01))
        gc.collect()
        server.call(asyncio.sleep(0.1))
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert server.server._drain.in_flight == 0  # the abandoned stream is no longer counted
