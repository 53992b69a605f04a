"""``pruneserve optimize`` end to end: one model folder in, one verified artifact out.

:func:`run_optimize` reads top to bottom as the list of stages::

    load -> data -> prune (score -> search -> prune -> recover) -> export -> fuse -> quantize
         -> engines -> validate -> write

``quantize`` builds the candidate graphs (with ``--quantize auto`` on a CPU target: dynamic
INT8, batch-invariant static INT8 and fp32); ``engines`` measures each candidate's held-out
quality, batch invariance and latency on every engine available here, interleaved, and keeps
the fastest (quantization, engine) pair that meets the quality floor and, unless
``allow_batch_variance``, answers the same alone and batched. The manifest records every
candidate's numbers and verdict (``quantization.selection``), the chosen graph's numbers per
engine (``engines``) and the engine to serve with (``runtime``, followed by ``serve --engine auto``).

Each stage is a function from another module; this one only sequences them, logs each
stage's wall time and peak memory, and assembles the manifest. Everything is built in a
scratch directory and handed to :func:`pruneserve.artifact.write_artifact`, which renames a
complete directory into place, so a failure or an interrupt at any point leaves nothing at
``--out``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pruneserve.artifact import POOLINGS
from pruneserve.optimizer.config import PRESETS, PruneConfig, absolute_path, preset
from pruneserve.optimizer.errors import ConfigError, DataError
from pruneserve.optimizer.export import ExportConfig
from pruneserve.optimizer.fusion import FusionConfig
from pruneserve.optimizer.quantize import QuantizeConfig, QuantizeResult
from pruneserve.optimizer.validate import TARGETS, ValidateConfig

if TYPE_CHECKING:
    from pruneserve.artifact import Artifact
    from pruneserve.optimizer.data import Batch
    from pruneserve.optimizer.pruner import PruneResult
    from pruneserve.optimizer.validate import ValidationReport

logger = logging.getLogger(__name__)

#: The fixed quantization of targets this machine cannot measure, when the config says ``auto``
#: (CPU targets measure their candidates instead: see :func:`_select`).
TARGET_QUANTIZATION: dict[str, str] = {"cuda": "fp16", "tensorrt": "static"}
#: Why those targets are not measured: said in the manifest and the report.
_UNMEASURED_TARGET = (
    "target {target}: quantization fixed to {mode} and engine ONNX Runtime with {provider}; nothing on "
    "this build machine can measure {provider}'s speed or numerics, so no candidates or engines were compared"
)
#: Quantization modes that cannot run on a target's execution provider.
_INCOMPATIBLE = {
    ("tensorrt", "dynamic"): "TensorRT has no kernels for dynamic INT8 (MatMulInteger); use static",
    ("cpu", "fp16"): "fp16 runs slower than fp32 on CPUs; use dynamic (or static) INT8 for --target cpu",
}
_SECTIONS = ("export", "fusion", "quantize", "validate")


@dataclass
class OptimizeConfig:
    """Everything ``pruneserve optimize`` does, as one typed, validated, YAML-round-trippable value.

    Attributes:
        out: the artifact directory to create. Paths (``out``, ``model``, ``from_pruned``) are made
            absolute (relative ones: to the current directory), so a saved config reads the same
            from any folder.
        model: a local Hugging Face model folder; ``None`` = the bundled all-MiniLM-L6-v2.
        name: the artifact's model name (default: from the model folder).
        preset: the pruning preset the ``prune`` section started from (for the record).
        target: where the artifact will run: ``cpu``, ``cuda`` or ``tensorrt``.
        quality_floor: the least acceptable final quality (mean cosine to the original for
            embedding models, 1 - accuracy drop for classifiers) when the pruning budget sets
            no floor of its own; a budget floor (``--quality-floor``) takes precedence.
        allow_batch_variance: let ``--quantize auto`` choose a graph (or engine) whose answer for
            a text moves with its batch-mates (dynamic INT8: ~3e-2); by default the artifact
            answers the same alone and batched (issue 9).
        with_reference: ship the unpruned fp32 graph as ``reference.onnx``.
        overwrite: replace an existing ``out``.
        pooling: the embedding's pooling (``mean``, ``cls`` or ``max``); ``None`` = what the model
            folder's sentence-transformers files say, else mean (with a warning).
        normalize: L2-normalise the embedding; ``None`` = as the model folder says, else no.
        from_pruned: a ``pruneserve prune`` output folder to start from: its pruned, recovered
            checkpoint is the student and ``model`` (default: the source its ``pruning.json``
            records) the teacher; score, search, prune and recovery are skipped and the
            checkpoint's pruning record is carried into the artifact.
        prune, export, fusion, quantize, validate: each stage's settings.
    """

    out: str
    model: str | None = None
    name: str | None = None
    preset: str = "default"
    target: str = "cpu"
    quality_floor: float | None = 0.95
    allow_batch_variance: bool = False
    with_reference: bool = False
    overwrite: bool = False
    pooling: str | None = None
    normalize: bool | None = None
    from_pruned: str | None = None
    prune: PruneConfig = field(default_factory=lambda: preset("default"))
    export: ExportConfig = field(default_factory=ExportConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(mode="auto"))
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out is empty; pass --out DIR for the artifact")
        # Absolute, so the optimize.yaml this run saves means the same from any folder.
        self.out = absolute_path(self.out, key="out")
        self.model = None if self.model is None else absolute_path(self.model, key="model")
        self.from_pruned = None if self.from_pruned is None else absolute_path(self.from_pruned, key="from_pruned")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset {self.preset!r} is not one of {', '.join(PRESETS)}", key="preset")
        if self.target not in TARGETS:
            raise ConfigError(f"target {self.target!r} is not one of {', '.join(TARGETS)}", key="target")
        if self.quality_floor is not None and (
            isinstance(self.quality_floor, bool) or not 0.0 < float(self.quality_floor) < 1.0
        ):
            raise ConfigError(f"quality_floor={self.quality_floor!r} must be in (0, 1), e.g. 0.95, or null for none",
                              key="quality_floor")
        if not isinstance(self.allow_batch_variance, bool):
            raise ConfigError(f"allow_batch_variance={self.allow_batch_variance!r} must be true or false")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}; or null for the "
                              "model folder's own", key="pooling")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize={self.normalize!r} must be true, false or null", key="normalize")
        if self.quantize.mode == "auto" and self.target in TARGET_QUANTIZATION:
            self.quantize = dataclasses.replace(self.quantize, mode=TARGET_QUANTIZATION[self.target])
        why = _INCOMPATIBLE.get((self.target, self.quantize.mode))
        if why:
            raise ConfigError(f"--quantize {self.quantize.mode} with --target {self.target}: {why}")

    @property
    def effective_floor(self) -> float | None:
        """The floor the artifact is held to: the budget's when it has one, else ``quality_floor``."""
        budget_floor = self.prune.budget.quality_floor
        return budget_floor if budget_floor is not None else self.quality_floor

    def to_dict(self) -> dict[str, Any]:
        """A YAML/JSON-safe dict that :meth:`from_dict` reads back to an equal config."""
        top = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("prune", *_SECTIONS)}
        sections = {name: _plain(dataclasses.asdict(getattr(self, name))) for name in _SECTIONS}
        return {**top, "prune": self.prune.to_dict(), **sections}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OptimizeConfig:
        """Build from a (YAML) mapping; unknown keys raise :class:`ConfigError` naming them.

        The ``prune`` section overrides the named ``preset`` field by field.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"optimize config must be a mapping, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown optimize config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        values = dict(raw)
        base = preset(values.get("preset", "default"))
        prune_raw = values.pop("prune", None) or {}
        values["prune"] = PruneConfig.from_dict(prune_raw, base=base)
        types = {"export": ExportConfig, "fusion": FusionConfig, "quantize": QuantizeConfig, "validate": ValidateConfig}
        for name, kind in types.items():
            section = values.get(name)
            if section is None:
                values.pop(name, None)
                continue
            if not isinstance(section, dict):
                raise ConfigError(f"optimize config section {name!r} must be a mapping, got {type(section).__name__}")
            fields = {f.name for f in dataclasses.fields(kind)}
            bad = sorted(set(section) - fields)
            if bad:
                raise ConfigError(f"unknown key(s) {', '.join(bad)} in section {name!r}; known keys: {', '.join(sorted(fields))}")
            if name == "quantize" and "mode" not in section:
                section = {**section, "mode": "auto"}
            try:
                values[name] = kind(**section)
            except TypeError as exc:
                raise ConfigError(f"section {name!r}: {exc}") from None
        return cls(**values)

    def to_yaml(self) -> str:
        """The config as YAML (what ``optimize.yaml`` in the artifact holds)."""
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- stage bookkeeping ------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: VmHWM) so each stage reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    # Fallback: the process-wide peak (kilobytes on Linux); not per stage.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass
class StageRecord:
    """Wall time and peak resident memory of one stage."""

    name: str
    seconds: float
    peak_rss_mb: float


class _Stages(list[StageRecord]):
    """Runs ``with stages("name"):`` blocks, logging and recording each."""

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _reset_peak_rss()
        logger.info("stage %s: started", name)
        started = time.perf_counter()
        yield
        record = StageRecord(name, round(time.perf_counter() - started, 2), _peak_rss_mb())
        self.append(record)
        logger.info("stage %s: done in %.1f s (peak RSS %.0f MB)", name, record.seconds, record.peak_rss_mb)


# -- the pipeline -----------------------------------------------------------------------------


@dataclass
class OptimizeResult:
    """The written artifact and what each stage produced."""

    artifact: Artifact
    pruning: PruneResult
    quantization: QuantizeResult
    validation: ValidationReport
    stages: list[StageRecord]
    seconds: float


def _preflight(config: OptimizeConfig) -> None:
    """Fail on what can be checked in milliseconds before minutes of work start."""
    _check_out(config)
    if config.model is not None:
        from pruneserve.optimizer.adapters import check_model_folder  # a file, a pruned checkpoint: what to pass

        check_model_folder(config.model)
    data = config.prune.data.path
    if data is not None and not Path(data).expanduser().is_file():
        raise DataError(f"data file {data} does not exist; pass an existing file to --data")
    from pruneserve.optimizer.static_int8 import check_static_method  # nncf asked for but missing

    check_static_method(config.quantize)


#: Estimated output sizes, as multiples of the source weights: the artifact holds model.onnx (at most
#: fp32, pruned) and, with --with-reference, reference.onnx (the original in fp32); the scratch
#: folder holds pruned.onnx, reference.onnx (baselines), fused.onnx and up to three candidates.
_ARTIFACT_PER_WEIGHTS, _REFERENCE_PER_WEIGHTS, _SCRATCH_PER_WEIGHTS = 1, 1, 4
_SIZE_MARGIN = 16 << 20  # tokenizer, report, figures, YAML


def _check_out(config: OptimizeConfig) -> None:
    """``--out`` is a safe, writable place (:func:`pruneserve.outputs.check_output_dir`) with room for
    the artifact, and the scratch folder has room for the intermediate graphs."""
    from pruneserve.outputs import OutputError, check_free_space, check_output_dir, nearest_existing, weights_bytes

    model = config.model
    if model is None and config.from_pruned is None:
        from pruneserve.optimizer.adapters import default_model_dir

        model = str(default_model_dir())
    weights = max(weights_bytes(p) for p in (model, config.from_pruned) if p is not None)
    artifact = weights * (_ARTIFACT_PER_WEIGHTS + (_REFERENCE_PER_WEIGHTS if config.with_reference else 0))
    scratch = weights * _SCRATCH_PER_WEIGHTS + _SIZE_MARGIN
    scratch_dir = Path(tempfile.gettempdir())
    out = Path(config.out).expanduser().resolve()
    # Both live until the artifact is written: on one file system they need room together.
    try:
        shared = nearest_existing(out).stat().st_dev == scratch_dir.stat().st_dev
    except OSError:  # an unreadable --out: check_output_dir below says so
        shared = False
    try:
        check_output_dir(
            config.out, overwrite=config.overwrite, kind="artifact",
            inputs={"--model": model, "--data": config.prune.data.path, "--from-pruned": config.from_pruned},
            expected_bytes=artifact + _SIZE_MARGIN + (scratch if shared else 0),
        )  # fmt: skip
        if not shared:
            check_free_space(scratch_dir, scratch, what="the optimizer's scratch files (set TMPDIR to move them)",
                             flag="TMPDIR")
    except OutputError as exc:  # a user error like any other: run_optimize raises only OptimizerError for those
        raise ConfigError(str(exc)) from None


def _resolve_from_pruned(config: OptimizeConfig) -> OptimizeConfig:
    """With ``from_pruned``: the teacher (``model``, else the source the checkpoint records) and the
    pruning settings the checkpoint was made with, so the manifest records what was done.

    Only the data section stays the config's (it is what calibration and validation read); the
    others are the checkpoint's, with a warning where the config asked for something else.
    Fails in milliseconds when the folder is no checkpoint or its source model is gone.
    """
    if config.from_pruned is None:
        return config
    from pruneserve.optimizer.adapters import DEFAULT_MODEL_NAME
    from pruneserve.optimizer.checkpoint import read_pruning_document
    from pruneserve.optimizer.errors import CheckpointError

    document = read_pruning_document(config.from_pruned)
    record = document.get("record") or {}
    # Classifiers have no pooling to carry (their spec's fields are unused defaults).
    spec = document.get("spec") or {}
    if spec.get("task") != "embedding":
        spec = {}
    # The student was recovered with its own pooling: the teacher must pool the same way.
    for key, given in (("pooling", config.pooling), ("normalize", config.normalize)):
        if given is not None and spec.get(key) is not None and given != spec.get(key):
            raise CheckpointError(f"--from-pruned {config.from_pruned} was pruned and recovered with {key} "
                                  f"{spec.get(key)!r}, not {given!r}; drop --{key} or prune again with it")
    pooling = config.pooling if config.pooling is not None else spec.get("pooling")
    normalize = config.normalize if config.normalize is not None else spec.get("normalize")
    model = config.model
    source = record.get("source_path")
    if model is None and record.get("source_model") != DEFAULT_MODEL_NAME:
        if not source or not Path(source).is_dir():
            raise CheckpointError(
                f"--from-pruned {config.from_pruned} was pruned from {source or 'a model it does not record'}, which "
                "is not a folder here; pass the original model as --model"
            )
        model = source
    try:
        recorded = PruneConfig.from_dict(record["config"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"--from-pruned {config.from_pruned}: its pruning.json records no pruning config; "
                              "pass the --out folder of `pruneserve prune`") from exc
    except ConfigError as exc:
        raise CheckpointError(f"--from-pruned {config.from_pruned}: its recorded pruning config is invalid: {exc}") from exc
    asked, done = config.prune.to_dict(), recorded.to_dict()
    for name in ("importance", "budget", "recovery"):
        differ = {k: v for k, v in asked[name].items() if done[name].get(k) != v}
        if differ:
            logger.warning("--from-pruned: the checkpoint was made with %s %s; %s from the config is not applied "
                           "(the model is already pruned)", name, {k: done[name].get(k) for k in differ}, differ)
    if config.prune.data != recorded.data:
        logger.warning("--from-pruned: the data settings differ from the checkpoint's (%s); its recorded quality "
                       "before/after recovery was measured on another held-out split", recorded.data)
    prune = PruneConfig(config.prune.data, recorded.importance, recorded.budget, recorded.recovery)
    return dataclasses.replace(config, model=model, prune=prune, pooling=pooling, normalize=normalize)


def _check_resumed_quality(pruned: PruneResult, teacher_eval: list[Any], eval_batches: list[Batch],
                           config: OptimizeConfig) -> None:
    """Measure a ``--from-pruned`` checkpoint against the teacher here and say whether it still
    matches its record (a different data split or teacher shows up as a different figure)."""
    from pruneserve.optimizer.quality import fidelity

    measured = fidelity(pruned.encoder, teacher_eval, eval_batches)
    recorded = pruned.quality.score
    logger.info("prune: from checkpoint %s: quality %s here (recorded after recovery: %.4f)",
                config.from_pruned, measured.describe(), recorded)
    if abs(measured.score - recorded) > 1e-3:
        logger.warning("prune: the checkpoint's quality here (%.4f) differs from its record (%.4f): the data split "
                       "is not the one it was recovered on; the report shows the recorded figures",
                       measured.score, recorded)


def run_optimize(config: OptimizeConfig, progress: bool = True) -> OptimizeResult:
    """Run every stage and write the artifact to ``config.out`` (nothing is written on failure)."""
    from pruneserve.artifact import Manifest, write_artifact
    from pruneserve.optimizer import report, validate
    from pruneserve.optimizer.adapters import load_model
    from pruneserve.optimizer.export import export_onnx
    from pruneserve.optimizer.fusion import fuse
    from pruneserve.optimizer.pruner import load_pruned_result, prepare, run_pruning

    config = _resolve_from_pruned(config)
    _preflight(config)
    started = time.perf_counter()
    stages = _Stages()
    floor = config.effective_floor
    with tempfile.TemporaryDirectory(prefix="pruneserve-optimize-") as scratch:
        work = Path(scratch)

        with stages("load"):  # adapters.py: HF folder -> our Encoder (the teacher)
            loaded = load_model(config.model, pooling=config.pooling, normalize=config.normalize)
            teacher = loaded.encoder
            # checkpoint.py: --from-pruned's student, refused unless pruned from this very teacher.
            resumed = None if config.from_pruned is None else load_pruned_result(config.from_pruned, loaded)

        with stages("data"):  # data.py + quality.py: disjoint scoring/eval splits, teacher outputs (once)
            prepared = prepare(loaded, config.prune.data)
            split, score_batches, eval_batches = prepared.split, prepared.score_batches, prepared.eval_batches
            teacher_eval = prepared.teacher_eval

        with stages("prune"):  # pruner.py: score -> search -> prune -> recover (--from-pruned: done before)
            if resumed is None:
                pruned = run_pruning(loaded, config.prune, progress=progress, prepared=prepared)
            else:
                pruned = resumed
                _check_resumed_quality(pruned, teacher_eval, eval_batches, config)
            student = pruned.encoder

        with stages("export"):  # export.py: fp32 ONNX under the graph contract
            exported = export_onnx(student, work / "pruned.onnx", config.export)
            parity = validate.check_parity(student, exported.path, eval_batches[:4], config.validate.parity_atol)
            reference = None
            if config.with_reference or config.validate.baselines:
                reference = export_onnx(teacher, work / "reference.onnx", config.export).path

        with stages("fuse"):  # fusion.py: ORT transformer optimizer, checked counts
            fused = fuse(exported.path, work / "fused.onnx", student.spec, config.fusion)

        def evaluate(path: Path) -> float:
            return validate.onnx_quality(path, loaded.task, teacher_eval, eval_batches).score

        with stages("quantize"):  # quantize.py / static_int8.py: the candidate graphs (auto: several)
            calibration = calibration_feeds(score_batches, config.quantize.calibration_size)  # once, for all
            built = _build_candidates(
                config, loaded.task, fused.path, exported.path, work, calibration, eval_batches, teacher_eval,
                floor, evaluate,
            )

        with stages("engines"):  # engines.py: quality, invariance, latency per (candidate, engine); the choice
            selection = _select(config, loaded, exported.input_names, built, eval_batches, teacher_eval, floor)
            quantized = selection.quantized
            if quantized.path.name != "model.onnx":  # a candidate's scratch name: ship it under its own
                quantized.path = quantized.path.rename(work / "model.onnx")

        with stages("validate"):  # validate.py: checker, quality per stage, latency, providers
            report_ = _validate(
                config, loaded, pruned, teacher_eval, eval_batches, split.source, parity,
                fused.path, quantized, reference, work,
            )
            report_.latency.update(selection.latency)

        with stages("write"):  # report.py + pruneserve.artifact: atomic, hashed
            manifest = Manifest(
                name=config.name or loaded.name,
                task=loaded.task,
                labels=list(loaded.labels),
                pooling=loaded.pooling,
                normalize=loaded.normalize,
                inputs=list(exported.input_names),
                outputs=[{"name": exported.output_names[0], "dims": [_output_dim(student)]}],
                max_sequence_length=loaded.max_sequence_length,
                reference_file="reference.onnx" if config.with_reference else None,
                batch_invariant=selection.batch_invariant,
                quality_floor=floor,
                runtime={**(selection.runtime or {"engine": "onnxruntime", "providers": report_.providers_requested}),
                         "providers_used_at_build": report_.providers_used},
                engines=selection.engines,
                quantization=quantized.to_manifest(),
                pruning=_pruning_block(pruned),
                fusion={"counts": fused.counts, "expected": fused.expected, "max_abs_diff": fused.max_abs_diff},
                quality=report_.quality_block(),
                latency={"median_ms": report_.latency_block(),
                         "speedup": validate.speedups(report_.latency),
                         "threads": config.validate.threads or os.cpu_count()},
                source={"path": str(loaded.source_dir), "sha256": loaded.source_sha256, "name": loaded.name},
                tool_versions=_tool_versions(),
                config=config.to_dict(),
                target=config.target,
                opset=exported.opset,
                created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            )
            manifest.pruning["stages"] = [dataclasses.asdict(s) for s in stages]
            if config.from_pruned is not None:
                manifest.pruning["from_checkpoint"] = config.from_pruned
            files = report.write_report(
                work / "report", manifest, pruned, quantized, report_, stages,
                head_mask=pruned.plan.to_masks(teacher.spec)[0], floor=floor,
                extra_sizes=_sizes(fused.path, reference),
            )
            loaded.tokenizer.save(str(work / "tokenizer.json"))
            sources: dict[str, Any] = {
                "model.onnx": quantized.path,
                "tokenizer.json": work / "tokenizer.json",
                "optimize.yaml": config.to_yaml().encode(),
                "pruning.json": _json_bytes({**pruned.record(), **(
                    {"from_checkpoint": config.from_pruned} if config.from_pruned is not None else {})}),
                **files,
            }
            if config.with_reference and reference is not None:
                sources["reference.onnx"] = reference
            artifact = write_artifact(config.out, manifest, sources, overwrite=config.overwrite)

    seconds = round(time.perf_counter() - started, 1)
    logger.info("optimize: wrote %s in %.0f s", artifact.path, seconds)
    return OptimizeResult(artifact, pruned, quantized, report_, list(stages), seconds)


def calibration_feeds(batches: list[Any], limit: int) -> list[dict[str, Any]]:
    """Numpy feeds of up to ``limit`` texts from the scoring split, one text per feed: what static
    INT8 is calibrated on (benchmarks calibrate their peers on the same feeds).

    One text per feed: padding then never enters the calibrated ranges, so the static
    scales are those a served (unpadded) request produces.
    """
    feeds: list[dict[str, Any]] = []
    for batch in batches:
        for row in range(batch.size):
            if len(feeds) >= limit:
                return feeds
            length = int(batch.attention_mask[row].sum())
            feeds.append({k: v[row : row + 1, :length].numpy() for k, v in batch.inputs.items()})
    return feeds


def _static_int8(
    unfused: Path, out: Path, calibration: list[dict[str, Any]], eval_batches: list[Any],
    teacher_eval: list[Any], floor: float, settings: QuantizeConfig,
) -> QuantizeResult:
    """Batch-invariant static INT8 through static_int8.py (``settings.static_method``: NNCF first,
    then ONNX Runtime with up to ``max_excluded_nodes`` measured-sensitive MatMuls kept in float;
    ONNX Runtime alone where NNCF is missing): plain calibrated QDQ keeps only ~0.85 cosine on
    MiniLM, this ~0.997. The kept method, the one asked for and any fallback land in the
    manifest's ``quantization.settings`` (and the candidate's details under ``auto``)."""
    from pruneserve.optimizer.static_int8 import StaticInt8Config, quantize_static_int8

    eval_feeds = [{k: v.numpy() for k, v in b.inputs.items()} for b in eval_batches]
    reference = [t.numpy() for t in teacher_eval]
    # quantize.max_excluded_nodes / sensitivity_fallback bound the nodes kept in float here as in
    # quantize.py's fallback, and calibration_method is tried first: one setting for every INT8 mode.
    defaults = StaticInt8Config()
    search = StaticInt8Config(
        max_excluded=settings.max_excluded_nodes if settings.sensitivity_fallback else 0,
        ort_calibrations=(settings.calibration_method,
                          *(c for c in defaults.ort_calibrations if c != settings.calibration_method)),
    )
    s8 = quantize_static_int8(unfused, out, calibration, eval_feeds, reference, floor,
                              method=settings.static_method, config=search)
    return QuantizeResult(
        s8.path, "static", True, True, "unfused",
        calibration_size=len(calibration), quality=s8.fidelity, attempts=list(s8.tried),
        settings={"method": s8.method, "requested_method": s8.requested_method, "fallback": s8.fallback,
                  "batch_invariance": s8.batch_invariance, **s8.settings},
    )


def _build_candidates(
    config: OptimizeConfig,
    task: str,
    fused: Path,
    unfused: Path,
    work: Path,
    calibration: list[dict[str, Any]],
    eval_batches: list[Batch],
    teacher_eval: list[Any],
    floor: float | None,
    evaluate: Any,
) -> dict[str, QuantizeResult | str]:
    """Build the quantized graph of each mode to compare: mode -> result, or the reason it failed.

    ``--quantize auto`` on a CPU target builds ``quantize.candidates`` and never fails here: a
    candidate that cannot be built (or, for static INT8, cannot reach the floor) is recorded and
    the others compete. An explicit mode builds that one graph and its errors propagate as before.
    """
    from pruneserve.optimizer.quantize import quantize

    auto = config.quantize.mode == "auto"
    modes = list(config.quantize.candidates) if auto else [config.quantize.mode]
    built: dict[str, QuantizeResult | str] = {}
    for number, mode in enumerate(modes, 1):
        out = work / (f"candidate-{mode}.onnx" if auto else "model.onnx")
        started = time.perf_counter()
        logger.info("quantize: candidate %s (%d/%d): building", mode, number, len(modes))
        try:
            if mode == "static" and task == "embedding":
                result = _static_int8(unfused, out, calibration, eval_batches, teacher_eval,
                                      floor if floor is not None else 0.0, config.quantize)
            elif auto and mode in ("dynamic", "none"):
                # Measured afterwards on every engine (held-out quality included), so no
                # evaluation here; a dynamic graph under the floor simply loses the comparison
                # instead of paying for the per-node sensitivity search.
                settings = dataclasses.replace(config.quantize, mode=mode, sensitivity_fallback=False)
                result = quantize(fused, unfused, out, settings)
            else:
                result = quantize(fused, unfused, out, dataclasses.replace(config.quantize, mode=mode),
                                  calibration=calibration, evaluate=evaluate, quality_floor=floor)
        except Exception as exc:  # OptimizerError, and the quantizers' many types on odd graphs
            if not auto:
                raise
            built[mode] = f"{type(exc).__name__}: {str(exc)[:400]}"
            logger.warning("quantize: candidate %s could not be built: %s", mode, built[mode])
            continue
        result.settings["build_seconds"] = round(time.perf_counter() - started, 1)
        built[mode] = result
        logger.info("quantize: candidate %s (%d/%d): built in %.0f s", mode, number, len(modes),
                    result.settings["build_seconds"])
    if not any(isinstance(r, QuantizeResult) for r in built.values()):
        from pruneserve.optimizer.errors import QuantizationError

        raise QuantizationError(
            "no quantization candidate could be built: "
            + "; ".join(f"{m}: {why}" for m, why in built.items())
            + ". Pass --quantize none, or report the model folder"
        )
    return built


@dataclass
class Selection:
    """What the engines stage chose and what goes into the manifest."""

    quantized: QuantizeResult
    batch_invariant: bool
    #: ``manifest.engines``: per engine key, the chosen graph's measurements (or error).
    engines: dict[str, Any]
    #: ``manifest.runtime`` without the build's providers (empty: the pipeline's default).
    runtime: dict[str, Any]
    #: extra rows for the latency block (the chosen engine, when it is not ONNX Runtime).
    latency: dict[str, Any]


def _select(
    config: OptimizeConfig,
    loaded: Any,
    input_names: list[str],
    built: dict[str, QuantizeResult | str],
    eval_batches: list[Batch],
    teacher_eval: list[Any],
    floor: float | None,
) -> Selection:
    """Measure every built candidate on every engine available here and keep the fastest pair that
    keeps the artifact's promises (quality floor; batch invariance unless allowed).

    GPU targets are not measured (nothing here runs TensorRT or CUDA): their one graph is kept
    and the manifest says why; its batch invariance is still measured on ONNX Runtime's CPU
    provider where the graph runs there, and is false where it could not be measured.
    """
    from pruneserve.engines.keys import ONNXRUNTIME
    from pruneserve.engines.measure import DEFAULT_INVARIANCE_TOLERANCE
    from pruneserve.optimizer import engines, validate
    from pruneserve.optimizer.errors import ValidationError

    auto = config.quantize.mode == "auto"
    eval_feeds = [{k: v.numpy() for k, v in b.inputs.items()} for b in eval_batches]
    tolerance = DEFAULT_INVARIANCE_TOLERANCE
    ok = {m: r for m, r in built.items() if isinstance(r, QuantizeResult)}
    if config.target != "cpu":
        (mode, result), = ok.items()
        invariance = _ort_invariance(result, eval_feeds)
        provider = validate.TARGET_PROVIDERS[config.target][0]
        why = _UNMEASURED_TARGET.format(target=config.target, mode=mode, provider=provider)
        logger.info("engines: %s", why)
        result.selection = {
            "by": why, "measured": False, "quality_floor": floor,
            "batch_invariance_onnxruntime_cpu": invariance, "invariance_tolerance": tolerance,
        }
        return Selection(result, invariance is not None and invariance <= tolerance, {}, {}, {})

    threads = config.validate.threads or os.cpu_count() or 1
    shapes = validate.latency_shapes(config.validate, loaded.max_sequence_length)
    (b1, s1), (bn, sn) = min(shapes, key=lambda s: s[0] * s[1]), max(shapes, key=lambda s: s[0] * s[1])
    vocab = loaded.encoder.spec.vocab_size
    feeds_b1 = validate.synthetic_inputs(input_names, b1, s1, vocab)
    feeds_bn = validate.synthetic_inputs(input_names, bn, sn, vocab)

    def score(outputs: list[Any]) -> float:
        return validate.compare_outputs(loaded.task, outputs, teacher_eval, eval_batches).score

    logger.info("engines: measuring %d candidate(s) %s on %s (%d threads, %d rounds)", len(ok), list(ok),
                list(engines.available_engines()), threads, config.validate.engine_rounds)
    measured = engines.measure_graphs(
        {mode: r.path for mode, r in ok.items()}, feeds_b1, feeds_bn, [t.numpy() for t in teacher_eval], threads,
        rounds=config.validate.engine_rounds, engines=config.validate.engines,
        invariance_feeds=eval_feeds, fidelity_feeds=eval_feeds, score=score,
    )
    if auto:
        require_invariance = not config.allow_batch_variance
        by = ("auto: the fastest measured (quantization, engine) pair that meets the quality floor"
              + (" and is batch-invariant" if require_invariance else " (batch variance allowed)"))
    else:
        # A forced mode keeps its own promise: engines may not add batch variance to an invariant graph.
        require_invariance = ok[config.quantize.mode].batch_invariant
        by = f"forced by --quantize {config.quantize.mode}; engine: the fastest measured that meets the floor"
    failure = None
    try:
        choice = engines.choose(measured, floor, batch_invariant=require_invariance, invariance_tolerance=tolerance)
    except ValidationError as exc:
        if auto:
            raise
        # The forced graph qualifies on no engine: keep ONNX Runtime, which runs every graph;
        # validation then stops the run naming the floor and the fix if quality is the reason.
        failure = str(exc)
        mode = config.quantize.mode
        choice = engines.Choice(mode, ONNXRUNTIME, "", {mode: {
            k: "no engine qualifies (see selection.error); ONNX Runtime kept" for k in measured[mode]}})
    chosen = ok[choice.graph]
    entry = measured[choice.graph].get(choice.engine, {})
    invariance = entry.get("batch_invariance")
    batch_invariant = invariance is not None and float(invariance) <= tolerance
    ort_quality = measured[choice.graph].get(ONNXRUNTIME, {}).get("fidelity")
    if chosen.quality is None and ort_quality is not None:
        chosen.quality = ort_quality
    candidates: dict[str, Any] = {}
    for mode, result in built.items():
        if isinstance(result, str):
            candidates[mode] = {"chosen": False, "error": result, "why": f"could not be built: {result}"}
            continue
        verdicts = choice.verdicts.get(mode, {})
        candidates[mode] = {
            "chosen": mode == choice.graph,
            "batch_invariant_by_design": result.batch_invariant,
            "build_seconds": result.settings.get("build_seconds"),
            "quality_held_out": measured[mode].get(ONNXRUNTIME, {}).get("fidelity"),
            "details": _candidate_details(result),
            "engines": measured[mode],
            "verdicts": verdicts,
            "why": (verdicts.get(choice.engine, "") if mode == choice.graph
                    else "; ".join(f"{k}: {v}" for k, v in verdicts.items())),
        }
    chosen.selection = {
        "by": by,
        "measured": True,
        "quality_floor": floor,
        "batch_invariance_required": require_invariance,
        "invariance_tolerance": tolerance,
        "latency_key": choice.latency_key,
        "threads": threads,
        "rounds": config.validate.engine_rounds,
        "chosen": {"quantization": choice.graph, "engine": choice.engine},
        "candidates": candidates,
    }
    if failure is not None:
        chosen.selection["error"] = failure
    logger.info("engines: chose %s on %s (%s); batch-invariant: %s", choice.graph, choice.engine,
                candidates[choice.graph]["why"], batch_invariant)
    recommended = (engines.runtime_recommendation(choice.engine, measured[choice.graph])
                   if "engine" in entry else {"engine": ONNXRUNTIME, "providers": ["CPUExecutionProvider"]})
    runtime = {**recommended, "chosen_by": f"{by}; measured on this build machine ({choice.latency_key})"}
    latency: dict[str, Any] = {}
    if choice.engine != ONNXRUNTIME and "error" not in entry:
        medians = {k[len("latency_"):-len("_ms")]: v for k, v in entry.items()
                   if k.startswith("latency_b") and k.endswith("_ms")}
        latency[f"artifact on {choice.engine}"] = validate.Latency(
            str(entry["engine"]), str(entry["precision"]), medians, config.validate.engine_rounds)
    return Selection(chosen, batch_invariant, measured[choice.graph], runtime, latency)


def _candidate_details(result: QuantizeResult) -> dict[str, Any]:
    """The few settings that tell candidates apart (method, source graph, kept-float nodes), and
    for static INT8 the method asked for and why another ran (``fallback``, e.g. NNCF missing)."""
    details: dict[str, Any] = {"source_graph": result.source_graph, "per_channel": result.per_channel}
    for key in ("method", "requested_method", "fallback", "weight_type", "activation_type", "format",
                "batch_invariance"):
        if key in result.settings:
            details[key] = result.settings[key]
    if result.excluded_nodes:
        details["excluded_nodes"] = list(result.excluded_nodes)
    return details


def _ort_invariance(result: QuantizeResult, eval_feeds: list[dict[str, Any]]) -> float | None:
    """Batch invariance of a graph on ONNX Runtime's CPU provider; None where it does not run there."""
    from pruneserve.engines.measure import batch_invariance
    from pruneserve.engines.ort import ort_runner

    if isinstance(result.settings.get("batch_invariance"), float):
        return float(result.settings["batch_invariance"])  # static_int8 measured it already
    try:
        return float(batch_invariance(ort_runner(result.path), eval_feeds))
    except Exception as exc:  # noqa: BLE001 - e.g. fp16 kernels missing on this CPU
        logger.warning("engines: batch invariance of %s not measured on the CPU (%s: %s); the artifact does "
                       "not claim it", result.path.name, type(exc).__name__, str(exc)[:200])
        return None


