"""ONNX Runtime fusion: the fused op counts follow the (pruned) structure, and missing fusion is loud."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pytest
import torch

from pruneserve.optimizer.adapters import load_model, tokenize
from pruneserve.optimizer.errors import ConfigError, FusionError
from pruneserve.optimizer.export import check_parity, export_onnx
from pruneserve.optimizer.fusion import FusionConfig, check_fusions, expected_fusions, fuse
from pruneserve.optimizer.modeling import SelfAttention
from pruneserve.optimizer.pruning import PruningPlan, prune

TinyModelFactory = Callable[..., Path]
FULL = 64
PLANS = {
    "unpruned": None,
    "uneven heads": PruningPlan([[0, 1, 2, 3], [1, 3], [2]], [list(range(FULL))] * 3),
    "emptied attention layer": PruningPlan([[0, 3], [], [0, 1, 2]], [list(range(FULL))] * 3),
    "emptied FFN": PruningPlan([[0, 1], [2], [0, 1, 2, 3]], [list(range(20)), [], list(range(FULL))]),
}


@pytest.mark.parametrize("case", list(PLANS))
@pytest.mark.parametrize(("arch", "task"), [("bert", "embedding"), ("roberta", "classification"),
                                            ("distilbert", "embedding")])
def test_fused_counts_follow_structure(
    tiny_model_dir: TinyModelFactory, sample_texts: list[str], tmp_path: Path, arch: str, task: str, case: str
) -> None:
    loaded = load_model(tiny_model_dir(arch, task))
    plan = PLANS[case]
    enc = prune(loaded.encoder, plan) if plan else loaded.encoder
    raw = export_onnx(enc, tmp_path / "raw.onnx").path
    result = fuse(raw, tmp_path / "fused.onnx", enc.spec)
    heads_layers = sum(h > 0 for h in enc.spec.heads)
    ffn_layers = sum(f > 0 for f in enc.spec.ffn)
    assert result.counts["Attention"] == heads_layers
    assert result.counts["Softmax"] == 0
    assert result.counts["EmbedLayerNormalization"] == 1
    assert result.counts["SkipLayerNormalization"] == heads_layers + ffn_layers
    assert result.counts["BiasGelu"] + result.counts["Gelu"] == ffn_layers
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    # The fused graph also agrees with PyTorch on real, right-padded tokenized text.
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, enc.uses_token_type_ids)
    assert check_parity(enc, result.path, [batch], atol=1e-4) <= 1e-4


def test_fused_attention_keeps_each_layers_head_count(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    import onnx

    enc = prune(load_model(tiny_model_dir("bert", "embedding")).encoder, PLANS["uneven heads"])
    result = fuse(export_onnx(enc, tmp_path / "raw.onnx").path, tmp_path / "fused.onnx", enc.spec)
    graph = onnx.load(str(result.path)).graph
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in graph.node if n.op_type == "Attention"]
    assert heads == [4, 2, 1]


def test_missing_attention_fusion_raises(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = load_model(tiny_model_dir("bert", "embedding")).encoder

    def split_heads_inferred(self: SelfAttention, x: torch.Tensor) -> torch.Tensor:
        # What a transformers 5 export does: reshape with -1 heads, so no head count in the graph.
        return x.view(x.size(0), x.size(1), -1, self.head_dim).permute(0, 2, 1, 3)

    monkeypatch.setattr(SelfAttention, "_split_heads", split_heads_inferred)
    raw = export_onnx(enc, tmp_path / "raw.onnx").path
    with pytest.raises(FusionError, match=r"Attention: expected 3, found 0") as info:
        fuse(raw, tmp_path / "fused.onnx", enc.spec)
    assert "Softmax: expected 0, found 3" in str(info.value)
    assert not (tmp_path / "fused.onnx").exists()


def test_check_fusions_names_expected_and_found(tiny_model_dir: TinyModelFactory) -> None:
    spec = prune(load_model(tiny_model_dir("bert", "embedding")).encoder, PLANS["emptied FFN"]).spec
    expected = expected_fusions(spec)
    assert expected == {"Attention": 3, "SkipLayerNormalization": 5, "Softmax": 0, "Gelu (any)": 2,
                        "EmbedLayerNormalization": 1}
    good = {"Attention": 3, "SkipLayerNormalization": 5, "Softmax": 0, "BiasGelu": 2, "EmbedLayerNormalization": 1}
    check_fusions(spec, good)
    with pytest.raises(FusionError, match=r"SkipLayerNormalization: expected 5, found 4; Gelu \(any\): expected 2, found 0"):
        check_fusions(spec, {**good, "SkipLayerNormalization": 4, "BiasGelu": 0})
    relaxed = FusionConfig(require_embed_layer_norm=False)
    check_fusions(spec, {**good, "EmbedLayerNormalization": 0}, relaxed)


def test_ort_warnings_go_to_debug(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    enc = prune(load_model(tiny_model_dir("bert", "embedding")).encoder, PLANS["uneven heads"])
    raw = export_onnx(enc, tmp_path / "raw.onnx").path
    with caplog.at_level(logging.DEBUG):
        fuse(raw, tmp_path / "fused.onnx", enc.spec)
    ours = [r for r in caplog.records if r.name == "pruneserve.optimizer.fusion"]
    assert any(r.levelno == logging.INFO and "Attention=3" in r.getMessage() for r in ours)
    assert any(r.levelno == logging.DEBUG and "onnxruntime" in r.getMessage() for r in ours)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="opt_level 5"):
        FusionConfig(opt_level=5)
    with pytest.raises(ConfigError, match="atol"):
        FusionConfig(atol=0)


@pytest.mark.slow
def test_default_model_pruned_export_and_fusion(tmp_path: Path, sample_texts: list[str]) -> None:
    loaded = load_model(None)
    full = list(range(1536))
    plan = PruningPlan([[0, 1, 2], [3, 4, 5, 6], list(range(12)), [], [1, 2], list(range(12))],
                       [full, full, full, full, full, list(range(100))])
    enc = prune(loaded.encoder, plan)
    result = fuse(export_onnx(enc, tmp_path / "raw.onnx").path, tmp_path / "fused.onnx", enc.spec)
    assert result.counts["Attention"] == 5 and result.counts["SkipLayerNormalization"] == 11
    assert result.counts["EmbedLayerNormalization"] == 1 and result.counts["BiasGelu"] == 6
    batch = tokenize(loaded.tokenizer, sample_texts, None, loaded.max_sequence_length, True)
    assert check_parity(enc, result.path, [batch], atol=1e-4) <= 1e-4
