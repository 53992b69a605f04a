"""The report: report.md states what was done, quality per stage with its data source, speed
and sizes; the figures are real PNGs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pruneserve.artifact import Manifest
from pruneserve.optimizer.adapters import load_model
from pruneserve.optimizer import plots, validate
from pruneserve.optimizer.config import PruneConfig
from pruneserve.optimizer.data import Batch
from pruneserve.optimizer.importance import Importance
from pruneserve.optimizer.pipeline import StageRecord
from pruneserve.optimizer.pruner import PruneResult
from pruneserve.optimizer.pruning import PruningPlan, prune
from pruneserve.optimizer.quality import Quality
from pruneserve.optimizer.quantize import QuantizeResult
from pruneserve.optimizer.recovery import RecoveryStage
from pruneserve.optimizer.report import final_quality_points, latency_chart, render_markdown, summary_lines, write_report
from pruneserve.optimizer.search import TraceStep
from pruneserve.optimizer.validate import Latency, ValidationReport, compare_outputs

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
                                               agreement=0.95, labeled=True)}
    text = render_markdown(parts["manifest"], parts["pruned"], parts["quantized"], validation, parts["stages"],
                           {"model.onnx": 10}, [])
    assert "accuracy on the labels | agreement with original" in text
    assert "| quantized | 0.9800 | 0.9000 | 0.9500 |" in text


def test_classifier_quality_without_labels_is_called_agreement(parts: dict) -> None:
    teacher = [torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])]
    student = [np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)]
    unlabeled = Batch({"input_ids": torch.zeros(4, 3, dtype=torch.long)})
    quality = compare_outputs("classification", student, teacher, [unlabeled])
    assert quality.accuracy is None and quality.teacher_accuracy is None and quality.labeled is False
    assert quality.agreement == quality.score == 0.75
    assert "accuracy" not in quality.to_dict() and "agreement with the original's predictions" in quality.describe()
    validation: ValidationReport = parts["validation"]
    validation.quality = {"quantized": quality}
    assert "agreement with the original model's predictions" in validation.quality_block()["metric"]
    text = render_markdown(parts["manifest"], parts["pruned"], parts["quantized"], validation, parts["stages"],
                           {"model.onnx": 10}, [])
    section = text.split("## Quality against the original model")[1].split("## Speed")[0]
    assert "| stage | score | agreement with the original's predictions |" in section
    assert "| quantized | 0.7500 | 0.7500 |" in section and "no labels" in section
    assert "accuracy |" not in section
    # The labeled path names accuracy (and only there).
    labeled = Batch(unlabeled.inputs, labels=torch.tensor([0, 1, 1, 1]))
    assert compare_outputs("classification", student, teacher, [labeled]).labeled is True


def test_latency_chart_is_a_png(parts: dict, tmp_path: Path) -> None:
    path = latency_chart(parts["validation"].latency, tmp_path / "lat.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_summary_lines_show_speedups(parts: dict) -> None:
    lines = summary_lines(parts["manifest"])
    assert lines[0].startswith("As served (ONNX Runtime CPUExecutionProvider): b1x32 2.00 ms, b32x128 150.00 ms; "
                               "speed-up vs the original (PyTorch fp32): b1x32 6.00x, b32x128 4.00x")
    assert lines[1].startswith(f"quality ({DATA})")
    assert any("artifact (served)" in line and "b32x128 150.00 ms" in line for line in lines)
    assert any("speed-up vs original fused INT8: b1x32 1.50x" in line for line in lines)


def _served_on_openvino(parts: dict) -> None:
    """What the engines stage adds when OpenVINO bf16 wins: the artifact's row on that engine, and
    manifest.runtime naming it; the "artifact" row stays ONNX Runtime's (slower here)."""
    validation: ValidationReport = parts["validation"]
    validation.latency["artifact on openvino-bf16"] = Latency("openvino", "bf16", {"b1x32": 1.0, "b32x128": 100.0}, 5)
    manifest: Manifest = parts["manifest"]
    manifest.runtime = {"engine": "openvino", "precision": "bf16", "providers_used_at_build": ["CPUExecutionProvider"]}
    manifest.quantization = {"mode": "static"}
    manifest.engines = {"openvino-bf16": {"engine": "openvino", "precision": "bf16", "fidelity": 0.9531}}
    manifest.latency = {"median_ms": validation.latency_block(), "threads": 2,
                        "speedup": validate.speedups(validation.latency)}


def test_report_headline_and_tables_show_the_served_engine(parts: dict) -> None:
    _served_on_openvino(parts)
    assert parts["manifest"].latency["speedup"]["original (PyTorch fp32)"] == {"b1x32": 12.0, "b32x128": 6.0}
    assert "artifact" not in parts["manifest"].latency["speedup"]  # the artifact on another engine is no baseline
    text = render_markdown(parts["manifest"], parts["pruned"], parts["quantized"], parts["validation"],
                           parts["stages"], {"model.onnx": 10}, [])
    assert text.splitlines()[2] == (
        "**As served (static INT8 on OpenVINO bf16): b1x32 1.00 ms, b32x128 100.00 ms; speed-up vs the original "
        "(PyTorch fp32): b1x32 12.00x, b32x128 6.00x; quality 0.9531 on OpenVINO bf16 (floor 0.95).**")
    assert "served on **OpenVINO bf16**, the artifact's quality on the same held-out examples is **0.9531**" in text
    speed = text.split("## Speed")[1].split("## ")[0]
    assert "| **artifact on openvino-bf16 (served)** | bf16 | **1.00** | **100.00** | – | – |" in speed
    assert "| artifact on onnxruntime (not served) | CPUExecutionProvider | 2.00 | 150.00 | – | – |" in speed
    assert "| original fused INT8 | CPUExecutionProvider | 3.00 | 280.00 | 3.00x | 2.80x |" in speed
    assert "0.50x" not in text and "0.67x" not in text  # nothing compares the artifact with itself


