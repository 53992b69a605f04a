"""Our own post-LayerNorm encoder, with explicit per-layer head counts and optional gates.

BERT/MiniLM, RoBERTa/XLM-R and DistilBERT share one computation; they differ only in
embeddings, module names and classification heads, and those differences are resolved when
the adapter copies the weights in (see :mod:`pruneserve.optimizer.adapters`). Two reasons
not to run the Hugging Face modules directly:

* transformers 5 removed ``head_mask``/``prune_heads``; we need differentiable gates for
  importance scoring and physically sliced layers with *different* head counts per layer;
* ONNX Runtime's ``fusion_attention`` only recognises the classic eager pattern whose
  reshapes carry the head count as a constant. Every reshape here uses the layer's own
  ``num_heads`` so a pruned model still fuses, layer by layer.

With ``head_gates``/``ffn_gates`` left as ``None`` the traced graph contains no gate op, so
the same module exports cleanly.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pruneserve.artifact import POOLINGS

__all__ = [
    "ARCHS",
    "CLASSIFIER_LAYOUTS",
    "POOLINGS",
    "TASKS",
    "Embeddings",
    "Encoder",
    "EncoderLayer",
    "EncoderSpec",
    "ClassificationHead",
    "Gates",
    "PoolingHead",
    "SelfAttention",
    "head_flops",
    "neuron_flops",
]

ARCHS = ("bert", "roberta", "distilbert")
TASKS = ("embedding", "classification")
#: Classification head layouts: all are ``out(act(dense(h[:, 0])))``; only the activation differs.
CLASSIFIER_LAYOUTS = {"bert": "tanh", "roberta": "tanh", "distilbert": "relu"}

#: The additive attention-mask bias of classic BERT; large enough that exp() underflows to 0.
MASK_BIAS = -10000.0

#: Gates: one (layers, n) tensor, or one 1-D tensor per layer (ragged, for a pruned model).
Gates = Tensor | Sequence[Tensor] | None


def _activation(name: str) -> nn.Module:
    """The FFN activation module for a Hugging Face ``hidden_act`` name."""
    if name == "gelu":
        # Exact erf GELU: exported as the erf pattern that ORT fuses into (Bias)Gelu.
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"hidden_act {name!r} is not supported; use one of gelu, gelu_new, gelu_pytorch_tanh, relu")


SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")


@dataclass
class EncoderSpec:
    """The JSON-serialisable skeleton of an :class:`Encoder`, pruned or not.

    ``num_heads``/``intermediate_size`` describe the original model; ``heads``/``ffn`` the
    kept head count and FFN width of each layer (equal to the originals when unpruned).
    ``type_vocab_size`` is 0 when the model takes no ``token_type_ids`` input.
    ``position_offset`` > 0 selects RoBERTa-style positions: ``padding_idx + 1`` onwards,
    counted over non-padding tokens only. ``pooling`` (mean / cls / max over unmasked tokens)
    and ``normalize`` (L2) define an embedding model's output; classifiers ignore them.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    heads: list[int]
    ffn: list[int]
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int
    layer_norm_eps: float
    hidden_act: str
    task: str
    pooling: str = "mean"
    normalize: bool = False
    num_labels: int = 0
    classifier: str | None = None
    position_offset: int = 0

    def __post_init__(self) -> None:
        self.heads = [int(h) for h in self.heads]
        self.ffn = [int(f) for f in self.ffn]
        if self.arch not in ARCHS:
            raise ValueError(f"arch {self.arch!r} is not supported; use one of {', '.join(ARCHS)}")
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not supported; use one of {', '.join(TASKS)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.type_vocab_size < 0 or self.position_offset < 0:
            raise ValueError("type_vocab_size and position_offset must be >= 0")
        if len(self.heads) != self.num_layers or len(self.ffn) != self.num_layers:
            raise ValueError(
                f"heads ({len(self.heads)}) and ffn ({len(self.ffn)}) must list one entry per layer "
                f"(num_layers={self.num_layers})"
            )
        if any(not 0 <= h <= self.num_heads for h in self.heads):
            raise ValueError(f"kept heads {self.heads} must each lie in [0, {self.num_heads}]")
        if any(not 0 <= f <= self.intermediate_size for f in self.ffn):
            raise ValueError(f"kept FFN sizes {self.ffn} must each lie in [0, {self.intermediate_size}]")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}")
        if self.task == "embedding" and self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not supported; use one of {', '.join(POOLINGS)}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        if self.task == "classification":
            if self.num_labels <= 0:
                raise ValueError(f"a classifier needs num_labels >= 1, got {self.num_labels}")
            if self.classifier not in CLASSIFIER_LAYOUTS:
                raise ValueError(
                    f"classifier layout {self.classifier!r} is not supported; use one of {', '.join(CLASSIFIER_LAYOUTS)}"
                )

    @property
    def total_heads(self) -> int:
        """Kept heads over all layers."""
        return sum(self.heads)

    @property
    def total_ffn(self) -> int:
        """Kept FFN neurons over all layers."""
        return sum(self.ffn)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (lists copied)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        """Rebuild a spec, rejecting unknown or missing keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown encoder spec field(s): {', '.join(unknown)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"encoder spec is missing field(s): {', '.join(missing)}")
        return cls(**data)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """A BERT-initialised Linear that tolerates zero-sized shapes (emptied layers) without warnings."""
    with warnings.catch_warnings():
        # nn.Linear's own init warns that zero-element tensors are a no-op; they are meant to be.
        warnings.simplefilter("ignore", UserWarning)
        layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features)
    with torch.no_grad():
        if layer.weight.numel():
            layer.weight.normal_(0.0, 0.02)
        layer.bias.zero_()
    return layer


class Embeddings(nn.Module):
    """Word + position (+ token type) embeddings followed by LayerNorm."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.pad_token_id = spec.pad_token_id
        self.position_offset = spec.position_offset
        self.word = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.position = nn.Embedding(spec.max_position_embeddings, spec.hidden_size)
        self.token_type = nn.Embedding(spec.type_vocab_size, spec.hidden_size) if spec.type_vocab_size else None
        self.norm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        # A sliced constant (not arange) is what ORT's EmbedLayerNormalization fusion expects.
        self.register_buffer(
            "position_ids", torch.arange(spec.max_position_embeddings).unsqueeze(0), persistent=False
        )

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Embed ``input_ids`` [B, S] into [B, S, H]."""
        if self.position_offset:
            # RoBERTa: positions count non-padding tokens and start after padding_idx.
            not_pad = input_ids.ne(self.pad_token_id).int()
            position_ids = (torch.cumsum(not_pad, dim=1).type_as(not_pad) * not_pad).long()
            position_ids = position_ids + (self.position_offset - 1)
        else:
            position_ids = self.position_ids[:, : input_ids.size(1)]
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        return self.norm(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``num_heads`` kept heads of size ``head_dim``.

    With 0 heads ``q``/``k``/``v``/``o`` are zero-width Linears kept for uniform access; the
    forward pass then returns only ``o.bias`` (no zero-sized tensors reach the graph).
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q = _linear(hidden_size, inner)
        self.k = _linear(hidden_size, inner)
        self.v = _linear(hidden_size, inner)
        self.o = _linear(inner, hidden_size)

    def _split_heads(self, x: Tensor) -> Tensor:
        # [B, S, nh*d] -> [B, nh, S, d], with the head count as a graph constant.
        new_shape = x.size()[:-1] + (self.num_heads, self.head_dim)
        return x.view(new_shape).permute(0, 2, 1, 3)

    def forward(self, hidden: Tensor, mask_bias: Tensor, gate: Tensor | None = None) -> Tensor:
        """Attention output [B, S, H] (before the residual add)."""
        if self.num_heads == 0:
            return self.o.bias
        q = self._split_heads(self.q(hidden))
        k = self._split_heads(self.k(hidden))
        v = self._split_heads(self.v(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(self.head_dim)
        scores = scores + mask_bias
        probs = F.softmax(scores, dim=-1)
        context = torch.matmul(probs, v)
        if gate is not None:
            context = context * gate.view(1, -1, 1, 1)
        context = context.permute(0, 2, 1, 3).contiguous()
        context = context.view(context.size()[:-2] + (self.num_heads * self.head_dim,))
        return self.o(context)


class EncoderLayer(nn.Module):
    """One post-LayerNorm transformer block.

    ``attn_norm``'s input is ``residual + attention output``; recovery hooks it to read the
    pre-LayerNorm sum.
    """

    def __init__(self, spec: EncoderSpec, num_heads: int, ffn_size: int) -> None:
        super().__init__()
        self.attention = SelfAttention(spec.hidden_size, num_heads, spec.head_dim)
        self.attn_norm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)
        self.ffn_in = _linear(spec.hidden_size, ffn_size)
        self.ffn_out = _linear(ffn_size, spec.hidden_size)
        self.act = _activation(spec.hidden_act)
        self.ffn_norm = nn.LayerNorm(spec.hidden_size, eps=spec.layer_norm_eps)

    @property
    def ffn_size(self) -> int:
        """Kept FFN neurons in this layer."""
        return self.ffn_in.out_features

    def forward(
        self, hidden: Tensor, mask_bias: Tensor, head_gate: Tensor | None = None, ffn_gate: Tensor | None = None
    ) -> Tensor:
        """Transform [B, S, H] -> [B, S, H]."""
        hidden = self.attn_norm(hidden + self.attention(hidden, mask_bias, head_gate))
        if self.ffn_size == 0:
            ffn = self.ffn_out.bias
        else:
            act = self.act(self.ffn_in(hidden))
            if ffn_gate is not None:
                act = act * ffn_gate
            ffn = self.ffn_out(act)
        return self.ffn_norm(hidden + ffn)


class PoolingHead(nn.Module):
    """Sentence-transformers pooling (mean / cls / max over unmasked tokens), optionally L2-normalised."""

    def __init__(self, pooling: str, normalize: bool) -> None:
        super().__init__()
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Pool [B, S, H] into [B, H]."""
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "mean":
                # Same clamp as sentence-transformers, so an all-padding row gives 0, not NaN.
                pooled = (hidden * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
            else:
                pooled = (hidden * mask + (1.0 - mask) * -1e9).max(dim=1).values
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=1)
        return pooled


