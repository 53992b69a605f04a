"""A tiny physically pruned encoder exported by the optimizer's own ``export_onnx``, and feeds for it.

The pruning plan is deliberately awkward for runtimes: uneven kept heads per layer (3, 0, 1),
an emptied attention block (layer 1 keeps no head) and a pruned FFN with one emptied FFN
(layer 2), so a runtime that assumes a fixed head count, or chokes on zero-sized tensors,
fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pruneserve.optimizer.export import export_onnx
from pruneserve.optimizer.modeling import Encoder, EncoderSpec
from pruneserve.optimizer.pruning import PruningPlan, prune

VOCAB = 120
MAX_POSITIONS = 64
PAD_ID = 0
CLS_ID, SEP_ID = 2, 3

KEPT_HEADS = [[0, 2, 3], [], [1]]
KEPT_FFN = [list(range(0, 64, 2)), list(range(40)), []]


def tiny_spec() -> EncoderSpec:
    """3 layers, 4 heads of 8, hidden 32, FFN 64, BERT embeddings, mean pooling + L2 normalisation."""
    return EncoderSpec(
        arch="bert", vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, head_dim=8,
        intermediate_size=64, heads=[4, 4, 4], ffn=[64, 64, 64], max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2, pad_token_id=PAD_ID, layer_norm_eps=1e-12, hidden_act="gelu", task="embedding",
        pooling="mean", normalize=True,
    )


def pruned_encoder(seed: int = 0) -> Encoder:
    """The tiny encoder with spread-out random weights, pruned by the awkward plan above."""
    torch.manual_seed(seed)
    encoder = Encoder(tiny_spec()).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                param.copy_(0.2 * noise)
    return prune(encoder, PruningPlan(heads=KEPT_HEADS, ffn=KEPT_FFN)).eval()


def export_pruned(path: Path, seed: int = 0) -> tuple[Path, Encoder]:
    """Export :func:`pruned_encoder` to ``path`` (unfused fp32, the artifact's graph contract)."""
    encoder = pruned_encoder(seed)
    export_onnx(encoder, path)
    return path, encoder


def random_texts(n: int, seed: int, min_len: int = 3, max_len: int = 30) -> list[list[int]]:
    """``n`` token sequences of random lengths: [CLS] random ids [SEP]."""
    rng = np.random.default_rng(seed)
    return [[CLS_ID, *rng.integers(5, VOCAB, int(rng.integers(min_len, max_len))).tolist(), SEP_ID] for _ in range(n)]


def feeds(texts: list[list[int]]) -> dict[str, np.ndarray]:
    """Right-padded ``[n, longest]`` int64 feeds with the graph's three inputs."""
    length = max(len(t) for t in texts)
    ids = np.full((len(texts), length), PAD_ID, np.int64)
    mask = np.zeros((len(texts), length), np.int64)
    for row, t in enumerate(texts):
        ids[row, : len(t)] = t
        mask[row, : len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def torch_reference(encoder: Encoder, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch model's embedding on ``batch`` (independent of any ONNX runtime)."""
    with torch.no_grad():
        out = encoder(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
    return out.numpy()
