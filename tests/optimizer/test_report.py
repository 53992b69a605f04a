"""The report: report.md states what was done, quality per stage with its data source, speed
and sizes; the figures are real PNGs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pruneserve.artifact import Manifest
from pruneserve.optimizer.adapters import load_model
from pruneserve.optimizer.config import PruneConfig
from pruneserve.optimizer.importance import Importance
from pruneserve.optimizer.pipeline import StageRecord
from pruneserve.optimizer.pruner import PruneResult
from pruneserve.optimizer.pruning import PruningPlan, prune
from pruneserve.optimizer.quality import Quality
from pruneserve.optimizer.quantize import QuantizeResult
from pruneserve.optimizer.recovery import RecoveryStage
from pruneserve.optimizer.report import latency_chart, render_markdown, summary_lines, write_report
from pruneserve.optimizer.search import TraceStep
from pruneserve.optimizer.validate import Latency, ValidationReport

TinyModelFactory = Callable[..., Path]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA = "support tickets (tickets.jsonl)"


def _q(score: float) -> Quality:
    return Quality("embedding", 40, mean_cosine=score, min_cosine=score - 0.1)


@pytest.fixture
def parts(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> dict[str, object]:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    spec = loaded.encoder.spec
    plan = PruningPlan([[0, 1], [2], [0, 1, 3]], [list(range(spec.intermediate_size))] * 3)
    student = prune(loaded.encoder, plan)
    gen = torch.Generator().manual_seed(0)
    pruned = PruneResult(
        encoder=student, plan=plan,
        importance=Importance(torch.rand(3, 4, generator=gen), torch.rand(3, spec.intermediate_size, generator=gen)),
        trace=[TraceStep(0, 0, 0, 0.0, _q(1.0)), TraceStep(1, 3, 0, 0.2, _q(0.93)),
               TraceStep(2, 6, 0, 0.4, _q(0.81), accepted=False)],
        recovery=[RecoveryStage("pruned", _q(0.81), 0.0), RecoveryStage("attention_refit", _q(0.962), 3.0)],
        params_before=34_000, params_after=28_000, flops_before=10_000_000, flops_after=6_000_000, flops_seq_len=128,
        data_source=DATA, score_examples=120, eval_examples=40, config=PruneConfig(),
    )
    model = tmp_path / "model.onnx"
    model.write_bytes(b"x" * 1234)
    quantized = QuantizeResult(model, "dynamic", True, False, "fused", quality=0.955,
                               excluded_nodes=["Attention_2"], settings={"weight_type": "QInt8"})
    latency = {
        "original (PyTorch fp32)": Latency("pytorch fp32", "torch-cpu", {"b1x32": 12.0, "b32x128": 600.0}, 5),
        "original fused INT8": Latency("onnxruntime", "CPUExecutionProvider", {"b1x32": 3.0, "b32x128": 280.0}, 5),
        "artifact": Latency("onnxruntime", "CPUExecutionProvider", {"b1x32": 2.0, "b32x128": 150.0}, 5),
    }
    validation = ValidationReport(
        2e-7, {"pruned": _q(0.81), "recovered": _q(0.962), "fused": _q(0.962), "quantized": _q(0.955)},
        DATA, 40, 0.95, latency, ["CPUExecutionProvider"], ["CPUExecutionProvider"],
        warnings=["something to know"],
    )
    from pruneserve.optimizer.pipeline import _pruning_block

    manifest = Manifest(
        name="tiny", task="embedding", inputs=["input_ids", "attention_mask", "token_type_ids"],
        outputs=[{"name": "embedding", "dims": [32]}], max_sequence_length=64, batch_invariant=False,
        quality_floor=0.95, pruning=_pruning_block(pruned), fusion={"counts": {"Attention": 3, "Gelu": 0}},
        quality=validation.quality_block(), latency={"median_ms": validation.latency_block(), "threads": 2,
                                                     "speedup": {"original fused INT8": {"b1x32": 1.5}}},
        source={"path": "/models/tiny", "sha256": "ab" * 32}, opset=17,
    )
    stages = [StageRecord("prune", 3.5, 400.0), StageRecord("quantize", 0.5, 410.0)]
    return {"manifest": manifest, "pruned": pruned, "quantized": quantized, "validation": validation,
            "stages": stages, "head_mask": plan.to_masks(spec)[0]}


def test_report_states_what_was_done_and_where_quality_was_measured(parts: dict, tmp_path: Path) -> None:
    files = write_report(tmp_path / "r", parts["manifest"], parts["pruned"], parts["quantized"],
                         parts["validation"], parts["stages"], head_mask=parts["head_mask"], floor=0.95)
    assert set(files) == {"report.md", "importance.png", "tradeoff.png", "latency.png"}
    for name, path in files.items():
        assert path.is_file() and path.parent == tmp_path / "r"
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000
    text = files["report.md"].read_text()
    assert "Pruned** 6 of 12 attention heads" in text and "[2, 1, 3]" in text
    assert DATA in text and "40 held-out examples" in text
    assert "calibration data" in text  # quality holds on the calibration domain, and the report says so
    # Quality per stage, in order, with its numbers.
    section = text.split("## Quality against the original model")[1].split("## Speed")[0]
    rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["pruned", "recovered", "fused", "quantized"]
    assert "| quantized | 0.9550 |" in text
    # Speed: medians and the artifact's speed-up over each baseline (600 / 150 = 4x).
    assert "600.00" in text and "4.00x" in text and "1.50x" in text
    assert "Attention_2" in text and "Batch-invariant**: no" in text
    assert "| model.onnx | 1,234 |" in text
    assert "something to know" in text
    assert "![latency](latency.png)" in text


def test_render_markdown_for_classifier_uses_accuracy(parts: dict) -> None:
    validation: ValidationReport = parts["validation"]
    validation.quality = {"quantized": Quality("classification", 40, accuracy=0.9, teacher_accuracy=0.92,
                                               agreement=0.95)}
    text = render_markdown(parts["manifest"], parts["pruned"], parts["quantized"], validation, parts["stages"],
                           {"model.onnx": 10}, [])
    assert "accuracy | agreement with original" in text
    assert "| quantized | 0.9800 | 0.9000 | 0.9500 |" in text


def test_latency_chart_is_a_png(parts: dict, tmp_path: Path) -> None:
    path = latency_chart(parts["validation"].latency, tmp_path / "lat.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_summary_lines_show_speedups(parts: dict) -> None:
    lines = summary_lines(parts["manifest"])
    assert lines[0].startswith(f"quality ({DATA})")
    assert any("artifact" in line and "b32x128 150.00 ms" in line for line in lines)
    assert any("speed-up vs original fused INT8: b1x32 1.50x" in line for line in lines)
