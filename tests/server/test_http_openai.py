"""OpenAI-compatible routes: the ``openai`` client's embeddings (float and base64) with real token
counts, ``/v1/classify`` labels and scores, and clear refusals for the wrong kind of model."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from grpc_harness import ServerThread, make_config, serving
from tiny_artifacts import LABELS, reference_forward, tokenize

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "cats and dogs are good"]


@pytest.fixture(scope="module")
def server(embedding_artifact: Path, classifier_artifact: Path) -> Iterator[ServerThread]:
    with serving(make_config([embedding_artifact, classifier_artifact], max_batch_size=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def base(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def client(base: str) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def post(url: str, payload: object) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def real_tokens(texts: list[str]) -> int:
    """Non-padding tokens the artifact's tokenizer makes of ``texts`` (special tokens included)."""
    return int(tokenize(texts)[1].sum())


@pytest.mark.parametrize("encoding", [None, "float", "base64"], ids=["client-default", "float", "base64"])
def test_openai_client_embeddings_equal_the_model_with_real_usage(
    client: openai.OpenAI, embedding_artifact: Path, encoding: str | None
) -> None:
    # Without encoding_format the client asks for base64 itself and decodes it; asked
    # explicitly, it hands the base64 text back as it came.
    extra = {} if encoding is None else {"encoding_format": encoding}
    result = client.embeddings.create(model="tiny-embed", input=TEXTS, **extra)  # type: ignore[arg-type]
    assert [d.index for d in result.data] == [0, 1, 2] and result.model == "tiny-embed"
    if encoding == "base64":
        vectors = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in result.data])
    else:
        vectors = np.array([d.embedding for d in result.data], dtype=np.float32)
    ids, mask, types = tokenize(TEXTS)
    np.testing.assert_allclose(vectors, reference_forward(embedding_artifact / "model.onnx", ids, mask, types), atol=1e-4)
    assert result.usage.prompt_tokens == result.usage.total_tokens == real_tokens(TEXTS)


def test_base64_is_little_endian_float32_and_equals_float(base: str) -> None:
    _, as_float = post(f"{base}/v1/embeddings", {"model": "tiny-embed", "input": "hello world"})
    status, as_b64 = post(f"{base}/v1/embeddings", {"model": "tiny-embed", "input": "hello world", "encoding_format": "base64"})
    assert status == 200 and as_b64["object"] == "list" and as_b64["data"][0]["object"] == "embedding"
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(as_float["data"][0]["embedding"], dtype=np.float32))
    assert as_b64["usage"] == {"prompt_tokens": real_tokens(["hello world"]), "total_tokens": real_tokens(["hello world"])}


def test_classify_returns_labels_and_scores(base: str, server: ServerThread) -> None:
    status, body = post(f"{base}/v1/classify", {"model": "tiny-cls", "input": TEXTS})
    assert status == 200, body
    import tritonclient.grpc as tgrpc

    with tgrpc.InferenceServerClient(server.url) as g:
        t = tgrpc.InferInput("text", [len(TEXTS), 1], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in TEXTS], dtype=object).reshape(-1, 1))
        logits = g.infer("tiny-cls", [t]).as_numpy("logits")
    for i, item in enumerate(body["data"]):
        assert item["index"] == i and item["label"] == LABELS[int(logits[i].argmax())]
        scores = {s["label"]: s["score"] for s in item["scores"]}
        assert set(scores) == set(LABELS) and abs(sum(scores.values()) - 1.0) < 1e-6
        assert item["score"] == max(scores.values()) == scores[item["label"]]
    assert body["usage"]["prompt_tokens"] == real_tokens(TEXTS)


def test_the_wrong_kind_of_model_is_pointed_to_the_other_route(base: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="/v1/classify"):
        client.embeddings.create(model="tiny-cls", input="hello")
    status, body = post(f"{base}/v1/classify", {"model": "tiny-embed", "input": "hello"})
    assert status == 400 and "/v1/embeddings" in body["error"]["message"]


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ({"model": "no-such", "input": "a"}, 404, "no-such"),
        ({"model": "tiny-embed", "input": []}, 400, "non-empty list"),
        ({"model": "tiny-embed", "input": [[1, 2, 3]]}, 400, "token-id arrays"),
        ({"input": "a"}, 400, "'model'"),
        ({"model": "tiny-embed", "input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "tiny-embed", "input": "a", "dimensions": 3}, 400, "8-dimensional"),
    ],
)
def test_bad_embedding_requests(base: str, payload: dict, status: int, needle: str) -> None:
    got, body = post(f"{base}/v1/embeddings", payload)
    assert got == status and needle in body["error"]["message"]


def test_list_models(client: openai.OpenAI) -> None:
    assert {m.id for m in client.models.list()} == {"tiny-embed", "tiny-cls"}


def test_openai_requests_are_counted_as_http(server: ServerThread, client: openai.OpenAI) -> None:
    registry = server.server.dataplane.metrics.registry
    labels = {"model": "tiny-embed", "version": "1", "outcome": "success", "protocol": "http"}
    before = registry.get_sample_value("pruneserve_requests_total", labels) or 0.0
    client.embeddings.create(model="tiny-embed", input="hi")
    assert registry.get_sample_value("pruneserve_requests_total", labels) == before + 1
