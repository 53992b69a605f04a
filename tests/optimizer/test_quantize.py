"""Quantization: dynamic and static INT8 run on the CPU and stay close to fp32; the sensitivity
fallback keeps the most sensitive nodes in float; fp16 keeps normalisations and Softmax in fp32."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from pruneserve.engines.ort import inference_session
from pruneserve.optimizer.adapters import load_model, tokenize
from pruneserve.optimizer.errors import ConfigError, QuantizationError
from pruneserve.optimizer.export import export_onnx
from pruneserve.optimizer.fusion import fuse
from pruneserve.optimizer.quantize import (
    FP16_KEEP_FP32_OPS,
    QuantizeConfig,
    convert_fp16,
    quantizable_nodes,
    quantize,
)

TinyModelFactory = Callable[..., Path]


@dataclass
class Graphs:
    unfused: Path
    fused: Path
    feeds: list[dict[str, np.ndarray]]
    reference: list[np.ndarray]


@pytest.fixture(scope="module")
def graphs(tiny_model_dir: TinyModelFactory, sample_texts: list[str], tmp_path_factory: pytest.TempPathFactory) -> Graphs:
    """A tiny BERT embedding model exported and fused, with tokenized feeds and fp32 outputs."""
    folder = tmp_path_factory.mktemp("quantize")
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    unfused = export_onnx(loaded.encoder, folder / "unfused.onnx").path
    fused = fuse(unfused, folder / "fused.onnx", loaded.encoder.spec).path
    texts = sample_texts * 3
    feeds = [
        {k: v.numpy() for k, v in tokenize(loaded.tokenizer, texts[i : i + 6], None, 64, True).items()}
        for i in range(0, len(texts), 6)
    ]
    session = inference_session(unfused)
    return Graphs(unfused, fused, feeds, [session.run(None, f)[0] for f in feeds])


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    session = inference_session(path)
    return [session.run(None, f)[0] for f in feeds]


def _mean_cosine(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    a, b = np.concatenate(got).astype(np.float64), np.concatenate(want).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def _evaluator(graphs: Graphs) -> Callable[[Path], float]:
    return lambda path: _mean_cosine(_outputs(path, graphs.feeds), graphs.reference)


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_dynamic_int8_runs_on_cpu_and_stays_close(graphs: Graphs, tmp_path: Path) -> None:
    result = quantize(graphs.fused, graphs.unfused, tmp_path / "q.onnx", QuantizeConfig(mode="dynamic"),
                      evaluate=_evaluator(graphs), quality_floor=0.9)
    ops = _op_types(result.path)
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLinear"}, ops
    assert result.quality is not None and result.quality > 0.98
    assert result.quality == pytest.approx(_evaluator(graphs)(result.path))
    assert result.source_graph == "fused" and result.per_channel
    assert result.batch_invariant is False  # activation scales span the whole padded batch
    assert result.excluded_nodes == [] and result.sensitivity == {}
    # INT8 weights are smaller than fp32 ones.
    assert result.path.stat().st_size < graphs.fused.stat().st_size


def test_static_qdq_runs_on_cpu_provider_and_stays_close(graphs: Graphs, tmp_path: Path) -> None:
    calibration = [{k: v[i : i + 1] for k, v in f.items()} for f in graphs.feeds for i in range(len(f["input_ids"]))]
    result = quantize(graphs.fused, graphs.unfused, tmp_path / "q.onnx", QuantizeConfig(mode="static"),
                      calibration=calibration, evaluate=_evaluator(graphs), quality_floor=0.9)
    model = onnx.load(str(result.path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Symmetric S8S8 (what TensorRT reads): every zero point is int8 and zero.
    zero_points = [i for i in model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points
    for zp in zero_points:
        assert zp.data_type == onnx.TensorProto.INT8
        assert not onnx.numpy_helper.to_array(zp).any()
    assert "Attention" not in ops  # QDQ goes on the unfused graph
    assert result.source_graph == "unfused" and result.batch_invariant is True
    assert result.calibration_size == len(calibration)
    assert result.quality is not None and result.quality > 0.95


def test_static_result_does_not_depend_on_batch_mates(graphs: Graphs, tmp_path: Path) -> None:
    calibration = [{k: v[i : i + 1] for k, v in f.items()} for f in graphs.feeds for i in range(2)]
    result = quantize(graphs.fused, graphs.unfused, tmp_path / "q.onnx", QuantizeConfig(mode="static"),
                      calibration=calibration)
    session = inference_session(result.path)
    batch = graphs.feeds[0]
    together = session.run(None, batch)[0]
    length = int(batch["attention_mask"][0].sum())
    alone = session.run(None, {k: v[:1, :length] for k, v in batch.items()})[0]
    assert np.abs(together[0] - alone[0]).max() < 1e-4


def test_static_without_calibration_data_is_a_clear_error(graphs: Graphs, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="calibration data"):
        quantize(graphs.fused, graphs.unfused, tmp_path / "q.onnx", QuantizeConfig(mode="static"))


def test_sensitivity_fallback_keeps_the_most_sensitive_nodes_in_float(graphs: Graphs, tmp_path: Path) -> None:
    evaluate = _evaluator(graphs)
    plain = quantize(graphs.fused, graphs.unfused, tmp_path / "plain.onnx", QuantizeConfig(mode="dynamic"),
                     evaluate=evaluate)
    assert plain.quality is not None and plain.quality < 1.0
    # A floor between "everything quantized" and fp32 can only be met by keeping nodes in float.
    floor = plain.quality + (1.0 - plain.quality) * 0.5
    candidates = quantizable_nodes(graphs.fused, "dynamic")
    config = QuantizeConfig(mode="dynamic", max_excluded_nodes=len(candidates))
    result = quantize(graphs.fused, graphs.unfused, tmp_path / "q.onnx", config, evaluate=evaluate,
                      quality_floor=floor)
    assert result.quality is not None and result.quality >= floor
    assert result.excluded_nodes, "the floor needed at least one node kept in float"
    assert set(result.sensitivity) == set(candidates)
    # The nodes kept in float are the most sensitive ones (lowest quality when quantized alone).
    ranked = sorted(candidates, key=lambda n: result.sensitivity[n])
    assert result.excluded_nodes == ranked[: len(result.excluded_nodes)]
    assert result.attempts[0]["excluded"] == [] and result.attempts[-1]["excluded"] == result.excluded_nodes
    assert result.to_manifest()["excluded_nodes"] == result.excluded_nodes
    assert result.quality == pytest.approx(evaluate(result.path))
    # The excluded nodes really stayed in float: their names survive unquantized in the graph.
    names = {n.name: n.op_type for n in onnx.load(str(result.path)).graph.node}
    for name in result.excluded_nodes:
        assert names.get(name) in ("MatMul", "Attention")


def test_unreachable_floor_says_what_was_tried(graphs: Graphs, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    config = QuantizeConfig(mode="dynamic", max_excluded_nodes=1)
    with pytest.raises(QuantizationError) as info:
        quantize(graphs.fused, graphs.unfused, out, config, evaluate=_evaluator(graphs), quality_floor=0.9999999)
    message = str(info.value)
    assert "0.9999999" in message and "1 of the" in message and "--quality-floor" in message
    assert not out.exists()


def test_fallback_off_fails_at_once(graphs: Graphs, tmp_path: Path) -> None:
    config = QuantizeConfig(mode="dynamic", sensitivity_fallback=False)
    with pytest.raises(QuantizationError, match="sensitivity fallback is off"):
        quantize(graphs.fused, graphs.unfused, tmp_path / "q.onnx", config, evaluate=_evaluator(graphs),
                 quality_floor=0.9999999)


def _typed_inputs_of_blocked_nodes(model: onnx.ModelProto, blocked: set[str]) -> list[tuple[str, str, int]]:
    """(node, input, elem type) for every input of a blocked node whose type is known."""
    types = {i.name: i.data_type for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            types.update({o: to for o in node.output})
    for vi in [*model.graph.input, *model.graph.value_info]:
        types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    out = []
    for node in model.graph.node:
        if node.op_type in blocked:
            out += [(node.name, i, types[i]) for i in node.input if i and i in types]
    return out


@pytest.mark.parametrize("which", ["fused", "unfused"])
def test_fp16_keeps_normalisation_and_softmax_in_fp32(graphs: Graphs, tmp_path: Path, which: str) -> None:
    src = graphs.fused if which == "fused" else graphs.unfused
    out = tmp_path / "fp16.onnx"
    settings = convert_fp16(src, out)
    model = onnx.load(str(out))
    blocked = {"LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "Softmax"}
    present = {n.op_type for n in model.graph.node} & blocked
    assert present, "the graph should contain normalisation or Softmax nodes"
    typed = _typed_inputs_of_blocked_nodes(model, blocked)
    assert any(t == onnx.TensorProto.FLOAT for _, _, t in typed)
    # No half-precision tensor reaches a kept op (integer ids into EmbedLayerNormalization are fine).
    assert not [x for x in typed if x[2] == onnx.TensorProto.FLOAT16]
    # The weights that matter went to fp16, and the graph's interface kept its types.
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.INT64] * 3
    assert set(settings["kept_fp32_ops"]) == set(FP16_KEEP_FP32_OPS)
    # The mixed-precision graph is well-typed: ONNX Runtime loads it and it answers like fp32.
    assert _mean_cosine(_outputs(out, graphs.feeds), graphs.reference) > 0.999


def test_fp16_through_quantize_records_its_settings(graphs: Graphs, tmp_path: Path) -> None:
    result = quantize(graphs.fused, graphs.unfused, tmp_path / "fp16.onnx", QuantizeConfig(mode="fp16"),
                      evaluate=_evaluator(graphs), quality_floor=0.99)
    assert result.mode == "fp16" and result.batch_invariant and result.source_graph == "fused"
    assert result.quality is not None and result.quality > 0.999
    assert result.settings["weight_type"] == "float16"


def test_none_copies_the_fused_graph(graphs: Graphs, tmp_path: Path) -> None:
    result = quantize(graphs.fused, graphs.unfused, tmp_path / "same.onnx", QuantizeConfig(mode="none"),
                      evaluate=_evaluator(graphs))
    assert result.path.read_bytes() == graphs.fused.read_bytes()
    assert result.quality == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "int4"}, "quantize mode"),
        ({"calibration_method": "mean"}, "calibration_method"),
        ({"calibration_size": 0}, "calibration_size"),
        ({"max_excluded_nodes": -1}, "max_excluded_nodes"),
        ({"static_method": "fast"}, r"quantize.static_method='fast' is not one of auto, nncf, ort"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        QuantizeConfig(**kwargs)  # type: ignore[arg-type]


def test_static_method_is_a_yaml_key_that_round_trips(tmp_path: Path) -> None:
    import yaml

    from pruneserve.optimizer.pipeline import OptimizeConfig

    assert QuantizeConfig().static_method == "auto"  # NNCF where installed, else ONNX Runtime
    config = OptimizeConfig.from_dict({"out": str(tmp_path / "a"), "quantize": {"static_method": "ort"}})
    assert config.quantize.static_method == "ort" and config.quantize.mode == "auto"
    saved = yaml.safe_load(config.to_yaml())  # what the artifact's optimize.yaml records
    assert saved["quantize"]["static_method"] == "ort"
    assert OptimizeConfig.from_dict(saved).quantize.static_method == "ort"
    with pytest.raises(ConfigError, match="static_method"):
        OptimizeConfig.from_dict({"out": str(tmp_path / "b"), "quantize": {"static_method": "NNCF"}})


def test_auto_mode_must_be_resolved(graphs: Graphs, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auto"):
        quantize(graphs.fused, graphs.unfused, tmp_path / "q.onnx", QuantizeConfig(mode="auto"))