def test_summary_uses_the_served_engines_latency(parts: dict) -> None:
    _served_on_openvino(parts)
    lines = summary_lines(parts["manifest"])
    assert lines[0].startswith("As served (static INT8 on OpenVINO bf16): b1x32 1.00 ms, b32x128 100.00 ms; "
                               "speed-up vs the original (PyTorch fp32): b1x32 12.00x, b32x128 6.00x")
    assert any(line.startswith("artifact on openvino-bf16 (served)") and "b1x32 1.00 ms" in line for line in lines)
    assert "speed-up vs original fused INT8: b1x32 3.00x, b32x128 2.80x" in lines
    assert not any("speed-up vs artifact" in line or "0.50x" in line for line in lines)
    # An older manifest whose speed-up block was computed against the ONNX Runtime row changes nothing.
    parts["manifest"].latency["speedup"] = {"artifact on openvino-bf16": {"b1x32": 0.5}}
    assert summary_lines(parts["manifest"]) == lines


def test_an_outlier_baseline_never_prints_as_a_speedup(parts: dict) -> None:
    validation: ValidationReport = parts["validation"]
    validation.latency["original (PyTorch fp32)"] = Latency("pytorch fp32", "torch-cpu", {"b1x32": 1794.0, "b32x128": 600.0}, 5)
    validation.latency["original fused INT8"] = Latency("onnxruntime", "CPUExecutionProvider", {"b1x32": 0.0, "b32x128": 280.0}, 5)
    ups = validate.speedups(validation.latency)
    assert ups["original (PyTorch fp32)"] == {"b32x128": 4.0}  # 897x at b1x32 is left out
    assert ups["original fused INT8"] == {"b32x128": 1.87}  # a zero median is no measurement
    notes = validate.speedup_outliers(validation.latency)
    assert len(notes) == 2 and "would be 897x" in notes[0] and "1794 ms" in notes[0] and "not reported" in notes[0]
    assert "b1x32 is not a measurement" in notes[1]
    manifest: Manifest = parts["manifest"]
    manifest.latency = {"median_ms": validation.latency_block(), "threads": 2, "speedup": ups}
    text = render_markdown(manifest, parts["pruned"], parts["quantized"], validation, parts["stages"],
                           {"model.onnx": 10}, [])
    assert "897" not in text.split("## Warnings")[0]
    assert "b1x32 not credible (see the warnings)" in text.splitlines()[2]
    assert "would be 897x" in text.split("## Warnings")[1]
    lines = summary_lines(manifest)
    assert not any("897" in line for line in lines if not line.startswith("warning: "))
    assert sum(line.startswith("warning: ") for line in lines) == 2


def test_the_first_run_of_a_shape_is_never_timed() -> None:
    calls: list[int] = []
    validate._median_ms(lambda: calls.append(1), warmup=0, repeats=1)
    assert len(calls) == 2  # one untimed warm-up even when none is configured


def test_tradeoff_figure_shows_quality_after_recovery(parts: dict) -> None:
    pruned: PruneResult = parts["pruned"]
    points = final_quality_points(pruned, parts["validation"])
    assert [(p.label, p.score) for p in points] == [("after recovery", pytest.approx(0.962)),
                                                    ("artifact (quantized)", pytest.approx(0.955))]
    assert all(p.flops_removed == pytest.approx(0.4) for p in points)  # 1 - 6e6 / 1e7
    fig = plots.tradeoff_figure(pruned.trace, floor=0.95, after=points)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    plots._pyplot().close(fig)
    assert list(lines[plots.SEARCH_ACCEPTED].get_ydata()) == [1.0, 0.93]
    recovered = lines["after recovery: 0.9620"]
    assert list(recovered.get_xdata()) == [pytest.approx(40.0)] and list(recovered.get_ydata()) == [pytest.approx(0.962)]
    assert "artifact (quantized): 0.9550" in lines
    assert recovered.get_ydata()[0] > 0.95  # above the floor, where the search's own steps are not


def test_importance_figure_marks_the_pruned_ffn_neurons(parts: dict) -> None:
    pruned: PruneResult = parts["pruned"]
    ffn_size = pruned.importance.ffn.shape[1]
    kept = [list(range(ffn_size)), list(range(0, ffn_size, 2)), list(range(5))]
    scores, marked = plots.ffn_sorted(pruned.importance.ffn.numpy(), kept)
    assert [int(row.sum()) for row in marked] == [0, ffn_size // 2, ffn_size - 5]
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # sorted high to low, the marks in the same order
    order = np.argsort(-pruned.importance.ffn.numpy()[2], kind="stable")
    assert set(order[~marked[2]].tolist()) == set(range(5))
    fig = plots.importance_figure(pruned.importance, head_mask=parts["head_mask"], ffn_kept=kept)
    plots._pyplot().close(fig)
    # The FFN panel: the sorted scores, and over them the shaded cells of exactly the pruned neurons.
    ffn_axes = next(ax for ax in fig.axes if len(ax.get_images()) == 2)
    sorted_scores, overlay = (image.get_array() for image in ffn_axes.get_images())
    assert np.allclose(sorted_scores, np.clip(scores, 1e-12, None))
    assert ((~overlay.mask) == marked).all()
    assert ffn_axes.get_images()[1].get_label() == plots.PRUNED_FFN
