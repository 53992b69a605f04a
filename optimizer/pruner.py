"""The pruning stage end to end: data -> importance -> search -> prune -> recovery.

:func:`run_pruning` is what ``pruneserve prune`` and the ``optimize`` pipeline call; it reads
top to bottom as the list of stages, each a function from the modules named in its comment.
The loaded (original) model is never modified: it is the teacher every quality figure is
measured against.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pruneserve.optimizer.config import DataConfig, ImportanceConfig, PruneConfig
from pruneserve.optimizer.data import Batch, DataSplit, load_data, make_batches
from pruneserve.optimizer.importance import Importance, compute_importance
from pruneserve.optimizer.quality import Quality, teacher_outputs
from pruneserve.optimizer.recovery import RecoveryStage, recover
from pruneserve.optimizer.search import TraceStep, search

if TYPE_CHECKING:
    from torch import Tensor

    from pruneserve.optimizer.adapters import LoadedModel
    from pruneserve.optimizer.modeling import Encoder
    from pruneserve.optimizer.pruning import PruningPlan

logger = logging.getLogger(__name__)


class _Timings(dict[str, float]):
    """Seconds per stage, filled by ``with timings("stage"):``."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = round(time.perf_counter() - started, 2)


@dataclass
class PruneResult:
    """Everything the pruning stage produced and measured."""

    encoder: Encoder
    plan: PruningPlan
    importance: Importance
    trace: list[TraceStep]
    recovery: list[RecoveryStage]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    flops_seq_len: int
    data_source: str
    score_examples: int
    eval_examples: int
    config: PruneConfig
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def quality_before_recovery(self) -> Quality:
        """Quality of the pruned model before any recovery (evaluation split)."""
        return self.recovery[0].quality

    @property
    def quality(self) -> Quality:
        """Final quality on the evaluation split."""
        return self.recovery[-1].quality

    def record(self) -> dict[str, Any]:
        """The JSON record written into ``pruning.json`` (and the artifact report)."""
        return {
            "kept_heads": self.plan.heads,
            "ffn_per_layer": [len(k) for k in self.plan.ffn],
            "heads_per_layer": [len(k) for k in self.plan.heads],
            "params": {"before": self.params_before, "after": self.params_after},
            "flops": {"seq_len": self.flops_seq_len, "before": self.flops_before, "after": self.flops_after},
            "quality": {
                "data": self.data_source,
                "evaluated_on": f"{self.eval_examples} held-out examples (not used for scoring or recovery)",
                "before_recovery": self.quality_before_recovery.to_dict(),
                "after_recovery": self.quality.to_dict(),
                "stages": [s.to_dict() for s in self.recovery],
            },
            "search_trace": [t.to_dict() for t in self.trace],
            "importance": self.importance.to_dict(),
            "score_examples": self.score_examples,
            "timings_s": dict(self.timings),
            "config": self.config.to_dict(),
        }


@dataclass
class PreparedData:
    """The tokenized splits and the original model's outputs on them, computed once.

    ``run_pruning(..., prepared=...)`` uses these instead of recomputing them, so a caller that
    needs the same batches and teacher outputs afterwards (the optimize pipeline: calibration
    and validation) pays for them only once. Build it with :func:`prepare`.
    """

    split: DataSplit
    score_batches: list[Batch]
    eval_batches: list[Batch]
    teacher_score: list[Tensor]
    teacher_eval: list[Tensor]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "data", "teacher_outputs"


def prepare(loaded: LoadedModel, config: DataConfig) -> PreparedData:
    """Read, split and tokenize the data and compute the teacher's outputs on both splits."""
    timings = _Timings()
    with timings("data"):  # data.py: read, dedupe, split, tokenize
        split, score_batches, eval_batches = prepare_data(loaded, config)
    with timings("teacher_outputs"):  # quality.py: the reference every figure is measured against
        teacher_score = teacher_outputs(loaded.encoder, score_batches)
        teacher_eval = teacher_outputs(loaded.encoder, eval_batches)
    return PreparedData(split, score_batches, eval_batches, teacher_score, teacher_eval, dict(timings))


