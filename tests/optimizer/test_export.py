"""ONNX export: the graph contract and parity with PyTorch, pruned or not."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx
import pytest

from pruneserve.optimizer.adapters import load_model, tokenize
from pruneserve.optimizer.errors import ConfigError, ExportError
from pruneserve.optimizer.export import ExportConfig, check_parity, export_onnx
from pruneserve.optimizer.pruning import PruningPlan, prune

TinyModelFactory = Callable[..., Path]
UNEVEN = PruningPlan(heads=[[0, 1, 3], [], [2]], ffn=[list(range(0, 64, 2)), list(range(64)), []])


@pytest.mark.parametrize(("arch", "task"), [("bert", "embedding"), ("bert", "classification"),
                                            ("roberta", "embedding"), ("distilbert", "classification")])
@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
def test_export_contract_and_parity(
    tiny_model_dir: TinyModelFactory, sample_texts: list[str], tmp_path: Path, arch: str, task: str, pruned: bool
) -> None:
    loaded = load_model(tiny_model_dir(arch, task))
    enc = prune(loaded.encoder, UNEVEN) if pruned else loaded.encoder
    result = export_onnx(enc, tmp_path / "model.onnx")
    expected_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if arch == "bert" else [])
    output = "logits" if task == "classification" else "embedding"
    assert result.input_names == expected_inputs and result.output_names == [output]
    assert result.exporter == "torchscript" and result.opset == 17
    graph = onnx.load(str(result.path)).graph
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # Different batch sizes and lengths than the tracing inputs: the axes really are dynamic.
    pairs = list(reversed(sample_texts)) if arch == "bert" else None
    batches = [
        tokenize(loaded.tokenizer, sample_texts, pairs, 64, enc.uses_token_type_ids),
        tokenize(loaded.tokenizer, sample_texts[:1], None, 64, enc.uses_token_type_ids),
        tokenize(loaded.tokenizer, sample_texts[2:5], None, 5, enc.uses_token_type_ids),
    ]
    assert check_parity(enc, result.path, batches, atol=1e-4) <= 1e-4


def test_parity_failure_is_loud(tiny_model_dir: TinyModelFactory, sample_texts: list[str], tmp_path: Path) -> None:
    loaded = load_model(tiny_model_dir("distilbert", "embedding"))
    result = export_onnx(loaded.encoder, tmp_path / "model.onnx")
    other = prune(loaded.encoder, UNEVEN)  # a different model than the graph
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, False)
    with pytest.raises(ExportError, match="differs from the PyTorch model"):
        check_parity(other, result.path, [batch], atol=1e-4)


def test_export_restores_training_mode(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    enc = load_model(tiny_model_dir("bert", "embedding")).encoder
    enc.train()
    export_onnx(enc, tmp_path / "m.onnx")
    assert enc.training
    enc.eval()


@pytest.mark.parametrize(("kwargs", "message"), [({"opset": 9}, "opset 9 is out of range"),
                                                  ({"sample_batch_size": 1}, "sample_batch_size")])
def test_config_validation(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExportConfig(**kwargs)


def test_graph_has_no_gate_ops(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    enc = load_model(tiny_model_dir("bert", "embedding")).encoder
    graph = onnx.load(str(export_onnx(enc, tmp_path / "m.onnx").path)).graph
    muls = sum(n.op_type == "Mul" for n in graph.node)
    # The mask bias, the mean-pooling mask and two per erf-GELU layer; a gate would add one per layer.
    assert muls == 1 + 1 + 2 * enc.spec.num_layers
