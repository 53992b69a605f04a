"""Calibrated static INT8 (NNCF and ONNX Runtime QDQ): quality floor, batch invariance, S8S8 form,
search records and refusals, on a tiny physically pruned encoder exported by ``export_onnx``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pruned_onnx import export_pruned, feeds, random_texts, torch_reference

from pruneserve.engines.measure import batch_invariance, fidelity, split_items, stack_items
from pruneserve.engines.openvino import openvino_runner
from pruneserve.engines.ort import ort_runner
from pruneserve.optimizer import static_int8
from pruneserve.optimizer.errors import ConfigError, QuantizationError
from pruneserve.optimizer.quantize import QuantizeConfig
from pruneserve.optimizer.static_int8 import (
    NNCF_INSTALL,
    StaticInt8Config,
    check_static_method,
    quantize_ort,
    quantize_static_int8,
)

#: A text's answer alone vs batched, for graphs with fixed activation scales.
INVARIANT = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("static-int8")
    path, encoder = export_pruned(folder / "fp32.onnx")
    evals = [feeds(random_texts(6, seed)) for seed in (10, 11, 12)]
    return {
        "folder": folder,
        "fp32": path,
        "calibration": [feeds([t]) for t in random_texts(16, 1)],
        "evals": evals,
        "reference": [torch_reference(encoder, f) for f in evals],
    }


def _probe_invariance(run, texts: list[list[int]]) -> float:  # noqa: ANN001 - a Runner
    """Independent of ``batch_invariance``: one text alone, with identical copies, and at row 2 of
    batches of random other texts of other lengths."""
    probe = texts[0]
    alone = run(feeds([probe]))[0]
    worst = float(np.abs(run(feeds([probe] * 5)) - alone).max())
    for seed in range(3):
        others = [t for t in random_texts(7, 100 + seed, min_len=1, max_len=40) if len(t) != len(probe)]
        batch = [*others[:2], probe, *others[2:]]
        worst = max(worst, float(np.abs(run(feeds(batch))[2] - alone).max()))
    return worst


@pytest.fixture(scope="module")
def auto_result(tiny: dict):  # noqa: ANN201 - StaticInt8Result
    """``method="auto"``: NNCF is tried first (one NNCF run shared by the tests below)."""
    return quantize_static_int8(
        tiny["fp32"], tiny["folder"] / "nncf.onnx", tiny["calibration"], tiny["evals"], tiny["reference"], 0.95
    )


@pytest.mark.parametrize("method", ["nncf", "ort"])
def test_static_int8_meets_floor_and_is_batch_invariant(tiny: dict, auto_result, method: str) -> None:  # noqa: ANN001
    out = tiny["folder"] / f"{method}.onnx"
    if method == "nncf":
        result = auto_result
    else:
        result = quantize_static_int8(
            tiny["fp32"], out, tiny["calibration"], tiny["evals"], tiny["reference"], quality_floor=0.95, method=method
        )
    assert result.path == out and out.is_file()
    assert result.method == method
    assert result.fidelity >= 0.95 and result.batch_invariance <= INVARIANT
    assert [t["method"] for t in result.tried] == [method]
    # Quantized for real, in the S8S8 form TensorRT's explicit quantization accepts.
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "DequantizeLinear" in ops
    assert result.settings["s8s8_symmetric"] and result.settings["quantized_activations"] >= 3
    # The recorded fidelity is what an independent evaluation measures.
    run = ort_runner(out)
    assert fidelity(run, tiny["evals"], tiny["reference"]) == pytest.approx(result.fidelity, abs=1e-6)
    probe = random_texts(1, 42, min_len=2, max_len=4)
    assert _probe_invariance(run, probe) <= INVARIANT
    # OpenVINO reads the same QDQ graph and keeps both promises.
    ov_run = openvino_runner(out, 1, "f32")
    assert _probe_invariance(ov_run, probe) <= INVARIANT
    assert fidelity(ov_run, tiny["evals"], tiny["reference"]) >= 0.95
    assert result.to_manifest()["mode"] == "static"


@pytest.mark.parametrize("calibration", ["percentile", "entropy"])
def test_histogram_calibration_on_texts_of_different_lengths(tiny: dict, calibration: str) -> None:
    out = tiny["folder"] / f"ort-{calibration}.onnx"
    settings = quantize_ort(tiny["fp32"], out, tiny["calibration"], calibration=calibration)
    assert settings["calibration"] == calibration and settings["s8s8_symmetric"]
    run = ort_runner(out)
    assert fidelity(run, tiny["evals"], tiny["reference"]) >= 0.95
    assert batch_invariance(run, tiny["evals"]) <= INVARIANT


def test_bypassing_quantization_restores_the_fp32_graph(tiny: dict) -> None:
    """The in-memory QDQ bypass used to rank nodes restores exactly the float computation."""
    import onnxruntime as ort

    from pruneserve.optimizer.static_int8 import _without_quantization, weight_matmuls

    qdq_path = tiny["folder"] / "ort-bypass.onnx"
    quantize_ort(tiny["fp32"], qdq_path, tiny["calibration"])
    qdq, fp32 = onnx.load(str(qdq_path)), onnx.load(str(tiny["fp32"]))
    restored = _without_quantization(qdq, fp32, None)
    session = ort.InferenceSession(restored.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = tiny["evals"][0]
    got = session.run(None, {i.name: batch[i.name] for i in session.get_inputs()})[0]
    np.testing.assert_allclose(got, ort_runner(tiny["fp32"])(batch), atol=1e-5)
    assert np.abs(ort_runner(qdq_path)(batch) - got).max() > 1e-4  # the quantized graph itself differs
    # One node back to float: its inputs read float tensors, every other node is unchanged.
    first = weight_matmuls(tiny["fp32"])[0]
    one = _without_quantization(qdq, fp32, [first])
    producers = {o: n.op_type for n in one.graph.node for o in n.output}
    by_name = {n.name: n for n in one.graph.node}
    assert all(producers.get(i) != "DequantizeLinear" for i in by_name[first].input)
    changed = [n.name for n, m in zip(one.graph.node, qdq.graph.node) if list(n.input) != list(m.input)]
    assert first in changed and len(changed) <= 4


def test_fp32_is_batch_invariant_and_dynamic_int8_is_not(tiny: dict) -> None:
    """The probe can fail: dynamic INT8's per-batch activation scales move a text's answer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    probe = random_texts(1, 42, min_len=2, max_len=4)
    assert _probe_invariance(ort_runner(tiny["fp32"]), probe) <= INVARIANT
    assert batch_invariance(ort_runner(tiny["fp32"]), tiny["evals"]) <= INVARIANT
    dynamic = tiny["folder"] / "dynamic.onnx"
    quantize_dynamic(str(tiny["fp32"]), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)
    assert _probe_invariance(ort_runner(dynamic), probe) > 1e-3
    assert batch_invariance(ort_runner(dynamic), tiny["evals"]) > 1e-3


