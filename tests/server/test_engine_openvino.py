"""OpenVINO engine: same answers as ONNX Runtime on the same artifact, dynamic shapes, threads,
precision choice, and a clear error when the package is missing (simulated by failing its import)."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import dataclasses
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino  # noqa: F401 - the module needs the optional extra
import pytest
from tiny_artifacts import reference_forward, tokenize

from pruneserve.artifact import load_artifact
from pruneserve.engines import EngineLoadError, EngineOptions
from pruneserve.engines.openvino import (
    OpenVinoEngine,
    OpenVinoSettings,
    bf16_supported,
    create_openvino_engine,
    resolve_precision,
)
from pruneserve.engines.ort import OnnxRuntimeEngine

TEXTS = ["hello world", "the quick brown fox jumps over the lazy dog", "cat", "a very long sentence about red cats and dogs"]


def _engines(artifact_dir: Path) -> tuple[OpenVinoEngine, OnnxRuntimeEngine, list[str]]:
    art = load_artifact(artifact_dir)
    opts = EngineOptions(threads=1)
    inputs = art.manifest.inputs
    ovr = create_openvino_engine(art.model_path, opts, inputs)
    assert isinstance(ovr, OpenVinoEngine)
    return ovr, OnnxRuntimeEngine(art.model_path, opts, inputs), inputs


def _feeds(texts: list[str], inputs: list[str]) -> dict[str, np.ndarray]:
    ids, mask, types = tokenize(texts)
    return {k: v for k, v in {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}.items() if k in inputs}


@pytest.mark.parametrize("artifact", ["embedding_artifact", "classifier_artifact"])
def test_same_answers_as_onnxruntime_and_numpy(artifact: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(artifact)
    ovr, ort_engine, inputs = _engines(path)
    assert ovr.precision == "f32"  # nothing recorded in the manifest: the validated precision
    assert set(ovr.input_names) == set(inputs)
    assert ovr.output_names == ort_engine.output_names
    # Different shapes through one compiled model: batch 1..4, several sequence lengths.
    for texts in (TEXTS[:1], TEXTS, TEXTS[1:3], TEXTS[2:3]):
        feeds = _feeds(texts, inputs)
        got, want = ovr.run(feeds), ort_engine.run(feeds)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
        ref = reference_forward(load_artifact(path).model_path, *[feeds.get(k) for k in ("input_ids", "attention_mask", "token_type_ids")])
        np.testing.assert_allclose(got[ovr.output_names[0]], ref, atol=1e-4, rtol=1e-4)


def test_requested_outputs_and_copies(embedding_artifact: Path) -> None:
    ovr, _, inputs = _engines(embedding_artifact)
    feeds = _feeds(TEXTS[:2], inputs)
    first = ovr.run(feeds, ["embedding"])
    assert list(first) == ["embedding"]
    kept = first["embedding"].copy()
    ovr.run(_feeds(TEXTS[2:], inputs))  # must not overwrite the arrays handed out before
    np.testing.assert_array_equal(first["embedding"], kept)


def test_batch_invariant_in_f32(embedding_artifact: Path) -> None:
    ovr, _, inputs = _engines(embedding_artifact)
    alone = ovr.run(_feeds([TEXTS[0]], inputs))["embedding"][0]
    batched = ovr.run(_feeds(TEXTS, inputs))["embedding"][0]
    assert np.abs(alone - batched).max() <= 1e-5


def test_concurrent_runs_from_several_threads(embedding_artifact: Path) -> None:
    ovr, ort_engine, inputs = _engines(embedding_artifact)
    jobs = [TEXTS[i % len(TEXTS) :] + TEXTS[: i % len(TEXTS)] for i in range(8)]
    want = [ort_engine.run(_feeds(t, inputs))["embedding"] for t in jobs]
    got: list[Any] = [None] * len(jobs)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                got[i] = ovr.run(_feeds(jobs[i], inputs))["embedding"]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_describe_reports_engine_device_and_precision(embedding_artifact: Path) -> None:
    ovr, _, _ = _engines(embedding_artifact)
    info = ovr.describe()
    assert info["engine"] == "openvino" and info["provider"] == "CPU"
    assert info["precision"] == "f32" and info["engine_version"]
    assert not ovr.fell_back


def test_precision_resolution_order() -> None:
    floor = 0.99
    assert resolve_precision("f32", bf16_supported=True, runtime={"engine": "openvino", "precision": "bf16"}) == "f32"
    assert resolve_precision("auto", bf16_supported=True, runtime={"engine": "openvino", "precision": "bf16"}) == "bf16"
    measured = {"openvino-bf16": {"fidelity": 0.9999}}
    assert resolve_precision("auto", bf16_supported=True, engines=measured, quality_floor=floor) == "bf16"
    assert resolve_precision("auto", bf16_supported=True, engines={"openvino-bf16": {"fidelity": 0.98}}, quality_floor=floor) == "f32"
    assert resolve_precision("auto", bf16_supported=True, engines=measured, quality_floor=None) == "f32"
    # bf16 without bf16 units would be ignored by OpenVINO: say f32, which is what runs.
    assert resolve_precision("bf16", bf16_supported=False) == "f32"


def test_recorded_precision_is_read_from_the_verified_manifest(artifact_factory: Any, tmp_path: Path) -> None:
    path = artifact_factory(task="embedding", name="ov-prec")
    art = load_artifact(path)
    manifest = dataclasses.replace(art.manifest, runtime={"engine": "openvino", "precision": "bf16"})
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    engine = OpenVinoEngine(art.model_path, EngineOptions(threads=1), inputs, manifest=manifest)
    assert engine.precision == ("bf16" if bf16_supported() else "f32")
    # The file on disk is not re-read: without the manifest object, auto means f32.
    (path / "manifest.json").write_text(json.dumps({**json.loads((path / "manifest.json").read_text()),
                                                    "runtime": {"engine": "openvino", "precision": "bf16"}}))
    assert OpenVinoEngine(art.model_path, EngineOptions(threads=1), inputs).precision == "f32"


def test_streams_and_threads_are_applied(embedding_artifact: Path) -> None:
    art = load_artifact(embedding_artifact)
    engine = OpenVinoEngine(art.model_path, EngineOptions(threads=2), art.manifest.inputs, OpenVinoSettings(threads=2, streams=2))
    info = engine.describe()
    # What OpenVINO really compiled (a stream needs a thread of its own), not what was asked.
    assert info["streams"] == str(engine._compiled.get_property("NUM_STREAMS")) and info["streams"] in ("1", "2")
    assert info["threads"] == "2"
    single = OpenVinoEngine(art.model_path, EngineOptions(threads=1), art.manifest.inputs, OpenVinoSettings(threads=1, streams=2))
    assert single.describe()["streams"] == "1"
    feeds = _feeds(TEXTS, art.manifest.inputs)
    np.testing.assert_allclose(engine.run(feeds)["embedding"], _engines(embedding_artifact)[1].run(feeds)["embedding"], atol=1e-5)


def test_settings_validation() -> None:
    with pytest.raises(EngineLoadError, match="precision 'fp8'"):
        OpenVinoSettings(precision="fp8")
    with pytest.raises(EngineLoadError, match="streams 0"):
        OpenVinoSettings(streams=0)
    assert OpenVinoSettings.from_options(EngineOptions(threads=3)).threads == 3


def test_unreadable_model_is_a_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EngineLoadError, match="OpenVINO cannot read model.onnx"):
        create_openvino_engine(bad, EngineOptions(), ["input_ids"])


def test_graph_with_onnxruntime_contrib_ops_names_the_op(tmp_path: Path) -> None:
    """A graph fused/quantized for ONNX Runtime (e.g. dynamic INT8's QAttention) is refused clearly."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch", "sequence", 8])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", "sequence", 8])
    node = helper.make_node("QAttention", ["input_ids"], ["embedding"], domain="com.microsoft", num_heads=2)
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(EngineLoadError, match="QAttention") as err:
        create_openvino_engine(path, EngineOptions(), ["input_ids"])
    assert "Exception from" not in str(err.value)


def test_missing_openvino_gives_install_hint(monkeypatch: pytest.MonkeyPatch, embedding_artifact: Path) -> None:
    real_import = builtins.__import__

    def failing_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(EngineLoadError) as err:
        create_openvino_engine(load_artifact(embedding_artifact).model_path, EngineOptions(), ["input_ids"])
    message = str(err.value)
    assert "pip install 'pruneserve[openvino]'" in message and "onnxruntime" in message


def test_module_import_does_not_import_openvino_or_torch() -> None:
    code = (
        "import sys, pruneserve.engines.openvino as m; "
        "print(int('openvino' in sys.modules), int('torch' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]


def test_model_runtime_serves_through_openvino(embedding_artifact: Path) -> None:
    """Through the runtime's ENGINES registry, the engine serves a whole ModelRuntime batch like ONNX Runtime."""
    from pruneserve.server import runtime
    from pruneserve.server.config import ServeConfig

    art = load_artifact(embedding_artifact)
    served = {}
    for engine in ("openvino", "onnxruntime"):
        config = ServeConfig(artifacts=[str(embedding_artifact)], engine=engine, threads=1, grpc_port=0, metrics_port=0)
        rt = runtime.ModelRuntime.load(art, config)
        assert rt.info["engine"] == engine
        assert isinstance(rt.engine, OpenVinoEngine) == (engine == "openvino")
        prepared = [rt.processor.encode_texts([t.encode()]) for t in TEXTS]
        batch = [runtime.Prepared(e, ["embedding"]) for e in prepared]
        results, _ = rt.execute(batch)
        served[engine] = np.concatenate([r["embedding"] for r in results])
        rt.close()
    np.testing.assert_allclose(served["openvino"], served["onnxruntime"], atol=1e-5)