def _output_dim(encoder: Any) -> int:
    spec = encoder.spec
    return spec.num_labels if spec.task == "classification" else spec.hidden_size


def _pruning_block(pruned: PruneResult) -> dict[str, Any]:
    spec = pruned.encoder.spec
    heads_total = pruned.importance.heads.shape[1]
    return {
        "kept_heads_per_layer": [len(k) for k in pruned.plan.heads],
        "kept_head_indices": pruned.plan.heads,
        "pruned_head_indices": [sorted(set(range(heads_total)) - set(k)) for k in pruned.plan.heads],
        "ffn_sizes_per_layer": [len(k) for k in pruned.plan.ffn],
        "ffn_size_original": int(pruned.importance.ffn.shape[1]),
        "heads_original_per_layer": int(heads_total),
        "params": {"before": pruned.params_before, "after": pruned.params_after},
        "flops": {"seq_len": pruned.flops_seq_len, "before": pruned.flops_before, "after": pruned.flops_after},
        "recovery": [s.to_dict() for s in pruned.recovery],
        "hidden_size": spec.hidden_size,
    }


def _validate(
    config: OptimizeConfig,
    loaded: Any,
    pruned: PruneResult,
    teacher_eval: list[Any],
    eval_batches: list[Any],
    data_source: str,
    parity: float,
    fused: Path,
    quantized: QuantizeResult,
    reference: Path | None,
    work: Path,
) -> ValidationReport:
    """Checks and measurements of the validate stage (see :mod:`validate`)."""
    from pruneserve.optimizer import validate
    from pruneserve.optimizer.fusion import fuse
    from pruneserve.optimizer.quantize import quantize

    final = quantized.path
    for graph in (fused, final):
        validate.check_graph(graph)
    requested, used, warning = validate.providers_used(final, config.target, config.validate.threads)
    warnings = [warning] if warning else []

    quality = {"pruned": pruned.quality_before_recovery}
    if len(pruned.recovery) > 1:
        quality["recovered"] = pruned.quality
    quality["fused"] = validate.onnx_quality(fused, loaded.task, teacher_eval, eval_batches)
    if quantized.mode != "none":
        try:
            quality["quantized"] = validate.onnx_quality(final, loaded.task, teacher_eval, eval_batches)
        except Exception as exc:  # noqa: BLE001 - e.g. fp16 kernels missing on this CPU
            if quantized.mode != "fp16":
                raise
            warnings.append(f"fp16 graph not measured on this machine ({type(exc).__name__}); "
                            "its quality is unverified until run on the target")
            logger.warning("validate: %s", warnings[-1])
    for stage, q in quality.items():
        logger.info("validate: quality %-9s %s", stage, q.describe())
    validate.require_floor(list(quality.values())[-1], config.effective_floor, "final", data_source)

    vocab = loaded.encoder.spec.vocab_size
    max_len = loaded.max_sequence_length
    latency: dict[str, validate.Latency] = {}
    if config.validate.baselines:
        latency["original (PyTorch fp32)"] = validate.torch_latency(loaded.encoder, config.validate, max_sequence_length=max_len)
        latency["pruned (PyTorch fp32)"] = validate.torch_latency(pruned.encoder, config.validate, max_sequence_length=max_len)
        if reference is not None and quantized.mode in ("dynamic", "none"):
            ref_fused = fuse(reference, work / "reference-fused.onnx", loaded.encoder.spec, config.fusion).path
            latency["original fused fp32"] = validate.onnx_latency(ref_fused, config.validate, vocab, max_sequence_length=max_len)
            if quantized.mode == "dynamic":
                ref_q = quantize(ref_fused, reference, work / "reference-int8.onnx",
                                 dataclasses.replace(config.quantize, sensitivity_fallback=False))
                latency["original fused INT8"] = validate.onnx_latency(ref_q.path, config.validate, vocab, max_sequence_length=max_len)
        latency["pruned fused fp32"] = validate.onnx_latency(fused, config.validate, vocab, max_sequence_length=max_len)
    latency["artifact"] = validate.onnx_latency(final, config.validate, vocab, providers=requested, max_sequence_length=max_len)
    return validate.ValidationReport(
        parity_max_abs_diff=parity,
        quality=quality,
        quality_data=data_source,
        quality_examples=pruned.eval_examples,
        quality_floor=config.effective_floor,
        latency=latency,
        providers_requested=requested,
        providers_used=used,
        warnings=warnings,
    )


def _sizes(fused: Path, reference: Path | None) -> dict[str, int]:
    sizes = {"pruned fused fp32 (not shipped)": fused.stat().st_size}
    if reference is not None:
        sizes["original fp32 export (reference.onnx)"] = reference.stat().st_size
    return sizes


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for package in ("pruneserve", "torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def _json_bytes(data: Any) -> bytes:
    import json

    return (json.dumps(data, indent=2) + "\n").encode()


__all__ = ["OptimizeConfig", "OptimizeResult", "Selection", "StageRecord", "calibration_feeds", "run_optimize"]
