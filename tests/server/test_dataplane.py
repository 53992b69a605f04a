"""The data plane's API as the transport sees it: health, metadata, config, statistics, errors, shadow."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from tiny_artifacts import HIDDEN, LABELS, reference_forward, text_request, tokenize

from pruneserve import __version__
from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.errors import NotFoundError, UnavailableError
from pruneserve.server.metrics import Metrics
from pruneserve.server.types import TensorSpec


def test_health_and_lifecycle(serve_config: ServeConfig) -> None:
    async def main() -> None:
        dp = DataPlane(serve_config)
        assert dp.live() and not dp.ready() and not dp.model_ready("tiny-embed")
        with pytest.raises(UnavailableError):
            await dp.infer(text_request("tiny-embed", ["hello"]))
        await dp.start()
        assert dp.ready()
        assert dp.model_ready("tiny-embed") and dp.model_ready("tiny-embed", "1")
        assert not dp.model_ready("tiny-embed", "2") and not dp.model_ready("absent")
        await dp.stop(1)
        assert not dp.live() and not dp.ready() and not dp.model_ready("tiny-embed")
        await dp.stop(1)  # idempotent

    asyncio.run(main())


def test_metadata_and_config(serve_config: ServeConfig, run_dataplane) -> None:
    async def scenario(dp: DataPlane) -> None:
        meta = dp.server_metadata()
        assert meta == {"name": "pruneserve", "version": __version__, "extensions": ["model_configuration", "statistics", "model_repository"]}
        assert dp.model_names() == ["tiny-cls", "tiny-embed"]

        m = dp.model_metadata("tiny-cls")
        assert m.name == "tiny-cls" and m.versions == ["1"] and m.platform == "onnxruntime_onnx"
        assert m.inputs[0] == TensorSpec("text", "BYTES", [-1, 1], optional=True)
        assert [i.name for i in m.inputs] == ["text", "input_ids", "attention_mask", "token_type_ids"]
        assert m.outputs == [TensorSpec("logits", "FP32", [-1, len(LABELS)]), TensorSpec("label", "BYTES", [-1, 1])]

        c = dp.model_config("tiny-embed")
        assert c.max_batch_size == 32 and c.max_queue_delay_us == 5000 and c.max_queue_size == 1024
        assert c.inputs[0].shape == [1] and c.outputs == [TensorSpec("embedding", "FP32", [HIDDEN])]
        assert c.backend == "onnxruntime" and c.platform == "onnxruntime_onnx"
        assert c.parameters["task"] == "embedding" and c.parameters["providers"] == "CPUExecutionProvider"

        with pytest.raises(NotFoundError, match=r"model 'absent' is not served here; available models: \['tiny-cls', 'tiny-embed'\]"):
            dp.model_metadata("absent")
        with pytest.raises(NotFoundError):
            dp.model_config("tiny-embed", "7")

    run_dataplane(serve_config, scenario)


def test_statistics(serve_config: ServeConfig, run_dataplane) -> None:
    async def scenario(dp: DataPlane):
        await dp.infer(text_request("tiny-embed", ["hello", "world"]))
        await dp.infer(text_request("tiny-embed", ["cats"]))
        with pytest.raises(Exception):
            await dp.infer(text_request("tiny-embed", ["x"], outputs=["nope"]))
        with pytest.raises(NotFoundError):
            dp.model_statistics("absent")
        return dp.model_statistics(), dp.model_statistics("tiny-embed"), dp.model_statistics("tiny-embed", "1")

    every, by_name, by_version = run_dataplane(serve_config, scenario)
    assert [s.name for s in every] == ["tiny-cls", "tiny-embed"]
    assert by_name == by_version
    s = by_name[0]
    assert (s.success.count, s.fail.count, s.inference_count) == (2, 1, 3)
    assert s.execution_count == 2 and s.queue.count == 2 and s.compute_infer.count == 2
    assert s.last_inference_ms > 0 and s.success.ns > 0
    assert sorted(b.batch_size for b in s.batch_stats) == [1, 2]
    assert every[0].inference_count == 0


def test_infer_answers_both_tasks(serve_config: ServeConfig, embedding_artifact: Path, classifier_artifact: Path, run_dataplane) -> None:
    texts = ["hello world", "happy cats", "sad dogs"]

    async def scenario(dp: DataPlane):
        return await asyncio.gather(
            dp.infer(text_request("tiny-embed", texts, rid="e1")),
            dp.infer(text_request("tiny-cls", texts, outputs=["label"], rid="c1")),
        )

    emb, cls = run_dataplane(serve_config, scenario)
    ids, mask, types = tokenize(texts)
    assert (emb.model, emb.version, emb.id) == ("tiny-embed", "1", "e1")
    [out] = emb.outputs
    assert (out.name, out.datatype, out.shape) == ("embedding", "FP32", (3, HIDDEN))
    np.testing.assert_allclose(out.data, reference_forward(embedding_artifact / "model.onnx", ids, mask, types), atol=1e-5)
    [label] = cls.outputs
    logits = reference_forward(classifier_artifact / "model.onnx", ids, mask, types)
    assert (label.name, label.datatype, label.shape) == ("label", "BYTES", (3, 1))
    assert [x.decode() for x in label.data.ravel()] == [LABELS[i] for i in logits.argmax(1)]


def test_shadow_traffic_measures_fidelity_against_reference(artifact_factory, run_dataplane) -> None:
    path = artifact_factory(name="shadowed", with_reference=True)
    metrics = Metrics()
    texts = ["hello world", "the quick brown fox", "cats"]

    async def scenario(dp: DataPlane) -> None:
        await dp.infer(text_request("shadowed", texts))
        for _ in range(2000):  # the comparison runs in the background
            if metrics.registry.get_sample_value("pruneserve_shadow_comparisons_total", {"model": "shadowed", "version": "1", "outcome": "compared"}):
                return
            await asyncio.sleep(0.005)
        raise AssertionError("shadow comparison never finished")

    run_dataplane(ServeConfig(artifacts=[str(path)], threads=1, shadow_rate=1.0), scenario, metrics)
    ids, mask, types = tokenize(texts)
    served = reference_forward(path / "model.onnx", ids, mask, types)
    ref = reference_forward(path / "reference.onnx", ids, mask, types)
    cos = (served * ref).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(ref, axis=1))
    labels = {"model": "shadowed", "version": "1"}
    assert metrics.registry.get_sample_value("pruneserve_live_fidelity_count", labels) == len(texts)
    assert metrics.registry.get_sample_value("pruneserve_live_fidelity_sum", labels) == pytest.approx(cos.sum(), abs=1e-4)


def test_shadow_is_off_by_default(artifact_factory, run_dataplane) -> None:
    path = artifact_factory(name="shadowed", with_reference=True)
    metrics = Metrics()

    async def scenario(dp: DataPlane) -> None:
        assert dp.repository.get("shadowed").reference is None
        await dp.infer(text_request("shadowed", ["hello"]))

    run_dataplane(ServeConfig(artifacts=[str(path)], threads=1), scenario, metrics)
    assert metrics.registry.get_sample_value("pruneserve_live_fidelity_count", {"model": "shadowed", "version": "1"}) is None


def test_small_requests_are_prepared_inline_and_large_ones_in_the_pool(serve_config: ServeConfig, run_dataplane) -> None:
    from tiny_artifacts import WORDS

    from pruneserve.server.dataplane import INLINE_PREPARE_MAX_BYTES, request_payload_bytes

    small = text_request("tiny-embed", ["hello world"])
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(20))
    large = text_request("tiny-embed", [long_text] * 24)
    assert request_payload_bytes(small) <= INLINE_PREPARE_MAX_BYTES < request_payload_bytes(large)

    async def scenario(dp: DataPlane):
        a = await dp.infer(small)
        after_small = dp.inline_prepares
        b = await dp.infer(large)
        return a, b, after_small, dp.inline_prepares

    a, b, after_small, after_large = run_dataplane(serve_config, scenario)
    assert (after_small, after_large) == (1, 1)  # the large one went through the thread pool
    # Both paths compute the same thing as an independent forward pass.
    for response, texts in ((a, ["hello world"]), (b, [long_text] * 24)):
        expected = reference_forward(serve_config.artifacts[0] + "/model.onnx", *tokenize(texts))
        np.testing.assert_allclose(response.outputs[0].data, expected, atol=1e-5)
