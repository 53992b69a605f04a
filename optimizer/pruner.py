"""The pruning stage end to end: data -> importance -> search -> prune -> recovery.

:func:`run_pruning` is what ``pruneserve prune`` and the ``optimize`` pipeline call; it reads
top to bottom as the list of stages, each a function from the modules named in its comment.
The loaded (original) model is never modified: it is the teacher every quality figure is
measured against.

The stages connect through files: :func:`load_scores` reads ``pruneserve score``'s
``importance.json`` as the search's first scores (``prune --scores``), and
:func:`load_pruned_result` turns ``pruneserve prune``'s checkpoint back into the
:class:`PruneResult` it was written from (``optimize --from-pruned``). Both refuse files made
from another model (sha256) or of another shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneserve.optimizer.config import DataConfig, ImportanceConfig, PruneConfig
from pruneserve.optimizer.data import Batch, DataSplit, load_data, make_batches
from pruneserve.optimizer.errors import CheckpointError, ConfigError, OptimizerError
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
    #: The original model: its name, folder and sha256 of its weights (what a later stage checks).
    source_model: str = ""
    source_path: str = ""
    source_sha256: str = ""
    #: The ``importance.json`` the search's first scores came from (``prune --scores``), if any.
    scores_from: str | None = None

    @property
    def quality_before_recovery(self) -> Quality:
        """Quality of the pruned model before any recovery (evaluation split)."""
        return self.recovery[0].quality

    @property
    def quality(self) -> Quality:
        """Final quality on the evaluation split."""
        return self.recovery[-1].quality

    def record(self) -> dict[str, Any]:
        """The JSON record written into ``pruning.json`` (and the artifact report);
        :func:`load_pruned_result` reads it back."""
        return {
            "source_model": self.source_model,
            "source_sha256": self.source_sha256,
            "source_path": self.source_path,
            **({"scores_from": self.scores_from} if self.scores_from else {}),
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
    loaded: LoadedModel,
    config: PruneConfig,
    progress: bool = True,
    *,
    prepared: PreparedData | None = None,
    scores: Importance | None = None,
    scores_from: str | None = None,
) -> PruneResult:
    """Prune ``loaded`` as ``config`` says and recover quality; ``loaded`` is left unchanged.

    ``prepared`` (from :func:`prepare` with ``config.data`` and the same ``loaded``) skips
    reading the data and computing the teacher's outputs; its timings are reported as this
    run's ``data`` and ``teacher_outputs`` stages. ``scores`` (from :func:`load_scores`, read
    from ``scores_from``) are the search's first scores instead of scoring the unpruned model.

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
            teacher_score=teacher_score, teacher_eval=teacher_eval, progress=progress, first=scores,
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
        source_model=loaded.name,
        source_path=str(loaded.source_dir),
        source_sha256=loaded.source_sha256,
        scores_from=scores_from,
    )


#: The file ``pruneserve score`` writes and ``prune --scores`` reads.
SCORES_FILE = "importance.json"


def load_scores(path: str | Path, loaded: LoadedModel, config: ImportanceConfig | None = None) -> Importance:
    """The scores in ``pruneserve score``'s output folder ``path`` (or its ``importance.json``),
    checked against ``loaded``: the same model (sha256 of the weights) and shape (layers x heads,
    layers x FFN neurons). Scores made with another ``method`` or normalisation than ``config``
    are used as given, with a warning (later search steps re-score with ``config``).
    """
    import json

    file = Path(path)
    file = file / SCORES_FILE if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"--scores {path} has no {SCORES_FILE}; pass the --out folder of `pruneserve score`")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
        scores = Importance.from_dict(document)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--scores {file} is not a `pruneserve score` importance file: {exc}") from exc
    recorded = document.get("model_sha256")
    if recorded != loaded.source_sha256:
        raise ConfigError(
            f"--scores {file} was scored on model {document.get('model')!r} (weights sha256 {recorded}), not on "
            f"{loaded.name} ({loaded.source_sha256}); score this model with `pruneserve score`, or pass the "
            "--model the scores were made on"
        )
    spec = loaded.encoder.spec
    want = {"heads": (spec.num_layers, spec.num_heads), "ffn": (spec.num_layers, spec.intermediate_size)}
    got = {"heads": tuple(scores.heads.shape), "ffn": tuple(scores.ffn.shape)}
    if got != want:
        raise ConfigError(f"--scores {file} holds scores of shape {got}, but {loaded.name} needs {want}; "
                          "the file does not belong to this model")
    if config is not None and (scores.method, scores.normalize) != (config.method, config.normalize):
        logger.warning("--scores %s was scored with method %s, normalisation %s; later search steps re-score with "
                       "method %s, normalisation %s", file, scores.method, scores.normalize, config.method,
                       config.normalize)
    logger.info("search: the first scores come from %s (%d examples, data %s)", file, scores.examples,
                document.get("data"))
    return scores


