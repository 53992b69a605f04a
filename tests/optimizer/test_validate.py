"""Validation: it passes a faithful graph and catches a broken one (checker, parity, quality floor)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pruneserve.optimizer import validate
from pruneserve.optimizer.adapters import LoadedModel, load_model, tokenize
from pruneserve.optimizer.data import Batch
from pruneserve.optimizer.errors import ConfigError, ValidationError
from pruneserve.optimizer.export import export_onnx
from pruneserve.optimizer.pruning import PruningPlan, prune
from pruneserve.optimizer.quality import Quality, teacher_outputs

TinyModelFactory = Callable[..., Path]


@dataclass
class Setup:
    loaded: LoadedModel
    graph: Path
    batches: list[Batch]
    teacher: list[torch.Tensor]


@pytest.fixture(scope="module")
def setup(tiny_model_dir: TinyModelFactory, sample_texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> Setup:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    graph = export_onnx(loaded.encoder, tmp_path_factory.mktemp("validate") / "model.onnx").path
    texts = sample_texts * 2
    batches = [Batch(dict(tokenize(loaded.tokenizer, texts[i : i + 4], None, 64, True))) for i in range(0, len(texts), 4)]
    return Setup(loaded, graph, batches, teacher_outputs(loaded.encoder, batches))


def _broken_copy(src: Path, dst: Path) -> Path:
    """The same graph with one weight matrix scrambled: loads and runs, but answers wrongly."""
    model = onnx.load(str(src))
    weights = [i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] == i.dims[1]]
    target = weights[len(weights) // 2]
    array = onnx.numpy_helper.to_array(target)
    target.CopyFrom(onnx.numpy_helper.from_array(-3.0 * array[::-1].copy(), target.name))
    onnx.save(model, str(dst))
    return dst


def test_a_faithful_graph_passes(setup: Setup) -> None:
    validate.check_graph(setup.graph)
    quality = validate.onnx_quality(setup.graph, "embedding", setup.teacher, setup.batches)
    assert quality.examples == 16
    assert quality.mean_cosine == pytest.approx(1.0, abs=1e-5)
    validate.require_floor(quality, 0.99, "final", "test data")
    assert validate.check_parity(setup.loaded.encoder, setup.graph, setup.batches, atol=1e-4) <= 1e-4


def test_a_broken_graph_misses_the_floor(setup: Setup, tmp_path: Path) -> None:
    broken = _broken_copy(setup.graph, tmp_path / "broken.onnx")
    validate.check_graph(broken)  # structurally fine: only the quality check can catch it
    quality = validate.onnx_quality(broken, "embedding", setup.teacher, setup.batches)
    assert quality.mean_cosine is not None and quality.mean_cosine < 0.95
    with pytest.raises(ValidationError) as info:
        validate.require_floor(quality, 0.95, "final", "my traffic.jsonl")
    message = str(info.value)
    assert "0.95" in message and "my traffic.jsonl" in message and "--quality-floor" in message


def test_parity_catches_a_graph_of_another_model(setup: Setup) -> None:
    spec = setup.loaded.encoder.spec
    plan = PruningPlan([list(range(spec.num_heads - 1))] * spec.num_layers,
                       [list(range(spec.intermediate_size))] * spec.num_layers)
    other = prune(setup.loaded.encoder, plan)
    with pytest.raises(ValidationError, match="does not match the pruned PyTorch model"):
        validate.check_parity(other, setup.graph, setup.batches, atol=1e-4)


def test_checker_rejects_a_malformed_graph(setup: Setup, tmp_path: Path) -> None:
    model = onnx.load(str(setup.graph))
    model.graph.node[len(model.graph.node) // 2].input[0] = "no_such_tensor"
    path = tmp_path / "malformed.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValidationError, match="ONNX checker"):
        validate.check_graph(path)


def test_nan_outputs_never_pass_a_floor(setup: Setup) -> None:
    nan_outputs = [np.full(t.shape, np.nan, dtype=np.float32) for t in setup.teacher]
    quality = validate.compare_outputs("embedding", nan_outputs, setup.teacher, setup.batches)
    with pytest.raises(ValidationError):
        validate.require_floor(quality, 0.1, "final", "data")


def test_classification_quality_is_accuracy_drop() -> None:
    teacher = [torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])]
    batch = Batch({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, labels=torch.tensor([0, 1, 1, 1]))
    student = [np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)]
    quality = validate.compare_outputs("classification", student, teacher, [batch])
    assert quality.accuracy == 0.5 and quality.teacher_accuracy == 0.75 and quality.agreement == 0.75
    assert quality.score == pytest.approx(0.75)


def test_latency_reports_a_median_per_shape(setup: Setup) -> None:
    config = validate.ValidateConfig(latency_shapes=[[1, 8], [2, 16]], warmup=1, repeats=3, threads=1)
    latency = validate.onnx_latency(setup.graph, config, setup.loaded.encoder.spec.vocab_size)
    assert set(latency.median_ms) == {"b1x8", "b2x16"}
    assert all(v > 0 for v in latency.median_ms.values())
    assert latency.provider == "CPUExecutionProvider"
    torch_lat = validate.torch_latency(setup.loaded.encoder, config)
    assert set(torch_lat.median_ms) == {"b1x8", "b2x16"}
    timed = {"artifact": latency, "pytorch": torch_lat}
    ups = validate.speedups(timed)
    # A run disturbed by the machine's other load is left out and said so, never a silly ratio.
    outliers = {shape for shape in ("b1x8", "b2x16") if any(f" at {shape} " in n for n in validate.speedup_outliers(timed))}
    assert set(ups) == {"pytorch"} and set(ups["pytorch"]) | outliers == {"b1x8", "b2x16"}
    assert not set(ups["pytorch"]) & outliers


def test_provider_fallback_is_recorded_and_warned(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    requested, used, warning = validate.providers_used(setup.graph, "cpu")
    assert requested == used == ["CPUExecutionProvider"] and warning is None
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: there is no fallback to observe")
    requested, used, warning = validate.providers_used(setup.graph, "cuda")
    assert requested[0] == "CUDAExecutionProvider" and used == ["CPUExecutionProvider"]
    assert warning is not None and "CPUExecutionProvider" in warning
    assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"parity_atol": 0}, "parity_atol"),
        ({"latency_shapes": [[1]]}, "latency_shapes"),
        ({"latency_shapes": [[0, 32]]}, "latency_shapes"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        validate.ValidateConfig(**kwargs)  # type: ignore[arg-type]


def test_report_blocks_name_the_data(setup: Setup) -> None:
    q = Quality("embedding", 16, mean_cosine=0.97, min_cosine=0.9)
    lat = validate.Latency("onnxruntime", "CPUExecutionProvider", {"b1x32": 2.0}, 5)
    report = validate.ValidationReport(1e-6, {"fused": Quality("embedding", 16, mean_cosine=0.98, min_cosine=0.9),
                                              "quantized": q}, "my data", 16, 0.95, {"artifact": lat},
                                       ["CPUExecutionProvider"], ["CPUExecutionProvider"])
    block = report.quality_block()
    assert report.final_quality is q
    assert block["data"] == "my data" and block["final"]["score"] == 0.97
    assert list(block["stages"]) == ["fused", "quantized"]
    assert report.latency_block()["artifact"]["median_ms"] == {"b1x32": 2.0}


def test_latency_sessions_spin_as_the_server_does(setup: Setup) -> None:
    """The optimizer times (and chooses engines with) sessions set up like ``pruneserve serve``'s."""
    from pruneserve.server.config import ServeConfig
    from pruneserve.engines import EngineOptions
    from pruneserve.engines.ort import OnnxRuntimeEngine

    measured = validate.make_session(setup.graph).get_session_options()
    engine = OnnxRuntimeEngine(setup.graph, EngineOptions.from_config(ServeConfig(), 64), ["input_ids"])
    served = engine._session.get_session_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning", "session.force_spinning_stop"):
        assert measured.get_session_config_entry(key) == served.get_session_config_entry(key)
    assert measured.get_session_config_entry("session.force_spinning_stop") == "1"
