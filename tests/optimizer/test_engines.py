"""Engine measurement and choice, and pruned graphs (uneven heads, emptied attention and FFN) on
OpenVINO vs ONNX Runtime vs PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pruned_onnx import export_pruned, feeds, random_texts, torch_reference

from pruneserve.engines.keys import ONNXRUNTIME, OPENVINO_BF16, OPENVINO_F32
from pruneserve.engines.openvino import bf16_supported, openvino_runner
from pruneserve.engines.ort import ort_runner
from pruneserve.optimizer.engines import (
    available_engines,
    best_engine,
    measure_engines,
    runtime_recommendation,
)
from pruneserve.optimizer.errors import ValidationError
from pruneserve.optimizer.static_int8 import quantize_ort


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    return export_pruned(tmp_path_factory.mktemp("engines") / "fp32.onnx", seed=3)


def test_pruned_model_same_answers_on_openvino_onnxruntime_and_torch(pruned: tuple[Path, object]) -> None:
    path, encoder = pruned
    ov_run, ort_run = openvino_runner(path, 1, "f32"), ort_runner(path)
    # Several shapes through one OpenVINO compilation (dynamic batch and sequence).
    for seed, n in ((0, 1), (1, 5), (2, 3)):
        batch = feeds(random_texts(n, seed, min_len=1, max_len=40))
        want = torch_reference(encoder, batch)
        np.testing.assert_allclose(ov_run(batch), want, atol=1e-5)
        np.testing.assert_allclose(ort_run(batch), want, atol=1e-5)


def test_measure_engines_fields(pruned: tuple[Path, object]) -> None:
    path, encoder = pruned
    b1 = feeds(random_texts(1, 5, min_len=10, max_len=11))
    b8 = feeds(random_texts(8, 6))
    result = measure_engines(path, b1, b8, torch_reference(encoder, b8), threads=1, rounds=2)
    assert set(result) == set(available_engines())
    assert {ONNXRUNTIME, OPENVINO_F32} <= set(result)
    assert (OPENVINO_BF16 in result) == bf16_supported()
    shape_b1 = "latency_b{}x{}_ms".format(*b1["input_ids"].shape)
    shape_b8 = "latency_b{}x{}_ms".format(*b8["input_ids"].shape)
    for key, entry in result.items():
        assert "error" not in entry, entry
        assert entry[shape_b1] > 0 and entry[shape_b8] > 0 and entry["threads"] == 1
        assert entry["batch_invariance"] <= 1e-5
        floor = 0.99 if entry["precision"] == "bf16" else 0.99999
        assert entry["fidelity"] >= floor, (key, entry)
    assert result[OPENVINO_F32]["engine"] == "openvino" and result[OPENVINO_F32]["precision"] == "f32"
    assert best_engine(result, 0.999) in result


def test_measure_engines_static_int8_on_both_engines(pruned: tuple[Path, object], tmp_path: Path) -> None:
    path, encoder = pruned
    calibration = [feeds([t]) for t in random_texts(16, 1)]
    qdq = tmp_path / "qdq.onnx"
    quantize_ort(path, qdq, calibration)
    b1 = feeds(random_texts(1, 5))
    b8 = feeds(random_texts(8, 6))
    result = measure_engines(qdq, b1, b8, torch_reference(encoder, b8), rounds=1,
                             engines=[ONNXRUNTIME, OPENVINO_F32], invariance_feeds=[feeds(random_texts(6, 9))])
    for entry in result.values():
        assert entry["fidelity"] > 0.95 and entry["batch_invariance"] <= 1e-5
    # Same artifact, same answers within INT8 rounding on either engine.
    ort_out, ov_out = ort_runner(qdq)(b8), openvino_runner(qdq)(b8)
    cos = (ort_out * ov_out).sum(1) / (np.linalg.norm(ort_out, axis=1) * np.linalg.norm(ov_out, axis=1))
    assert cos.min() > 0.99


def _entry(engine: str, precision: str, latency: float, fidelity: float, invariance: float) -> dict:
    return {"engine": engine, "precision": precision, "latency_b1x32_ms": latency / 10,
            "latency_b32x128_ms": latency, "fidelity": fidelity, "batch_invariance": invariance}


def test_best_engine_fastest_that_keeps_the_promises() -> None:
    m = {
        ONNXRUNTIME: _entry("onnxruntime", "fp32-graph", 300.0, 0.999, 1e-7),
        OPENVINO_F32: _entry("openvino", "f32", 200.0, 0.999, 1e-7),
        OPENVINO_BF16: _entry("openvino", "bf16", 100.0, 0.990, 1e-7),
    }
    assert best_engine(m, 0.98) == OPENVINO_BF16
    assert best_engine(m, 0.995) == OPENVINO_F32  # bf16 below the floor
    assert best_engine(m, 0.995, latency_key="latency_b1x32_ms") == OPENVINO_F32
    m[OPENVINO_F32]["batch_invariance"] = 3e-2  # e.g. run-time activation quantization
    assert best_engine(m, 0.995) == ONNXRUNTIME
    assert best_engine(m, 0.995, batch_invariant=False) == OPENVINO_F32
    m[OPENVINO_F32] = {"engine": "openvino", "precision": "f32", "error": "cannot read contrib op Attention"}
    assert best_engine(m, 0.995) == ONNXRUNTIME
    tie = {
        ONNXRUNTIME: _entry("onnxruntime", "fp32-graph", 5.0, 1.0, 0.0),
        OPENVINO_F32: _entry("openvino", "f32", 5.0, 1.0, 0.0),
    }
    assert best_engine(tie, 0.99) == ONNXRUNTIME
    with pytest.raises(ValidationError, match="no engine meets quality floor 0.9999"):
        best_engine(m, 0.9999)


def test_runtime_recommendation() -> None:
    m = {
        ONNXRUNTIME: _entry("onnxruntime", "fp32-graph", 3.0, 1.0, 0.0),
        OPENVINO_BF16: _entry("openvino", "bf16", 1.0, 1.0, 0.0),
    }
    assert runtime_recommendation(OPENVINO_BF16, m) == {"engine": "openvino", "precision": "bf16"}
    assert runtime_recommendation(ONNXRUNTIME, m) == {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"]}


def test_choose_over_graphs_says_why_each_pair_lost() -> None:
    from pruneserve.optimizer.engines import choose

    m = {
        "dynamic": {ONNXRUNTIME: _entry("onnxruntime", "fp32-graph", 100.0, 0.990, 4e-2),
                    OPENVINO_F32: {"engine": "openvino", "precision": "f32", "error": "no rule for QAttention"}},
        "static": {ONNXRUNTIME: _entry("onnxruntime", "fp32-graph", 150.0, 0.985, 1e-8),
                   OPENVINO_F32: _entry("openvino", "f32", 140.0, 0.984, 0.0)},
        "none": {ONNXRUNTIME: _entry("onnxruntime", "fp32-graph", 200.0, 0.999, 1e-7),
                 OPENVINO_F32: _entry("openvino", "f32", 200.0, 0.999, 1e-7)},
    }
    c = choose(m, 0.98)
    assert (c.graph, c.engine, c.latency_key) == ("static", OPENVINO_F32, "geomean(b1x32, b32x128) ms")
    assert c.verdicts["static"][OPENVINO_F32].startswith("chosen:")
    assert c.verdicts["dynamic"][ONNXRUNTIME].startswith("batch-variant")
    assert c.verdicts["dynamic"][OPENVINO_F32] == "cannot run: no rule for QAttention"
    assert c.verdicts["static"][ONNXRUNTIME].startswith("qualifies, but slower: geomean(b1x32, b32x128) ms")
    # A floor above static INT8 leaves fp32; the engines tie, so ONNX Runtime wins.
    c = choose(m, 0.99)
    assert (c.graph, c.engine) == ("none", ONNXRUNTIME)
    assert c.verdicts["static"][OPENVINO_F32] == "below the quality floor: 0.9840 < 0.99"
    # Batch variance allowed: the fastest of all.
    assert (choose(m, 0.98, batch_invariant=False).graph, choose(m, 0.98, batch_invariant=False).engine) == (
        "dynamic", ONNXRUNTIME)
    # By the single-text latency instead: static on OpenVINO 14 ms beats fp32's 20.
    assert choose(m, 0.98, latency_key="latency_b1x32_ms").engine == OPENVINO_F32
    with pytest.raises(ValidationError, match=r"no \(quantization, engine\) pair meets quality floor 0.9999.*"
                                              r"--allow-batch-variance"):
        choose(m, 0.9999)


def test_choose_weighs_one_text_and_a_batch() -> None:
    """Measured on an AVX2 CPU: static INT8 beat fp32 on a batch but was 2x slower on one text."""
    from pruneserve.optimizer.engines import choose

    m = {
        "static": {ONNXRUNTIME: {"engine": "onnxruntime", "precision": "fp32-graph", "fidelity": 0.962,
                                 "batch_invariance": 3e-8, "latency_b1x32_ms": 21.0, "latency_b32x128_ms": 633.0}},
        "none": {OPENVINO_F32: {"engine": "openvino", "precision": "f32", "fidelity": 0.968,
                                "batch_invariance": 0.0, "latency_b1x32_ms": 9.45, "latency_b32x128_ms": 697.0}},
    }
    assert (choose(m, 0.95).graph, choose(m, 0.95).engine) == ("none", OPENVINO_F32)  # 81 vs 115 ms geomean
    assert choose(m, 0.95, latency_key="latency_b32x128_ms").graph == "static"