def test_auto_tries_nncf_first_and_records_the_choice(auto_result) -> None:  # noqa: ANN001
    result = auto_result
    assert result.method == "nncf"
    assert result.tried[0]["method"] == "nncf" and result.tried[0]["passed"]
    assert result.settings["preset"] == "performance" and result.settings["smooth_quant_alpha"] == 0.95


def test_unreachable_floor_raises_with_everything_tried(tiny: dict) -> None:
    config = StaticInt8Config(ort_calibrations=("minmax",), max_excluded=1)
    with pytest.raises(QuantizationError) as err:
        quantize_static_int8(
            tiny["fp32"], tiny["folder"] / "never.onnx", tiny["calibration"], tiny["evals"], tiny["reference"],
            quality_floor=1.01, method="ort", config=config,
        )
    message = str(err.value)
    assert "1.01" in message and "ort(calibration=minmax" in message and "excluded_by=sensitivity" in message
    assert not (tiny["folder"] / "never.onnx").exists()


def test_refuses_fused_graphs_and_missing_data(tmp_path: Path, tiny: dict) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("SkipLayerNormalization", ["x", "x", "g", "b"], ["y"], domain="com.microsoft")
    fused = tmp_path / "fused.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y])), str(fused))
    with pytest.raises(QuantizationError, match="fused graph"):
        quantize_static_int8(fused, tmp_path / "q.onnx", tiny["calibration"], tiny["evals"], tiny["reference"], 0.9)
    with pytest.raises(QuantizationError, match="calibration texts"):
        quantize_static_int8(tiny["fp32"], tmp_path / "q.onnx", [], tiny["evals"], tiny["reference"], 0.9)
    with pytest.raises(QuantizationError, match="one reference output per batch"):
        quantize_static_int8(tiny["fp32"], tmp_path / "q.onnx", tiny["calibration"], tiny["evals"], [], 0.9)


