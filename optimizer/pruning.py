"""Physical pruning: slice whole attention heads and FFN neurons out of an :class:`Encoder`.

A :class:`PruningPlan` lists, per layer, the indices of the heads and FFN neurons to *keep*,
numbered within the encoder it is applied to (for an unpruned encoder: the original
numbering). :func:`prune` returns a new, smaller encoder whose outputs equal the original's
with the dropped heads/neurons gated to zero.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pruneserve.optimizer.modeling import Encoder, EncoderSpec

__all__ = ["PruningPlan", "prune"]


def _check_indices(kind: str, per_layer: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for i, kept in enumerate(per_layer):
        values = [int(k) for k in kept]
        if values != sorted(set(values)) or any(v < 0 for v in values):
            raise ValueError(
                f"kept {kind} indices of layer {i} must be distinct, sorted and non-negative; got {list(kept)}"
            )
        out.append(values)
    return out


@dataclass
class PruningPlan:
    """Kept head indices and kept FFN neuron indices, one sorted list per layer (JSON-ready)."""

    heads: list[list[int]]
    ffn: list[list[int]]

    def __post_init__(self) -> None:
        self.heads = _check_indices("head", self.heads)
        self.ffn = _check_indices("FFN neuron", self.ffn)
        if len(self.heads) != len(self.ffn):
            raise ValueError(f"the plan lists heads for {len(self.heads)} layers but FFN for {len(self.ffn)}")

    @property
    def num_layers(self) -> int:
        """Layers the plan covers."""
        return len(self.heads)

    @classmethod
    def from_masks(cls, head_mask: Tensor, ffn_mask: Tensor) -> PruningPlan:
        """Build a plan from 0/1 masks of shape (layers, heads) and (layers, ffn); non-zero = keep."""
        if head_mask.dim() != 2 or ffn_mask.dim() != 2 or head_mask.shape[0] != ffn_mask.shape[0]:
            raise ValueError(
                f"masks must be (layers, heads) and (layers, ffn) with equal layers; got "
                f"{tuple(head_mask.shape)} and {tuple(ffn_mask.shape)}"
            )
        heads = [torch.nonzero(row, as_tuple=False).flatten().tolist() for row in head_mask.detach().cpu()]
        ffn = [torch.nonzero(row, as_tuple=False).flatten().tolist() for row in ffn_mask.detach().cpu()]
        return cls(heads=heads, ffn=ffn)

    @classmethod
    def keep_all(cls, spec: EncoderSpec) -> PruningPlan:
        """The plan that keeps every head and neuron of a model with this spec."""
        return cls(heads=[list(range(h)) for h in spec.heads], ffn=[list(range(f)) for f in spec.ffn])

    def check(self, spec: EncoderSpec) -> None:
        """Raise ValueError unless every index exists in a model with this spec."""
        if self.num_layers != spec.num_layers:
            raise ValueError(f"the plan covers {self.num_layers} layers; the model has {spec.num_layers}")
        for i, (kh, kf, h, f) in enumerate(zip(self.heads, self.ffn, spec.heads, spec.ffn)):
            if kh and kh[-1] >= h:
                raise ValueError(f"layer {i}: the plan keeps head {kh[-1]} but the layer has {h} heads")
            if kf and kf[-1] >= f:
                raise ValueError(f"layer {i}: the plan keeps FFN neuron {kf[-1]} but the layer has {f}")

    def to_masks(self, spec: EncoderSpec) -> tuple[Tensor, Tensor]:
        """Float 0/1 masks (layers, spec.num_heads) and (layers, spec.intermediate_size)."""
        self.check(spec)
        head_mask = torch.zeros(spec.num_layers, spec.num_heads)
        ffn_mask = torch.zeros(spec.num_layers, spec.intermediate_size)
        for i, (kh, kf) in enumerate(zip(self.heads, self.ffn)):
            head_mask[i, kh] = 1.0
            ffn_mask[i, kf] = 1.0
        return head_mask, ffn_mask

    def to_dict(self) -> dict[str, Any]:
        """``{"heads": [[...], ...], "ffn": [[...], ...]}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningPlan:
        """Inverse of :meth:`to_dict`; rejects missing or unknown keys."""
        if set(data) != {"heads", "ffn"}:
            raise ValueError(f"a pruning plan has exactly the keys 'heads' and 'ffn'; got {sorted(data)}")
        return cls(heads=data["heads"], ffn=data["ffn"])

    def summary(self, spec: EncoderSpec | None = None) -> str:
        """One line: kept heads and neurons per layer (and of how many, given the original spec)."""
        heads = [len(k) for k in self.heads]
        ffn = [len(k) for k in self.ffn]
        of_heads = f"/{spec.num_heads * spec.num_layers}" if spec else ""
        of_ffn = f"/{spec.intermediate_size * spec.num_layers}" if spec else ""
        return f"heads kept {sum(heads)}{of_heads} per layer {heads}; FFN neurons kept {sum(ffn)}{of_ffn} per layer {ffn}"


def _slice_linear(linear: nn.Linear, index: Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping the given output rows (dim=0) or input columns (dim=1)."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias.detach()
    bias = bias.index_select(0, index).clone() if dim == 0 else bias.clone()
    # A 1x1 meta shell avoids nn.Linear's init (which warns on zero-sized layers); the real tensors follow.
    out = nn.Linear(1, 1, device="meta")
    out.in_features, out.out_features = weight.shape[1], weight.shape[0]
    out.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    out.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return out


def prune(encoder: Encoder, plan: PruningPlan) -> Encoder:
    """Return a deep copy of ``encoder`` keeping only the plan's heads and neurons.

    The copy's ``spec.heads``/``spec.ffn`` hold the new per-layer counts; ``num_heads`` and
    ``intermediate_size`` still describe the original model. ``encoder`` is not modified.
    """
    spec = encoder.spec
    plan.check(spec)
    new_spec = EncoderSpec.from_dict(
        {**spec.to_dict(), "heads": [len(k) for k in plan.heads], "ffn": [len(k) for k in plan.ffn]}
    )
    pruned = copy.deepcopy(encoder)
    pruned.spec = new_spec
    d = spec.head_dim
    for layer, kept_heads, kept_ffn in zip(pruned.layers, plan.heads, plan.ffn):
        attn = layer.attention
        rows = torch.tensor([h * d + j for h in kept_heads for j in range(d)], dtype=torch.long)
        attn.q = _slice_linear(attn.q, rows, 0)
        attn.k = _slice_linear(attn.k, rows, 0)
        attn.v = _slice_linear(attn.v, rows, 0)
        attn.o = _slice_linear(attn.o, rows, 1)
        attn.num_heads = len(kept_heads)
        neurons = torch.tensor(kept_ffn, dtype=torch.long)
        layer.ffn_in = _slice_linear(layer.ffn_in, neurons, 0)
        layer.ffn_out = _slice_linear(layer.ffn_out, neurons, 1)
    return pruned
