"""Recovering quality after physical pruning: layer-wise least squares, then distillation.

**Least-squares refit.** Removing heads leaves each attention output projection ``o``
combining fewer head contexts than it was trained on. Layer by layer (in order, so each layer
sees the already repaired layers below it) we refit ``o`` so that the pruned model's
pre-LayerNorm sum matches the original's::

    residual_s + o(context_s)  ≈  (residual_t + attention_t)        (the teacher's attn_norm input)
    target for o = teacher's pre-LayerNorm sum - the pruned model's own residual

which is a linear regression on the kept contexts. It is solved in closed form with a ridge
penalty *toward the original (sliced) weights*, ``alpha = ridge_alpha_scale x mean Gram
diagonal``: alpha 0.1 was measured to generalise to other text, 1e-3 overfits the
calibration data (other-domain cosine 0.776, below no recovery at all). Optionally each FFN
output projection ``ffn_out`` is refit the same way against the teacher's ``ffn_norm`` input.
Both happen in one bottom-up sweep (attention then FFN in each layer), so each fit sees the
already repaired parts below it and the teacher runs once; the Gram matrix is one float32
product over all real tokens, solved in float64 (:func:`ridge_solve`).

**Distillation.** A short AdamW run on all non-embedding weights: ``1 - cosine`` to the
teacher's embeddings (embedding models) or temperature-scaled KL to its logits (classifiers),
plus by default a token-level ``1 - cosine`` to the teacher's last hidden states (returned by
the refit sweep, so they cost nothing extra).

Measured on all-MiniLM-L6-v2 with 50% heads removed, held-out mean cosine: see
``benchmarks/results/prune_minilm.md`` (pruned .833, refit .962, + distillation with a cosine-decayed rate .971).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pruneserve.optimizer.config import LrSchedule, RecoveryConfig
from pruneserve.optimizer.quality import Quality, fidelity

if TYPE_CHECKING:
    from torch import Tensor, nn

    from pruneserve.optimizer.data import Batch
    from pruneserve.optimizer.modeling import Encoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryStage:
    """Quality on the evaluation split after one recovery method (``pruned`` = before any)."""

    method: str
    quality: Quality
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "quality": self.quality.to_dict(), "seconds": round(self.seconds, 2)}


def _refit_linear(linear: nn.Linear, inputs: list[Tensor], targets: list[Tensor], alpha_scale: float) -> None:
    """Replace ``linear``'s weight and bias in place by :func:`ridge_solve` of ``inputs -> targets``."""
    weight, bias = ridge_solve(inputs, targets, linear.weight, linear.bias, alpha_scale)
    linear.weight.copy_(weight)
    linear.bias.copy_(bias)


def ridge_solve(
    xs: Sequence[Tensor], ys: Sequence[Tensor], weight: Tensor, bias: Tensor, alpha_scale: float
) -> tuple[Tensor, Tensor]:
    """Solve ``y ≈ x @ W.T + b`` by ridge regression toward ``(weight, bias)``; return the new ``(W, b)``.

    ``xs``/``ys`` are row blocks (tokens x features) of one regression. The Gram matrix is one
    float32 product over all rows (a single large matmul uses every core; summing per-batch
    products converted to float64 cost more than the product itself), and the system is solved
    in float64. float32 accumulation is accurate enough here: the ridge term,
    ``alpha = alpha_scale x mean Gram diagonal``, keeps the system well conditioned.
    """
    import torch

    x = torch.cat(list(xs))
    y = torch.cat(list(ys))
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    del x
    gram = (xa.T @ xa).double()
    cross = (xa.T @ y).double()
    del xa
    n_in = weight.shape[1]
    original = torch.cat([weight.T, bias[None, :]], dim=0).double()
    alpha = alpha_scale * float(gram.diagonal()[:n_in].mean())
    solved = torch.linalg.solve(gram + alpha * torch.eye(n_in + 1, dtype=torch.float64), cross + alpha * original)
    return solved[:n_in].T.to(weight.dtype).contiguous(), solved[n_in].to(bias.dtype)