class ClassificationHead(nn.Module):
    """``out(act(dense(h[:, 0])))``: BERT's pooler+classifier, RoBERTa's head, DistilBERT's pre_classifier."""

    def __init__(self, hidden_size: int, num_labels: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.dense = _linear(hidden_size, hidden_size)
        self.act: nn.Module = nn.Tanh() if CLASSIFIER_LAYOUTS[layout] == "tanh" else nn.ReLU()
        self.out = _linear(hidden_size, num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [B, C] from the first token."""
        return self.out(self.act(self.dense(hidden[:, 0])))


def _per_layer(gates: Gates, sizes: list[int], what: str) -> list[Tensor | None]:
    """Split gates into one entry per layer, checking each layer's width."""
    if gates is None:
        return [None] * len(sizes)
    if len(gates) != len(sizes):
        raise ValueError(f"{what} gates cover {len(gates)} layers; the model has {len(sizes)}")
    out: list[Tensor | None] = []
    for i, (g, n) in enumerate(zip(gates, sizes)):
        if g.numel() != n:
            raise ValueError(f"{what} gate of layer {i} has {g.numel()} entries; the layer keeps {n}")
        out.append(g.reshape(n) if n else None)
    return out


class Encoder(nn.Module):
    """A BERT-family encoder built from an :class:`EncoderSpec`.

    ``forward`` returns the pooled (and normalised) embedding [B, D] for ``task="embedding"``
    or logits [B, C] for ``task="classification"``; ``encode`` returns the last hidden state.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embeddings = Embeddings(spec)
        self.layers = nn.ModuleList(EncoderLayer(spec, h, f) for h, f in zip(spec.heads, spec.ffn))
        self.head: nn.Module
        if spec.task == "classification":
            assert spec.classifier is not None  # checked by EncoderSpec
            self.head = ClassificationHead(spec.hidden_size, spec.num_labels, spec.classifier)
        else:
            self.head = PoolingHead(spec.pooling, spec.normalize)

    @property
    def uses_token_type_ids(self) -> bool:
        """Whether the model takes a ``token_type_ids`` input (BERT-style segment embeddings)."""
        return self.spec.type_vocab_size > 0

    @property
    def output_name(self) -> str:
        """The graph output's name under the artifact contract."""
        return "logits" if self.spec.task == "classification" else "embedding"

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        head_gates: Gates = None,
        ffn_gates: Gates = None,
    ) -> Tensor:
        """The last hidden state [B, S, H]."""
        heads = _per_layer(head_gates, self.spec.heads, "head")
        ffns = _per_layer(ffn_gates, self.spec.ffn, "FFN")
        hidden = self.embeddings(input_ids, token_type_ids)
        # Classic BERT extended mask: 0 where attended, a large negative where padded.
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * MASK_BIAS
        for layer, hg, fg in zip(self.layers, heads, ffns):
            hidden = layer(hidden, mask_bias, hg, fg)
        return hidden

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        head_gates: Gates = None,
        ffn_gates: Gates = None,
    ) -> Tensor:
        """Embedding [B, D] or logits [B, C]."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, head_gates, ffn_gates)
        return self.head(hidden, attention_mask)

    def flops(self, seq_len: int) -> int:
        """Floating-point operations (2 x multiply-adds) of one sequence of ``seq_len`` tokens.

        Counts the matrix products (projections, attention, FFN, classifier); LayerNorm,
        softmax and embeddings are negligible next to them.
        """
        total = self.spec.total_heads * head_flops(self.spec, seq_len)
        total += self.spec.total_ffn * neuron_flops(self.spec, seq_len)
        h = self.spec.hidden_size
        if self.spec.task == "classification":
            total += 2 * (h * h + h * self.spec.num_labels)
        return total


def head_flops(spec: EncoderSpec, seq_len: int) -> int:
    """FLOPs one attention head costs per sequence: its q/k/v/o slices and its two S x S products."""
    d, h, s = spec.head_dim, spec.hidden_size, seq_len
    return 2 * (4 * s * h * d + 2 * s * s * d)


def neuron_flops(spec: EncoderSpec, seq_len: int) -> int:
    """FLOPs one FFN neuron costs per sequence: one row of ``ffn_in`` and one column of ``ffn_out``."""
    return 2 * (2 * seq_len * spec.hidden_size)