@pytest.fixture
def no_nncf(monkeypatch: pytest.MonkeyPatch) -> None:
    """NNCF made unimportable (``import nncf`` raises ImportError), as without the openvino extra."""
    monkeypatch.setitem(sys.modules, "nncf", None)


def _assert_qdq_int8(path: Path) -> None:
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") >= 3 and "DequantizeLinear" in ops, ops


def test_auto_without_nncf_falls_back_to_onnx_runtime_and_says_so(
    tiny: dict, no_nncf: None, caplog: pytest.LogCaptureFixture
) -> None:
    out = tiny["folder"] / "no-nncf.onnx"
    with caplog.at_level(logging.WARNING, logger="pruneserve.optimizer.static_int8"):
        result = quantize_static_int8(
            tiny["fp32"], out, tiny["calibration"], tiny["evals"], tiny["reference"], 0.95  # method auto
        )
    assert result.method == "ort" and result.requested_method == "auto"
    assert {t["method"] for t in result.tried} == {"ort"}  # NNCF was not attempted (and did not abort the search)
    assert result.fallback and "nncf" in result.fallback and NNCF_INSTALL in result.fallback
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("nncf" in w and NNCF_INSTALL in w for w in warned), warned
    record = result.to_manifest()
    assert record["method"] == "ort" and record["requested_method"] == "auto" and record["fallback"] == result.fallback
    # A real static INT8 graph that keeps the floor and answers the same alone and batched.
    _assert_qdq_int8(out)
    assert result.settings["s8s8_symmetric"]
    run = ort_runner(out)
    assert fidelity(run, tiny["evals"], tiny["reference"]) >= 0.95
    assert _probe_invariance(run, random_texts(1, 42, min_len=2, max_len=4)) <= INVARIANT


def test_auto_records_why_a_failing_nncf_was_not_kept(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """NNCF importable but failing on the graph: ONNX Runtime's graph is kept, and the result says why."""
    monkeypatch.setattr(static_int8, "nncf_unavailable", lambda load=True: None)

    def broken(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("unsupported node")

    monkeypatch.setattr(static_int8, "quantize_nncf", broken)
    out = tiny["folder"] / "nncf-broken.onnx"
    result = quantize_static_int8(tiny["fp32"], out, tiny["calibration"], tiny["evals"], tiny["reference"], 0.95)
    assert result.method == "ort" and [t["method"] for t in result.tried][0] == "nncf"
    assert result.tried[0]["error"] == "RuntimeError: unsupported node"
    assert result.fallback and "unsupported node" in result.fallback and "ONNX Runtime" in result.fallback
    _assert_qdq_int8(out)


def test_nncf_asked_for_without_nncf_is_refused_before_any_work(tiny: dict, no_nncf: None, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    with pytest.raises(ConfigError) as err:
        quantize_static_int8(tiny["fp32"], out, tiny["calibration"], tiny["evals"], tiny["reference"], 0.95,
                             method="nncf")
    message = str(err.value)
    assert "\n" not in message and "'nncf'" in message, message
    assert NNCF_INSTALL in message and "--int8-method ort" in message, message
    assert not out.exists() and not list(tmp_path.iterdir())
    # The optimizer's preflight check: the same refusal, from the config alone.
    with pytest.raises(ConfigError, match="--int8-method ort") as err:
        check_static_method(QuantizeConfig(mode="static", static_method="nncf"))
    assert NNCF_INSTALL in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--int8-method ort"):
        check_static_method(QuantizeConfig(mode="auto", static_method="nncf"))
    # Nothing to refuse: no static INT8 built, or a method that runs here.
    check_static_method(QuantizeConfig(mode="auto", candidates=["dynamic", "none"], static_method="nncf"))
    check_static_method(QuantizeConfig(mode="dynamic", static_method="nncf"))
    check_static_method(QuantizeConfig(mode="static", static_method="auto"))
    check_static_method(QuantizeConfig(mode="static", static_method="ort"))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="method 'fast'"):
        StaticInt8Config(method="fast")
    with pytest.raises(ConfigError, match="presets"):
        StaticInt8Config(nncf_presets=("accurate",))
    with pytest.raises(ConfigError, match="smooth_quant_alpha"):
        StaticInt8Config(smooth_quant_alpha=1.5)


def test_split_and_stack_round_trip() -> None:
    texts = random_texts(5, 3)
    batch = feeds(texts)
    items = split_items([batch])
    assert [i["input_ids"].shape[1] for i in items] == [len(t) for t in texts]
    again = stack_items(items)
    for name in batch:
        np.testing.assert_array_equal(again[name], batch[name])