def _quality(raw: dict[str, Any]) -> Quality:
    known = {f.name for f in fields(Quality)}
    return Quality(**{k: v for k, v in raw.items() if k in known})


def load_pruned_result(path: str | Path, loaded: LoadedModel) -> PruneResult:
    """``pruneserve prune``'s checkpoint at ``path`` as the :class:`PruneResult` it was written
    from, its pruned encoder the student of ``loaded`` (the original model).

    Raises :class:`CheckpointError` when ``loaded`` is not the model the checkpoint was pruned
    from (sha256 of the weights), when the checkpoint does not fit it, or when its record lacks
    what ``pruneserve prune`` writes.
    """
    from pruneserve.optimizer.checkpoint import PRUNING_FILE, load_pruned
    from pruneserve.optimizer.recovery import RecoveryStage
    from pruneserve.optimizer.search import TraceStep

    folder = Path(path)
    encoder, document = load_pruned(folder)
    record, plan = document.get("record") or {}, document.get("plan")
    recorded = record.get("source_sha256")
    if recorded != loaded.source_sha256:
        raise CheckpointError(
            f"--from-pruned {folder} was pruned from {record.get('source_model')!r} (weights sha256 {recorded}), "
            f"but the model given is {loaded.name} at {loaded.source_dir} ({loaded.source_sha256}); pass the "
            "original model as --model"
        )
    if plan is None:
        raise CheckpointError(f"{folder / PRUNING_FILE} records no pruning plan; pass the --out folder of "
                              "`pruneserve prune`")
    try:
        plan.check(loaded.encoder.spec)
    except ValueError as exc:
        raise CheckpointError(f"--from-pruned {folder} does not fit {loaded.name}: {exc}") from exc
    if [len(k) for k in plan.heads] != encoder.spec.heads or [len(k) for k in plan.ffn] != encoder.spec.ffn:
        raise CheckpointError(f"{folder / PRUNING_FILE}: the plan and the weights' shapes disagree")
    if (encoder.spec.pooling, encoder.spec.normalize) != (loaded.encoder.spec.pooling, loaded.encoder.spec.normalize):
        raise CheckpointError(
            f"--from-pruned {folder} pools {encoder.spec.pooling} (normalize {encoder.spec.normalize}) but the teacher "
            f"{loaded.name} pools {loaded.encoder.spec.pooling} (normalize {loaded.encoder.spec.normalize}); "
            "give the same --pooling/--normalize the checkpoint was pruned with"
        )
    if encoder.spec.task != loaded.task:
        raise CheckpointError(f"--from-pruned {folder} is a {encoder.spec.task} model, {loaded.name} a {loaded.task} one")
    try:
        quality, params, flops = record["quality"], record["params"], record["flops"]
        stages = [RecoveryStage(s["method"], _quality(s["quality"]), float(s["seconds"])) for s in quality["stages"]]
        trace = [
            TraceStep(t["step"], t["heads_removed"], t["ffn_removed"], t["flops_removed"], _quality(t["quality"]),
                      t.get("accepted", True))
            for t in record["search_trace"]
        ]
        result = PruneResult(
            encoder=encoder,
            plan=plan,
            importance=Importance.from_dict(record["importance"]),
            trace=trace,
            recovery=stages,
            params_before=int(params["before"]),
            params_after=int(params["after"]),
            flops_before=int(flops["before"]),
            flops_after=int(flops["after"]),
            flops_seq_len=int(flops["seq_len"]),
            data_source=str(quality["data"]),
            score_examples=int(record["score_examples"]),
            eval_examples=stages[-1].quality.examples,
            config=PruneConfig.from_dict(record["config"]),
            timings=dict(record.get("timings_s") or {}),
            source_model=str(record.get("source_model", loaded.name)),
            source_path=str(record.get("source_path") or loaded.source_dir),
            source_sha256=loaded.source_sha256,
            scores_from=record.get("scores_from"),
        )
    except OptimizerError as exc:
        raise CheckpointError(f"{folder / PRUNING_FILE}: its recorded config is invalid: {exc}") from exc
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{folder / PRUNING_FILE} lacks the pruning record `pruneserve prune` writes ({type(exc).__name__}: "
            f"{exc}); pass the --out folder of `pruneserve prune`"
        ) from exc
    return result