def _teacher_sums(block: nn.Module, hidden: Tensor, mask_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One teacher layer: its ``attn_norm`` input, its ``ffn_norm`` input and its output."""
    got: list[Tensor] = []
    handles = [norm.register_forward_pre_hook(lambda _m, args: got.append(args[0]))
               for norm in (block.attn_norm, block.ffn_norm)]
    try:
        out = block(hidden, mask_bias)
    finally:
        for handle in handles:
            handle.remove()
    return got[0], got[1], out


def _context(block: nn.Module, hidden: Tensor, mask_bias: Tensor) -> Tensor:
    """The concatenated head contexts entering the attention output projection ``o``."""
    got: list[Tensor] = []
    handle = block.attention.o.register_forward_pre_hook(lambda _m, args: got.append(args[0]))
    try:
        block.attention(hidden, mask_bias)
    finally:
        handle.remove()
    return got[0]


def refit(
    student: Encoder,
    teacher: Encoder,
    batches: Sequence[Batch],
    *,
    kinds: Sequence[str],
    alpha_scale: float,
    progress: bool = False,
) -> list[Tensor]:
    """Refit ``kinds`` ("attention": each ``o``; "ffn": each ``ffn_out``) layer by layer, bottom up, in place.

    Returns the teacher's last hidden states per batch (computed on the way; distillation's
    token-level targets).

    One sweep: both models' hidden states are carried from layer to layer, the teacher's
    pre-LayerNorm sums are read in one pass of its layer, and in each student layer the
    attention projection is refit first, then the FFN projection on the already repaired
    attention output, then the layer's output is passed on. So every projection is fitted to
    what the already refit parts below it produce. Layers that kept no heads (or no neurons)
    have nothing to refit and are skipped. Only real (non-padding) tokens enter the regressions.
    """
    import torch
    from tqdm.auto import tqdm

    from pruneserve.optimizer.modeling import MASK_BIAS

    unknown = sorted(set(kinds) - {"attention", "ffn"})
    if unknown:
        raise ValueError(f"unknown refit kind(s) {unknown}; use 'attention' and/or 'ffn'")
    was_training = student.training
    student.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            h_s = [student.embeddings(b.inputs["input_ids"], b.inputs.get("token_type_ids")) for b in batches]
            h_t = [teacher.embeddings(b.inputs["input_ids"], b.inputs.get("token_type_ids")) for b in batches]
            # The same additive mask Encoder.encode builds: 0 where attended, MASK_BIAS where padded.
            biases = [(1.0 - b.attention_mask[:, None, None, :].float()) * MASK_BIAS for b in batches]
            real = [b.attention_mask.bool() for b in batches]
            for layer in tqdm(range(len(student.layers)), desc="least-squares refit", unit="layer",
                              disable=not progress, leave=False):
                s_block, t_block = student.layers[layer], teacher.layers[layer]
                sums = [_teacher_sums(t_block, h, bias) for h, bias in zip(h_t, biases)]
                h_t = [out for _, _, out in sums]
                # Attention: hidden + o(context) should match the teacher's attn_norm input.
                attn = s_block.attention
                if "attention" in kinds and attn.num_heads:
                    contexts = [_context(s_block, h, bias) for h, bias in zip(h_s, biases)]
                    _refit_linear(
                        attn.o, [c[m] for c, m in zip(contexts, real)],
                        [(t_sum - h)[m] for (t_sum, _, _), h, m in zip(sums, h_s, real)], alpha_scale,
                    )
                    mid = [s_block.attn_norm(h + attn.o(c)) for h, c in zip(h_s, contexts)]
                    del contexts
                else:
                    mid = [s_block.attn_norm(h + attn(h, bias)) for h, bias in zip(h_s, biases)]
                # FFN: mid + ffn_out(act(ffn_in(mid))) should match the teacher's ffn_norm input.
                if "ffn" in kinds and s_block.ffn_size:
                    acts = [s_block.act(s_block.ffn_in(m)) for m in mid]
                    _refit_linear(
                        s_block.ffn_out, [a[m] for a, m in zip(acts, real)],
                        [(t_sum - h)[m] for (_, t_sum, _), h, m in zip(sums, mid, real)], alpha_scale,
                    )
                    h_s = [s_block.ffn_norm(m + s_block.ffn_out(a)) for m, a in zip(mid, acts)]
                    del acts
                elif s_block.ffn_size:
                    h_s = [s_block.ffn_norm(m + s_block.ffn_out(s_block.act(s_block.ffn_in(m)))) for m in mid]
                else:
                    h_s = [s_block.ffn_norm(m + s_block.ffn_out.bias) for m in mid]
                del sums, mid
    finally:
        student.train(was_training)
    return h_t


def teacher_hidden_states(teacher: Encoder, batches: Sequence[Batch]) -> list[Tensor]:
    """The teacher's last hidden states [B, S, H] per batch (when no refit computed them)."""
    import torch

    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            return [teacher.encode(**b.inputs) for b in batches]
    finally:
        teacher.train(was_training)