def prepare_data(loaded: LoadedModel, config: DataConfig) -> tuple[DataSplit, list[Batch], list[Batch]]:
    """Read and split the calibration data and tokenize both parts for ``loaded``'s model."""
    split = load_data(config, loaded.labels)
    options = {
        "batch_size": config.batch_size,
        "max_length": min(config.max_length, loaded.max_sequence_length),
        "uses_token_type_ids": loaded.encoder.uses_token_type_ids,
        "by_length": True,  # ~2.4x less padding on the bundled corpus; every later stage is cheaper
        "seed": config.seed,
    }
    return (
        split,
        make_batches(split.score, loaded.tokenizer, **options),
        make_batches(split.eval, loaded.tokenizer, **options),
    )


def score_model(
    loaded: LoadedModel, data: DataConfig, importance: ImportanceConfig, progress: bool = True
) -> tuple[Importance, DataSplit]:
    """Importance of every head and neuron of ``loaded`` on the scoring split (``pruneserve score``)."""
    split, score_batches, _ = prepare_data(loaded, data)
    return compute_importance(loaded.encoder, score_batches, importance, progress=progress), split


def _params(encoder: Encoder) -> int:
    return sum(p.numel() for p in encoder.parameters())


def run_pruning(
    loaded: LoadedModel, config: PruneConfig, progress: bool = True, *, prepared: PreparedData | None = None
) -> PruneResult:
    """Prune ``loaded`` as ``config`` says and recover quality; ``loaded`` is left unchanged.

    ``prepared`` (from :func:`prepare` with ``config.data`` and the same ``loaded``) skips
    reading the data and computing the teacher's outputs; its timings are reported as this
    run's ``data`` and ``teacher_outputs`` stages.

    Raises :class:`~pruneserve.optimizer.errors.DataError`, ``ConfigError`` or ``BudgetError``
    (all ``OptimizerError``) for problems the user can fix.
    """
    from pruneserve.optimizer.pruning import prune

    teacher = loaded.encoder
    timings = _Timings()
    seq_len = config.budget.cost_seq_len

    if prepared is None:
        prepared = prepare(loaded, config.data)  # data.py + quality.py: splits and teacher outputs
    timings.update(prepared.timings)
    split, score_batches, eval_batches = prepared.split, prepared.score_batches, prepared.eval_batches
    teacher_score, teacher_eval = prepared.teacher_score, prepared.teacher_eval
    with timings("search"):  # importance.py + search.py: iterative, re-scored masks
        found = search(
            teacher, score_batches, eval_batches, config.budget, config.importance,
            teacher_score=teacher_score, teacher_eval=teacher_eval, progress=progress,
        )
    logger.info("plan: heads per layer %s, FFN per layer %s",
                [len(k) for k in found.plan.heads], [len(k) for k in found.plan.ffn])
    with timings("prune"):  # pruning.py: a physically smaller copy
        student = prune(teacher, found.plan)
    with timings("recovery"):  # recovery.py: least-squares refit, then distillation
        stages = recover(
            student, teacher, score_batches, eval_batches, config.recovery,
            teacher_score=teacher_score, teacher_eval=teacher_eval, pruned_quality=found.quality,
            seed=config.data.seed, progress=progress,
        )
    student.eval()
    return PruneResult(
        encoder=student,
        plan=found.plan,
        importance=found.importance,
        trace=found.trace,
        recovery=stages,
        params_before=_params(teacher),
        params_after=_params(student),
        flops_before=teacher.flops(seq_len),
        flops_after=student.flops(seq_len),
        flops_seq_len=seq_len,
        data_source=split.source,
        score_examples=len(split.score),
        eval_examples=len(split.eval),
        config=config,
        timings=dict(timings),
    )
