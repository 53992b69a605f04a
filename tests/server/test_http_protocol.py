"""KServe v2 / Triton HTTP/REST: tritonclient.http drives the server unchanged (JSON and binary
tensors), answers equal gRPC's, health/metadata/config/stats, and bad input gets a clean 4xx."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_harness import ServerThread, make_config, serving
from tiny_artifacts import LABELS, reference_forward, tokenize
from tritonclient.utils import InferenceServerException

from pruneserve.server.errors import HTTP_STATUS, OUTCOMES, ServerError
from pruneserve.server.http_transport import HEADER_LENGTH
from pruneserve.server.tensors import serialize_bytes_tensor

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "cats and dogs are good"]
#: Small, so an oversized body is cheap to send; tritonclient's requests are far smaller.
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServerThread]:
    config = make_config(
        [embedding_artifact, classifier_artifact], max_batch_size=8, max_message_bytes=MAX_BODY, http_read_timeout_s=0.5
    )
    with serving(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def base(server: ServerThread) -> str:
    assert server.server.http_port
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[thttp.InferenceServerClient]:
    c = thttp.InferenceServerClient(f"127.0.0.1:{server.server.http_port}")
    yield c
    c.close()


def call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with urllib: (status, headers, body), for error statuses too."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def text_input(texts: list[str], binary: bool) -> thttp.InferInput:
    t = thttp.InferInput("text", [len(texts), 1], "BYTES")
    t.set_data_from_numpy(np.array([s.encode() for s in texts], dtype=object).reshape(-1, 1), binary_data=binary)
    return t


def good_body(texts: list[str]) -> bytes:
    return json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}).encode()


# -- inference -------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http_infer_equals_grpc_and_the_reference(
    server: ServerThread, client: thttp.InferenceServerClient, embedding_artifact: Path, binary: bool
) -> None:
    outputs = [thttp.InferRequestedOutput("embedding", binary_data=binary)]
    result = client.infer("tiny-embed", [text_input(TEXTS, binary)], outputs=outputs)
    got = result.as_numpy("embedding")
    assert got.shape == (len(TEXTS), 8) and got.dtype == np.float32
    with tgrpc.InferenceServerClient(server.url) as g:
        t = tgrpc.InferInput("text", [len(TEXTS), 1], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in TEXTS], dtype=object).reshape(-1, 1))
        via_grpc = g.infer("tiny-embed", [t]).as_numpy("embedding")
    if binary:
        np.testing.assert_array_equal(got, via_grpc)  # the same float32 bytes
    else:
        np.testing.assert_allclose(got, via_grpc, rtol=1e-6, atol=1e-7)  # through JSON's decimal text
    ids, mask, types = tokenize(TEXTS)
    np.testing.assert_allclose(got, reference_forward(embedding_artifact / "model.onnx", ids, mask, types), atol=1e-4)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classifier_labels_over_http(client: thttp.InferenceServerClient, binary: bool) -> None:
    outputs = [thttp.InferRequestedOutput("label", binary_data=binary), thttp.InferRequestedOutput("logits", binary_data=binary)]
    result = client.infer("tiny-cls", [text_input(TEXTS, binary)], outputs=outputs, request_id="req-7")
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label").ravel()]
    logits = result.as_numpy("logits")
    assert labels == [LABELS[i] for i in logits.argmax(axis=1)]
    assert result.get_response()["id"] == "req-7"


def test_binary_input_ids_and_version_route(base: str) -> None:
    """A hand-made binary body: INT64 ids after the JSON header, binary output asked by the request."""
    ids, mask, _ = tokenize(TEXTS[:1])
    blob_ids, blob_mask = ids.astype("<i8").tobytes(), mask.astype("<i8").tobytes()
    header = json.dumps({
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape), "parameters": {"binary_data_size": len(blob_ids)}},
            {"name": "attention_mask", "datatype": "INT64", "shape": list(mask.shape), "parameters": {"binary_data_size": len(blob_mask)}},
        ],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    status, headers, body = call(
        f"{base}/v2/models/tiny-embed/versions/1/infer", header + blob_ids + blob_mask, {HEADER_LENGTH: str(len(header))}
    )
    assert status == 200, body
    n = int(headers[HEADER_LENGTH])
    answer = json.loads(body[:n])
    (out,) = answer["outputs"]
    assert answer["model_version"] == "1" and out["name"] == "embedding" and "data" not in out
    vec = np.frombuffer(body[n:], dtype="<f4").reshape(out["shape"])
    assert out["parameters"]["binary_data_size"] == vec.nbytes and vec.shape == (1, 8)


def test_bytes_binary_input_is_length_prefixed(base: str) -> None:
    blob = serialize_bytes_tensor([t.encode() for t in TEXTS])
    header = json.dumps({
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "embedding", "parameters": {"binary_data": False}}],
    }).encode()  # fmt: skip
    status, _, body = call(f"{base}/v2/models/tiny-embed/infer", header + blob, {HEADER_LENGTH: str(len(header))})
    assert status == 200, body
    assert np.asarray(json.loads(body)["outputs"][0]["data"]).size == len(TEXTS) * 8


# -- health, metadata, config, stats ---------------------------------------------------------
def test_health_metadata_config_and_stats(client: thttp.InferenceServerClient, base: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny-embed") and client.is_model_ready("tiny-cls", "1")
    assert not client.is_model_ready("tiny-cls", "7") and not client.is_model_ready("no-such-model")
    meta = client.get_server_metadata()
    assert meta["name"] == "pruneserve" and "statistics" in meta["extensions"]
    model = client.get_model_metadata("tiny-embed")
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert {"name": "embedding", "datatype": "FP32", "shape": [-1, 8]} in model["outputs"]
    assert client.get_model_metadata("tiny-cls", "1")["name"] == "tiny-cls"
    config = client.get_model_config("tiny-cls")
    assert config["max_batch_size"] == 8 and {o["name"] for o in config["output"]} == {"logits", "label"}
    assert config["parameters"]["labels"]["string_value"] == ",".join(LABELS)
    client.infer("tiny-embed", [text_input(TEXTS[:1], True)])
    stats = client.get_inference_statistics("tiny-embed")["model_stats"]
    assert stats[0]["name"] == "tiny-embed" and stats[0]["inference_stats"]["success"]["count"] >= 1
    everything = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in everything} == {"tiny-embed", "tiny-cls"}
    status, _, body = call(f"{base}/v2/models/no-such-model/config")
    assert status == 404 and "no-such-model" in json.loads(body)["error"]


# -- bad input -------------------------------------------------------------------------------
BAD: dict[str, tuple[str, bytes, dict[str, str], int, str]] = {
    "bad-json": ("/v2/models/tiny-embed/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    "header-length-not-int": ("/v2/models/tiny-embed/infer", good_body(["a"]), {HEADER_LENGTH: "ten"}, 400, "not an integer"),
    "header-length-past-body": ("/v2/models/tiny-embed/infer", good_body(["a"]), {HEADER_LENGTH: "100000"}, 400, "body holds"),
    "header-length-short": ("/v2/models/tiny-embed/infer", good_body(["a"]), {HEADER_LENGTH: "5"}, 400, "not valid JSON"),
    "unknown-model": ("/v2/models/no-such-model/infer", good_body(["a"]), {}, 404, "no-such-model"),
    "wrong-dtype": (
        "/v2/models/tiny-embed/infer",
        json.dumps({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}).encode(), {}, 400, "text",
    ),
    "unknown-datatype": (
        "/v2/models/tiny-embed/infer",
        json.dumps({"inputs": [{"name": "text", "datatype": "STRING", "shape": [1], "data": ["a"]}]}).encode(), {}, 400,
        "unknown datatype",
    ),
    "shape-mismatch": (
        "/v2/models/tiny-embed/infer",
        json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}).encode(), {}, 400,
        "shape declares 3",
    ),
    "extra-binary-bytes": ("/v2/models/tiny-embed/infer", good_body(["a"]) + b"junk", {HEADER_LENGTH: str(len(good_body(["a"])))},
                           400, "bytes follow"),
    "oversized": ("/v2/models/tiny-embed/infer", good_body(["x" * (MAX_BODY + 10)]), {}, 413, str(MAX_BODY)),
    "no-route": ("/v2/nothing/here", b"{}", {}, 404, "no such route"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_json_4xx_while_a_good_request_succeeds(base: str, case: str) -> None:
    path, body, headers, status, needle = BAD[case]
    good: list[tuple[int, dict[str, str], bytes]] = []
    # tritonclient.http (gevent) is bound to its thread: the concurrent good request uses urllib.
    worker = threading.Thread(target=lambda: good.append(call(f"{base}/v2/models/tiny-embed/infer", good_body(TEXTS))))
    worker.start()
    got_status, got_headers, got_body = call(base + path, body, headers)
    worker.join(60)
    assert got_status == status, got_body
    assert got_headers["Content-Type"].startswith("application/json")
    assert needle in json.loads(got_body)["error"]
    assert len(good) == 1 and good[0][0] == 200
    assert np.asarray(json.loads(good[0][2])["outputs"][0]["data"]).size == len(TEXTS) * 8


def test_tritonclient_sees_the_error_message(client: thttp.InferenceServerClient) -> None:
    t = thttp.InferInput("nope", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"a"], dtype=object))
    with pytest.raises(InferenceServerException, match="nope"):
        client.infer("tiny-embed", [t])


def test_a_slow_client_gets_408_and_others_are_served(server: ServerThread, base: str, client: thttp.InferenceServerClient) -> None:
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=60) as slow:
        slow.sendall(b"POST /v2/models/tiny-embed/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
        # While the slow body is pending, another client is answered.
        assert client.infer("tiny-embed", [text_input(TEXTS, True)]).as_numpy("embedding").shape == (len(TEXTS), 8)
        reply = b""
        while chunk := slow.recv(65536):  # the server answers 408 and closes the connection
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and "did not arrive" in json.loads(body)["error"]


def test_every_error_code_has_an_http_status() -> None:
    codes = {cls.code for cls in _subclasses(ServerError)}
    assert codes <= set(HTTP_STATUS)
    assert all(400 <= s < 600 for s in HTTP_STATUS.values()) and "success" in OUTCOMES


def _subclasses(cls: type) -> set[type]:
    out = {cls}
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out


# -- metrics ---------------------------------------------------------------------------------
def test_request_metrics_carry_the_protocol(server: ServerThread, client: thttp.InferenceServerClient, base: str) -> None:
    registry = server.server.dataplane.metrics.registry

    def count(protocol: str, outcome: str, model: str = "tiny-embed", version: str = "1") -> float:
        labels = {"model": model, "version": version, "outcome": outcome, "protocol": protocol}
        return registry.get_sample_value("pruneserve_requests_total", labels) or 0.0

    http0, grpc0, bad0 = count("http", "success"), count("grpc", "success"), count("http", "invalid_argument", version="")
    client.infer("tiny-embed", [text_input(TEXTS, False)])
    with tgrpc.InferenceServerClient(server.url) as g:
        t = tgrpc.InferInput("text", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[b"hi"]], dtype=object))
        g.infer("tiny-embed", [t])
    assert call(f"{base}/v2/models/tiny-embed/infer", b"{", {})[0] == 400
    assert (count("http", "success"), count("grpc", "success")) == (http0 + 1, grpc0 + 1)
    assert count("http", "invalid_argument", version="") == bad0 + 1


# -- configuration and start-up --------------------------------------------------------------
def test_http_flags_and_config_validation() -> None:
    from pruneserve.cli import build_parser
    from pruneserve.server.cli import config_from_args
    from pruneserve.server.config import ServeConfig
    from pruneserve.server.errors import ConfigError

    def parse(*argv: str) -> ServeConfig:
        return config_from_args(build_parser().parse_args(["serve", "x", *argv]))

    assert (ServeConfig().http, ServeConfig().http_port) == (True, 8000)
    assert parse("--http-port", "0", "--http-read-timeout-s", "2").http_port == 0
    assert parse("--http-read-timeout-s", "2").http_read_timeout_s == 2.0
    assert parse("--no-http").http is False
    with pytest.raises(ConfigError, match=r"http_port=70000 is invalid"):
        ServeConfig(http_port=70000)
    with pytest.raises(ConfigError, match="http_read_timeout_s"):
        ServeConfig(http_read_timeout_s=0)


def test_a_taken_http_port_is_a_clear_error_and_no_http_binds_nothing(
    server: ServerThread, embedding_artifact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from pruneserve.server.app import create_server
    from pruneserve.server.errors import ConfigError

    taken = make_config([embedding_artifact], http_port=server.server.http_port)
    with pytest.raises(ConfigError, match="--http-port"):
        asyncio.run(create_server(taken))
    with serving(make_config([embedding_artifact], http=False)) as grpc_only:
        assert grpc_only.server.http_port is None and grpc_only.server.http is None
    with caplog.at_level("INFO", logger="pruneserve.server.app"), serving(make_config([embedding_artifact])) as srv:
        assert f"HTTP listening on 127.0.0.1:{srv.server.http_port} (plaintext)" in caplog.text