def distill(
    student: Encoder,
    batches: Sequence[Batch],
    teacher: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.01,
    temperature: float = 1.0,
    hidden: Sequence[Tensor] | None = None,
    hidden_weight: float = 1.0,
    schedule: LrSchedule = "constant",
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train all non-embedding weights of ``student`` toward the teacher's outputs for ``steps`` steps.

    ``teacher`` holds the teacher's outputs per batch; ``hidden`` optionally its last hidden
    states, which add ``hidden_weight x (1 - cosine)`` averaged over every real token: one
    constraint per token instead of one per text, which generalises better from a small
    calibration set than the pooled output alone.
    ``schedule="cosine"`` decays the learning rate from ``lr`` to 0 over the ``steps`` (half a
    cosine wave): the early steps move far from the refit point, the last ones settle, and the
    result generalised better to held-out text than a constant rate (see the module docstring).
    Batches are visited in a seeded random order, epoch after epoch. Returns the loss per step.
    """
    import math

    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    params = [p for name, p in student.named_parameters() if not name.startswith("embeddings.")]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    classification = student.spec.task == "classification"
    losses: list[float] = []
    order: list[int] = []
    was_training = student.training
    student.train()
    try:
        for step in tqdm(range(steps), desc="distillation", unit="step", disable=not progress, leave=False):
            if schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            index = order.pop()
            batch = batches[index]
            states = student.encode(**batch.inputs)
            out = student.head(states, batch.attention_mask)
            target = teacher[index]
            if classification:
                loss = F.kl_div(
                    F.log_softmax(out / temperature, -1), F.log_softmax(target / temperature, -1),
                    log_target=True, reduction="batchmean",
                ) * temperature**2
            else:
                loss = (1.0 - F.cosine_similarity(out, target, dim=-1)).mean()
            if hidden is not None and hidden_weight > 0:
                real = batch.attention_mask.bool()
                token_cos = F.cosine_similarity(states[real], hidden[index][real], dim=-1)
                loss = loss + hidden_weight * (1.0 - token_cos).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        student.train(was_training)
        student.zero_grad(set_to_none=True)
    return losses


def recover(
    student: Encoder,
    teacher: Encoder,
    score_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    config: RecoveryConfig,
    *,
    teacher_score: Sequence[Tensor],
    teacher_eval: Sequence[Tensor],
    pruned_quality: Quality | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[RecoveryStage]:
    """Apply the configured recovery methods to ``student`` in place, measuring after each.

    Fits on ``score_batches``, measures on ``eval_batches``. The first stage, ``pruned``, is the
    quality before any recovery: ``pruned_quality`` when the caller measured it already (the
    search's last step measures the same masks), else measured here.
    """
    if pruned_quality is None:
        pruned_quality = fidelity(student, teacher_eval, eval_batches)
    stages = [RecoveryStage("pruned", pruned_quality, 0.0)]

    def measure(method: str, started: float) -> None:
        stage = RecoveryStage(method, fidelity(student, teacher_eval, eval_batches), time.perf_counter() - started)
        logger.info("after %s (%.1f s): %s", method, stage.seconds, stage.quality.describe())
        stages.append(stage)

    logger.info("pruned, before recovery: %s", stages[0].quality.describe())
    kinds = [kind for kind, on in (("attention", config.least_squares), ("ffn", config.refit_ffn)) if on]
    hidden: list[Tensor] | None = None
    if kinds:
        started = time.perf_counter()
        hidden = refit(student, teacher, score_batches, kinds=kinds, alpha_scale=config.ridge_alpha_scale,
                       progress=progress)
        measure("refit" if len(kinds) == 2 else f"{kinds[0]}_refit", started)
    if config.distills:
        steps = config.distill_steps
        if config.distill_epochs is not None:
            steps = max(1, round(config.distill_epochs * len(score_batches)))
        started = time.perf_counter()
        if config.distill_hidden_weight > 0 and hidden is None:
            hidden = teacher_hidden_states(teacher, score_batches)
        distill(student, score_batches, teacher_score, steps=steps, lr=config.lr, weight_decay=config.weight_decay,
                temperature=config.distill_temperature, hidden=hidden if config.distill_hidden_weight > 0 else None,
                hidden_weight=config.distill_hidden_weight, schedule=config.lr_schedule, seed=seed,
                progress=progress)
        measure("distillation", started)
    return stages
