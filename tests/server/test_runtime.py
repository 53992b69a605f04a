"""Engines, tokenization and request validation, checked against an independent numpy model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_artifacts import LABELS, MAX_LEN, VOCAB, reference_forward, text_request, tokenize

from pruneserve.artifact import load_artifact
from pruneserve.engines import EngineOptions
from pruneserve.engines.ort import OnnxRuntimeEngine
from pruneserve.server.config import ServeConfig
from pruneserve.server.errors import InvalidArgumentError, ModelLoadError
from pruneserve.server.metrics import Metrics
from pruneserve.server.repository import ModelRepository
from pruneserve.server.runtime import ModelRuntime, Prepared, create_engine
from pruneserve.server.types import InferInput, InferRequest

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "cats", "very very fast red cars"]


def _load(path: Path, **config: object) -> ModelRuntime:
    return ModelRuntime.load(load_artifact(path), ServeConfig(threads=1, **config))  # type: ignore[arg-type]


def _run(rt: ModelRuntime, request: InferRequest) -> dict[str, np.ndarray]:
    prepared = rt.prepare(request, max_batch_size=32)
    [raw], _ = rt.execute([prepared])
    return {o.name: o.data for o in rt.make_outputs(prepared, raw)}


def _ids_request(model: str, ids: np.ndarray, mask: np.ndarray | None = None, types: np.ndarray | None = None) -> InferRequest:
    inputs = [InferInput("input_ids", "INT64", ids.shape, ids)]
    if mask is not None:
        inputs.append(InferInput("attention_mask", "INT64", mask.shape, mask))
    if types is not None:
        inputs.append(InferInput("token_type_ids", "INT64", types.shape, types))
    return InferRequest(model=model, version="", inputs=inputs)


def test_embedding_matches_numpy_reference(embedding_artifact: Path) -> None:
    rt = _load(embedding_artifact)
    got = _run(rt, text_request("tiny-embed", TEXTS))
    ids, mask, types = tokenize(TEXTS)
    want = reference_forward(embedding_artifact / "model.onnx", ids, mask, types)
    assert list(got) == ["embedding"]
    assert got["embedding"].dtype == np.float32 and got["embedding"].shape == (len(TEXTS), 8)
    np.testing.assert_allclose(got["embedding"], want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got["embedding"], axis=1), 1.0, atol=1e-5)


def test_classifier_logits_and_labels(classifier_artifact: Path) -> None:
    rt = _load(classifier_artifact)
    got = _run(rt, text_request("tiny-cls", TEXTS))
    ids, mask, types = tokenize(TEXTS)
    want = reference_forward(classifier_artifact / "model.onnx", ids, mask, types)
    np.testing.assert_allclose(got["logits"], want, atol=1e-5)
    assert got["label"].shape == (len(TEXTS), 1)
    assert [x.decode() for x in got["label"].ravel()] == [LABELS[i] for i in want.argmax(1)]


def test_requested_outputs_are_honoured(classifier_artifact: Path) -> None:
    rt = _load(classifier_artifact)
    assert list(_run(rt, text_request("tiny-cls", TEXTS, outputs=["label"]))) == ["label"]
    assert list(_run(rt, text_request("tiny-cls", TEXTS, outputs=["label", "logits"]))) == ["label", "logits"]
    with pytest.raises(InvalidArgumentError, match=r"unknown outputs \['embedding'\].*\['logits', 'label'\]"):
        rt.prepare(text_request("tiny-cls", TEXTS, outputs=["embedding"]), 32)


def test_pretokenized_ids_equal_text_path(embedding_artifact: Path) -> None:
    rt = _load(embedding_artifact)
    ids, mask, types = tokenize(TEXTS)
    # Client-side padding beyond the longest row must not change the answer.
    pad = np.zeros((len(TEXTS), 3), np.int64)
    ids_p, mask_p, types_p = (np.concatenate([a, pad], axis=1) for a in (ids, mask, types))
    by_ids = _run(rt, _ids_request("tiny-embed", ids_p, mask_p, types_p))["embedding"]
    by_text = _run(rt, text_request("tiny-embed", TEXTS))["embedding"]
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    # attention_mask and token_type_ids are optional for a single unpadded sequence.
    one = _run(rt, _ids_request("tiny-embed", ids[2:3, : int(mask[2].sum())]))["embedding"]
    np.testing.assert_allclose(one, by_text[2:3], atol=1e-6)


def test_prepared_request_is_trimmed_to_its_longest_row(embedding_artifact: Path) -> None:
    rt = _load(embedding_artifact)
    ids, mask, types = tokenize(["hello", "hello world"])
    wide = np.zeros((2, 20), np.int64)
    wide_mask = wide.copy()
    wide[:, : ids.shape[1]], wide_mask[:, : ids.shape[1]] = ids, mask
    prepared = rt.prepare(_ids_request("tiny-embed", wide, wide_mask), 32)
    assert prepared.length == ids.shape[1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ids: ids.__setitem__((0, 1), len(VOCAB)), f"outside this model's vocabulary \\[0, {len(VOCAB) - 1}\\]"),
        (lambda ids: ids.__setitem__((1, 1), -3), "contains -3"),
    ],
)
def test_ids_outside_vocabulary_are_refused(embedding_artifact: Path, mutate, message: str) -> None:
    rt = _load(embedding_artifact)
    ids, mask, _ = tokenize(TEXTS[:2])
    mutate(ids)
    with pytest.raises(InvalidArgumentError, match=message):
        rt.prepare(_ids_request("tiny-embed", ids, mask), 32)


def test_bad_masks_and_shapes_are_refused(embedding_artifact: Path) -> None:
    rt = _load(embedding_artifact)
    ids, mask, _ = tokenize(TEXTS[:2])
    with pytest.raises(InvalidArgumentError, match="only 0 and 1"):
        rt.prepare(_ids_request("tiny-embed", ids, mask * 2), 32)
    with pytest.raises(InvalidArgumentError, match="must match"):
        rt.prepare(_ids_request("tiny-embed", ids, mask[:, :-1]), 32)
    zero = mask.copy()
    zero[1] = 0
    with pytest.raises(InvalidArgumentError, match="row 1 of attention_mask is all zeros"):
        rt.prepare(_ids_request("tiny-embed", ids, zero), 32)
    flat = ids.reshape(-1)
    with pytest.raises(InvalidArgumentError, match=r"expected \[batch, sequence\]"):
        rt.prepare(InferRequest("tiny-embed", "", [InferInput("input_ids", "INT64", flat.shape, flat)]), 32)
    floats = ids.astype(np.float32)
    with pytest.raises(InvalidArgumentError, match="must be INT64"):
        rt.prepare(InferRequest("tiny-embed", "", [InferInput("input_ids", "FP32", floats.shape, floats)]), 32)


def test_text_validation(embedding_artifact: Path) -> None:
    rt = _load(embedding_artifact)
    bad_utf8 = np.array([b"hello", b"\xff\xfe broken"], dtype=object)
    with pytest.raises(InvalidArgumentError, match=r"text\[1\] is not valid UTF-8"):
        rt.prepare(InferRequest("tiny-embed", "", [InferInput("text", "BYTES", (2,), bad_utf8)]), 32)
    with pytest.raises(InvalidArgumentError, match="send either 'text' or pre-tokenized ids"):
        ids, mask, _ = tokenize(["hello"])
        req = text_request("tiny-embed", ["hello"])
        req.inputs.append(InferInput("input_ids", "INT64", ids.shape, ids))
        rt.prepare(req, 32)
    with pytest.raises(InvalidArgumentError, match=r"unknown inputs \['sentence'\]"):
        data = np.array([b"x"], dtype=object)
        rt.prepare(InferRequest("tiny-embed", "", [InferInput("sentence", "BYTES", (1,), data)]), 32)
    with pytest.raises(InvalidArgumentError, match="has 5 items but max_batch_size is 4"):
        rt.prepare(text_request("tiny-embed", ["a"] * 5), 4)
    with pytest.raises(InvalidArgumentError, match=r"declares shape \[3, 1\] but carries 2"):
        data = np.array([b"a", b"b"], dtype=object)
        rt.prepare(InferRequest("tiny-embed", "", [InferInput("text", "BYTES", (3, 1), data)]), 32)
    with pytest.raises(InvalidArgumentError, match="needs input 'text'"):
        rt.prepare(InferRequest("tiny-embed", "", []), 32)


def test_flat_text_shape_round_trips(classifier_artifact: Path) -> None:
    rt = _load(classifier_artifact)
    data = np.array([t.encode() for t in TEXTS], dtype=object)
    out = _run(rt, InferRequest("tiny-cls", "", [InferInput("text", "BYTES", data.shape, data)]))
    assert out["label"].shape == (len(TEXTS),)
    assert out["logits"].shape == (len(TEXTS), len(LABELS))


def test_over_long_text_is_refused_or_truncated(embedding_artifact: Path) -> None:
    long_text = " ".join(["word"] * (MAX_LEN + 5))
    strict = _load(embedding_artifact)
    with pytest.raises(InvalidArgumentError, match=f"is {MAX_LEN + 7} tokens but this model accepts at most {MAX_LEN}"):
        strict.prepare(text_request("tiny-embed", ["short", long_text]), 32)

    lenient = _load(embedding_artifact, truncate=True)
    prepared = lenient.prepare(text_request("tiny-embed", ["short", long_text]), 32)
    assert prepared.length == MAX_LEN
    # The truncated sequence keeps its special tokens, as the tokenizer's truncation does.
    assert prepared.encoded.input_ids[1, -1] == VOCAB["[SEP]"]

    # A server-side limit below the model's applies too.
    tighter = _load(embedding_artifact, max_sequence_length=8)
    assert tighter.max_sequence_length == 8
    with pytest.raises(InvalidArgumentError, match="at most 8"):
        tighter.prepare(text_request("tiny-embed", ["the quick brown fox jumps over the lazy dog"]), 32)


def test_model_without_token_types(artifact_factory) -> None:
    path = artifact_factory(name="no-types", token_types=False, normalize=False)
    rt = _load(path)
    assert rt.manifest.inputs == ["input_ids", "attention_mask"]
    assert "token_type_ids" not in {s.name for s in rt.input_specs(with_batch=True)}
    got = _run(rt, text_request("no-types", TEXTS))["embedding"]
    ids, mask, _ = tokenize(TEXTS)
    np.testing.assert_allclose(got, reference_forward(path / "model.onnx", ids, mask), atol=1e-5)


def test_batch_padding_does_not_change_answers(embedding_artifact: Path) -> None:
    rt = _load(embedding_artifact)
    alone = [rt.prepare(text_request("tiny-embed", [t]), 32) for t in TEXTS]
    solo = [rt.execute([p])[0][0]["embedding"] for p in alone]
    batched, _ = rt.execute(alone)
    for s, b in zip(solo, batched):
        assert np.abs(s - b["embedding"]).max() <= 1e-5


def test_provider_is_verified_after_session_creation(embedding_artifact: Path) -> None:
    engine = OnnxRuntimeEngine(
        embedding_artifact / "model.onnx", EngineOptions(providers=("cpu",)), ["input_ids", "attention_mask", "token_type_ids"]
    )
    assert engine.providers == ["CPUExecutionProvider"]
    assert not engine.fell_back
    assert engine.describe()["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize(
    ("mode", "allow", "stop"), [("off", "0", "0"), ("run", "1", "1"), ("always", "1", "0")]
)
def test_intra_op_spinning_reaches_the_session(embedding_artifact: Path, mode: str, allow: str, stop: str) -> None:
    engine = OnnxRuntimeEngine(
        embedding_artifact / "model.onnx", EngineOptions(intra_op_spinning=mode),
        ["input_ids", "attention_mask", "token_type_ids"],
    )  # fmt: skip
    opts = engine._session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == allow
    assert opts.get_session_config_entry("session.force_spinning_stop") == stop
    assert opts.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_unknown_spinning_mode_is_refused() -> None:
    from pruneserve.engines.ort_settings import spinning_entries

    with pytest.raises(ValueError, match=r"mode 'busy' is not one of \('off', 'run', 'always'\)"):
        spinning_entries("busy")


def test_missing_gpu_provider_is_logged_and_counted(embedding_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the fallback cannot be provoked here")
    metrics = Metrics()
    repo = ModelRepository(ServeConfig(threads=1, providers=["tensorrt", "cuda", "cpu"]), metrics)
    rt = repo.load(embedding_artifact)
    assert rt.engine.providers == ["CPUExecutionProvider"]
    assert rt.engine.fell_back
    assert "fell back" in caplog.text
    labels = {"model": "tiny-embed", "version": "1", "requested": "TensorrtExecutionProvider", "actual": "CPUExecutionProvider"}
    assert metrics.registry.get_sample_value("pruneserve_provider_fallback_total", labels) == 1
    info = metrics.registry.get_sample_value(
        "pruneserve_model_info",
        {"model": "tiny-embed", "version": "1", "engine": "onnxruntime", "provider": "CPUExecutionProvider",
         "providers": "CPUExecutionProvider", "engine_version": ort.__version__, "threads": "1", "precision": "f32",
         "task": "embedding", "quantization": "none", "batch_invariant": "true",
         "max_sequence_length": str(MAX_LEN), "target": "cpu", "kept_heads": "6", "total_heads": "12", "kept_heads_per_layer": "4,2"},
    )  # fmt: skip
    assert info == 1
    repo.close()


def test_unknown_engine_is_a_load_error(embedding_artifact: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"engine 'tvm' is unknown; use one of \['onnxruntime', 'openvino'\]"):
        create_engine("tvm", embedding_artifact / "model.onnx", EngineOptions(), ["input_ids"])


def test_openvino_engine_behind_the_same_interface(classifier_artifact: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    rt = _load(classifier_artifact, engine="openvino")
    assert rt.engine.name == "openvino" and rt.engine.providers == ["CPU"]
    assert rt.info["precision"] == "f32" and rt.batch_invariant
    got = _run(rt, text_request("tiny-cls", TEXTS))
    ids, mask, types = tokenize(TEXTS)
    want = reference_forward(classifier_artifact / "model.onnx", ids, mask, types)
    np.testing.assert_allclose(got["logits"], want, atol=1e-5)
    assert [x.decode() for x in got["label"].ravel()] == [LABELS[i] for i in want.argmax(1)]
    # Lowered precision is allowed, but then the model is not served as batch-invariant (on a
    # CPU without bf16 units OpenVINO keeps f32: the flag follows the precision really used).
    lowered = _load(classifier_artifact, engine="openvino", openvino_precision="bf16")
    assert lowered.batch_invariant == (lowered.info["precision"] == "f32")


def test_auto_engine_uses_onnxruntime(embedding_artifact: Path) -> None:
    assert _load(embedding_artifact, engine="auto").engine.name == "onnxruntime"


def test_prepared_sizes(embedding_artifact: Path) -> None:
    rt = _load(embedding_artifact)
    p = rt.prepare(text_request("tiny-embed", ["hello", "hello world"]), 32)
    assert isinstance(p, Prepared)
    assert p.size == 2 and p.length == 4 and p.encoded.tokens == 7
