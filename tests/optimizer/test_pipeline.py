"""The optimize pipeline on a tiny model: a verified artifact with the manifest the server needs,
a config that round-trips, and nothing at --out when a run fails or is interrupted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from tokenizers import Tokenizer

from prune_testing import quick_optimize_config

from pruneserve.artifact import load_artifact, sha256_file
from pruneserve.optimizer.adapters import load_model
from pruneserve.optimizer.errors import ConfigError
from pruneserve.optimizer.pipeline import OptimizeConfig, OptimizeResult, run_optimize

TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="module")
def result(tiny_model_dir: TinyModelFactory, tmp_path_factory: pytest.TempPathFactory) -> OptimizeResult:
    out = tmp_path_factory.mktemp("pipeline") / "artifact"
    # An explicit mode: forced, whatever the measurements say (auto is tested in test_auto_quantize.py).
    config = quick_optimize_config(tiny_model_dir("bert", "embedding"), out, with_reference=True,
                                   quantize={"mode": "dynamic"})
    return run_optimize(config, progress=False)


def test_artifact_is_complete_and_verified(result: OptimizeResult) -> None:
    artifact = load_artifact(result.artifact.path)  # checks every sha256
    expected = {"model.onnx", "tokenizer.json", "report.md", "optimize.yaml", "pruning.json", "reference.onnx",
                "importance.png", "tradeoff.png", "latency.png"}
    assert set(artifact.manifest.files) == expected
    for name, meta in artifact.manifest.files.items():
        assert sha256_file(artifact.path / name) == meta["sha256"]
    assert sorted(p.name for p in artifact.path.iterdir()) == sorted(expected | {"manifest.json"})
    # No scratch or partial directories are left beside the artifact.
    assert [p.name for p in artifact.path.parent.iterdir()] == ["artifact"]


def test_manifest_records_how_the_model_was_made(result: OptimizeResult, tiny_model_dir: TinyModelFactory) -> None:
    m = result.artifact.manifest
    assert m.task == "embedding" and m.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert [(o.name, o.dims) for o in m.outputs] == [("embedding", [32])]
    assert m.max_sequence_length == 64 and m.opset == 17 and m.target == "cpu"
    kept = m.pruning["kept_heads_per_layer"]
    assert sum(kept) == 6  # the default preset removes half of the 12 heads
    for layer, pruned_heads in enumerate(m.pruning["pruned_head_indices"]):
        assert sorted(pruned_heads + m.pruning["kept_head_indices"][layer]) == list(range(4))
    assert m.pruning["ffn_sizes_per_layer"] == [64, 64, 64]
    assert m.pruning["params"]["after"] < m.pruning["params"]["before"]
    assert m.pruning["flops"]["after"] < m.pruning["flops"]["before"]
    assert m.fusion["counts"]["Attention"] == sum(k > 0 for k in kept)
    assert m.quantization["mode"] == "dynamic" and m.quantization["per_channel"] is True
    assert m.batch_invariant is False
    assert list(m.quality["stages"]) == ["pruned", "recovered", "fused", "quantized"]
    assert "Python documentation" in m.quality["data"]
    assert m.quality["final"]["score"] == pytest.approx(m.quality["stages"]["quantized"]["score"])
    assert 0.0 < m.quality["stages"]["quantized"]["score"] <= 1.0
    latency = m.latency["median_ms"]
    assert {"artifact", "original (PyTorch fp32)", "original fused INT8"} <= set(latency)
    assert set(latency["artifact"]["median_ms"]) == {"b1x8", "b2x16"}
    assert m.runtime["providers_used_at_build"] == ["CPUExecutionProvider"]
    # The forced mode was measured on every engine installed; the engine was chosen among them.
    selection = m.quantization["selection"]
    assert selection["by"].startswith("forced by --quantize dynamic") and list(selection["candidates"]) == ["dynamic"]
    assert selection["batch_invariance_required"] is False  # dynamic INT8 never promised it
    assert m.engines == selection["candidates"]["dynamic"]["engines"] and "onnxruntime" in m.engines
    assert m.engines["onnxruntime"]["batch_invariance"] > 1e-4  # dynamic INT8: answers move with batch-mates
    chosen = selection["chosen"]["engine"]
    assert m.runtime["engine"] == m.engines[chosen]["engine"] and "error" not in m.engines[chosen]
    if "openvino-f32" in m.engines:  # OpenVINO cannot read ONNX Runtime's quantized contrib ops: recorded, no crash
        assert "QAttention" in m.engines["openvino-f32"]["error"] and chosen == "onnxruntime"
    assert m.source["sha256"] == load_model(tiny_model_dir("bert", "embedding")).source_sha256
    assert {"torch", "onnx", "onnxruntime"} <= set(m.tool_versions)
    assert [s["name"] for s in m.pruning["stages"]] == ["load", "data", "prune", "export", "fuse", "quantize",
                                                        "engines", "validate"]


def test_saved_config_round_trips(result: OptimizeResult) -> None:
    m = result.artifact.manifest
    again = OptimizeConfig.from_dict(m.config)
    assert again.to_dict() == m.config
    from_yaml = OptimizeConfig.from_dict(yaml.safe_load((result.artifact.path / "optimize.yaml").read_text()))
    assert from_yaml.to_dict() == m.config
    assert m.config["quantize"]["mode"] == "dynamic"  # the forced mode is saved as given
    pruning = json.loads((result.artifact.path / "pruning.json").read_text())
    assert pruning["heads_per_layer"] == m.pruning["kept_heads_per_layer"]


def test_manifest_records_pooling_and_normalisation(result: OptimizeResult) -> None:
    # The tiny sentence-transformers folder mean-pools and lists a Normalize module.
    m = load_artifact(result.artifact.path).manifest
    assert (m.pooling, m.normalize) == ("mean", True)


def test_an_onnxruntime_session_answers_like_the_original(result: OptimizeResult,
                                                          tiny_model_dir: TinyModelFactory,
                                                          sample_texts: list[str]) -> None:
    path = result.artifact.path
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_padding()
    enc = tok.encode_batch(sample_texts)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    got = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == (len(sample_texts), 32) and np.isfinite(got).all()
    original = load_model(tiny_model_dir("bert", "embedding")).encoder
    with torch.no_grad():
        want = original(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.mean() > 0.5
    # The reference is the unpruned fp32 model, exactly.
    ref = ort.InferenceSession(str(path / "reference.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(ref - want).max() < 1e-4
    assert result.artifact.manifest.reference_file == "reference.onnx"


def test_interrupted_write_leaves_nothing(tiny_model_dir: TinyModelFactory, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pruneserve.artifact as artifact_module

    real_copy = artifact_module.shutil.copyfile
    calls = []

    def copy_then_interrupt(src: object, dst: object) -> object:
        calls.append(dst)
        if len(calls) == 3:  # some files already copied into the hidden staging folder
            raise KeyboardInterrupt
        return real_copy(src, dst)

    monkeypatch.setattr(artifact_module.shutil, "copyfile", copy_then_interrupt)
    out = tmp_path / "out"
    config = quick_optimize_config(tiny_model_dir("bert", "embedding"), out, latency_shapes=[[1, 8]],
                                   validate={"baselines": False})
    with pytest.raises(KeyboardInterrupt):
        run_optimize(config, progress=False)
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_existing_out_fails_before_any_work(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        run_optimize(quick_optimize_config(Path("/nonexistent/model"), out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"target": "tpu"}, "target"),
        ({"target": "tensorrt", "quantize": {"mode": "dynamic"}}, "TensorRT"),
        ({"quantize": {"mode": "fp16"}}, "fp16"),
        ({"quality_floor": 1.5}, "quality_floor"),
        ({"preset": "extreme"}, "preset"),
        ({"colour": "blue"}, "colour"),
        ({"quantize": {"bits": 4}}, "bits"),
        ({"validate": [1, 2]}, "validate"),
        ({"validate": {"engines": ["tensorrt"]}}, "validate.engines"),
        ({"validate": {"engine_rounds": 0}}, "engine_rounds"),
        ({"quantize": {"candidates": ["fp16"]}}, "candidates"),
        ({"allow_batch_variance": "yes"}, "allow_batch_variance"),
        ({"prune": {"budget": {"head_fraction": 2.0}}}, "head_fraction"),
        ({"out": ""}, "out"),
    ],
)
def test_config_errors_name_the_value(raw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        OptimizeConfig.from_dict({"out": "x", **raw})


@pytest.mark.parametrize(("target", "mode"), [("cpu", "auto"), ("cuda", "fp16"), ("tensorrt", "static")])
def test_auto_quantization_on_gpu_targets_follows_the_target(target: str, mode: str) -> None:
    # cpu stays "auto": the candidates are measured at run time; GPU targets cannot be measured here.
    config = OptimizeConfig.from_dict({"out": "x", "target": target})
    assert config.quantize.mode == mode
    assert config.quantize.batch_invariant is (mode not in ("dynamic", "auto"))


def test_defaults_are_what_a_user_wants_on_the_default_model() -> None:
    config = OptimizeConfig(out="x")
    assert config.model is None and config.target == "cpu" and config.preset == "default"
    assert config.quantize.mode == "auto" and config.quantize.per_channel
    assert config.quantize.candidates == ["dynamic", "static", "none"] and config.allow_batch_variance is False
    assert config.prune.budget.head_fraction == 0.5 and config.effective_floor == 0.95
    assert [list(s) for s in config.validate.latency_shapes] == [[1, 32], [32, 128]]
    assert OptimizeConfig.from_dict(yaml.safe_load(config.to_yaml())).to_dict() == config.to_dict()


def test_budget_floor_is_the_artifact_floor() -> None:
    config = OptimizeConfig.from_dict({"out": "x", "prune": {"budget": {"quality_floor": 0.97}}})
    assert config.effective_floor == 0.97


def test_tensorrt_target_gives_a_calibrated_batch_invariant_artifact(tiny_model_dir: TinyModelFactory,
                                                                     tmp_path: Path) -> None:
    config = quick_optimize_config(tiny_model_dir("bert", "embedding"), tmp_path / "trt", target="tensorrt",
                                   latency_shapes=[[1, 8]], validate={"baselines": False})
    m = run_optimize(config, progress=False).artifact.manifest
    assert m.quantization["mode"] == "static" and m.quantization["source_graph"] == "unfused"
    assert m.quantization["calibration_size"] == 36  # one text per feed, from the 36 scoring texts
    # Embedding models go through static_int8.py (NNCF, then ORT with measured exclusions).
    assert m.quantization["settings"]["method"] in ("nncf", "ort")
    assert m.quantization["settings"]["batch_invariance"] <= 1e-5
    assert m.batch_invariant is True
    assert m.runtime["providers"][0] == "TensorrtExecutionProvider"
    # Nothing here can measure TensorRT: no engines compared, and the manifest says so.
    assert m.engines == {} and m.quantization["selection"]["measured"] is False
    assert "TensorrtExecutionProvider" in m.quantization["selection"]["by"]
    assert m.quantization["selection"]["batch_invariance_onnxruntime_cpu"] <= 1e-4
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        # Measured on the CPU provider instead, and the artifact says so.
        assert m.runtime["providers_used_at_build"] == ["CPUExecutionProvider"]
        assert "CPUExecutionProvider" in (tmp_path / "trt" / "report.md").read_text().split("## Warnings")[1]
    assert m.quality["stages"]["quantized"]["score"] > 0.9


def test_calibration_feeds_are_single_unpadded_texts(tiny_model_dir: TinyModelFactory) -> None:
    from pruneserve.optimizer.config import DataConfig
    from pruneserve.optimizer.pipeline import calibration_feeds
    from pruneserve.optimizer.pruner import prepare_data

    _, score_batches, _ = prepare_data(load_model(tiny_model_dir("bert", "embedding")),
                                       DataConfig(max_examples=48, batch_size=16))
    feeds = calibration_feeds(score_batches, 20)
    assert len(feeds) == 20  # capped at the limit, from the scoring split only
    first = score_batches[0]
    for row, feed in enumerate(feeds[:first.size]):
        length = int(first.attention_mask[row].sum())
        assert set(feed) == set(first.inputs) and feed["input_ids"].shape == (1, length)
        assert (feed["attention_mask"] == 1).all()  # padding never enters the calibrated ranges
        assert (feed["input_ids"][0] == first.inputs["input_ids"][row, :length].numpy()).all()
    assert len(calibration_feeds(score_batches, 10_000)) == sum(b.size for b in score_batches)
