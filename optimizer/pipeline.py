"""``pruneserve optimize`` end to end: one model folder in, one verified artifact out.

:func:`run_optimize` reads top to bottom as the list of stages::

    load -> data -> prune (score -> search -> prune -> recover) -> export -> fuse -> quantize
         -> validate -> write

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

from pruneserve.optimizer.config import PRESETS, PruneConfig, preset
from pruneserve.optimizer.errors import ConfigError, DataError, ModelLoadError
from pruneserve.optimizer.export import ExportConfig
from pruneserve.optimizer.fusion import FusionConfig
from pruneserve.optimizer.quantize import QuantizeConfig
from pruneserve.optimizer.validate import TARGETS, ValidateConfig

if TYPE_CHECKING:
    from pruneserve.artifact import Artifact
    from pruneserve.optimizer.pruner import PruneResult
    from pruneserve.optimizer.quantize import QuantizeResult
    from pruneserve.optimizer.validate import ValidationReport

logger = logging.getLogger(__name__)

#: The quantization each target runs best with, when the config says ``auto``.
TARGET_QUANTIZATION: dict[str, str] = {"cpu": "dynamic", "cuda": "fp16", "tensorrt": "static"}
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
        out: the artifact directory to create.
        model: a local Hugging Face model folder; ``None`` = the bundled all-MiniLM-L6-v2.
        name: the artifact's model name (default: from the model folder).
        preset: the pruning preset the ``prune`` section started from (for the record).
        target: where the artifact will run: ``cpu``, ``cuda`` or ``tensorrt``.
        quality_floor: the least acceptable final quality (mean cosine to the original for
            embedding models, 1 - accuracy drop for classifiers) when the pruning budget sets
            no floor of its own; a budget floor (``--quality-floor``) takes precedence.
        with_reference: ship the unpruned fp32 graph as ``reference.onnx``.
        overwrite: replace an existing ``out``.
        prune, export, fusion, quantize, validate: each stage's settings.
    """

    out: str
    model: str | None = None
    name: str | None = None
    preset: str = "default"
    target: str = "cpu"
    quality_floor: float | None = 0.95
    with_reference: bool = False
    overwrite: bool = False
    prune: PruneConfig = field(default_factory=lambda: preset("default"))
    export: ExportConfig = field(default_factory=ExportConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    quantize: QuantizeConfig = field(default_factory=lambda: QuantizeConfig(mode="auto"))
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("out is empty; pass --out DIR for the artifact")
        self.out = str(self.out)
        self.model = None if self.model is None else str(self.model)
        if self.preset not in PRESETS:
            raise ConfigError(f"preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.target not in TARGETS:
            raise ConfigError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")
        if self.quality_floor is not None and (
            isinstance(self.quality_floor, bool) or not 0.0 < float(self.quality_floor) < 1.0
        ):
            raise ConfigError(f"quality_floor={self.quality_floor!r} must be in (0, 1), e.g. 0.95, or null for none")
        if self.quantize.mode == "auto":
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
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise ConfigError(f"--out {out} already exists; choose another folder or pass --overwrite")
    if config.model is not None and not Path(config.model).expanduser().is_dir():
        raise ModelLoadError(
            f"model folder {config.model} does not exist; pass a local Hugging Face model folder to --model"
        )
    data = config.prune.data.path
    if data is not None and not Path(data).expanduser().is_file():
        raise DataError(f"data file {data} does not exist; pass an existing file to --data")


def run_optimize(config: OptimizeConfig, progress: bool = True) -> OptimizeResult:
    """Run every stage and write the artifact to ``config.out`` (nothing is written on failure)."""
    from pruneserve.artifact import Manifest, write_artifact
    from pruneserve.optimizer import report, validate
    from pruneserve.optimizer.adapters import load_model
    from pruneserve.optimizer.export import export_onnx
    from pruneserve.optimizer.fusion import fuse
    from pruneserve.optimizer.pruner import prepare_data, run_pruning
    from pruneserve.optimizer.quality import teacher_outputs
    from pruneserve.optimizer.quantize import quantize

    _preflight(config)
    started = time.perf_counter()
    stages = _Stages()
    floor = config.effective_floor
    with tempfile.TemporaryDirectory(prefix="pruneserve-optimize-") as scratch:
        work = Path(scratch)

        with stages("load"):  # adapters.py: HF folder -> our Encoder (the teacher)
            loaded = load_model(config.model)
            teacher = loaded.encoder

        with stages("data"):  # data.py: calibration texts, disjoint scoring/eval splits
            split, score_batches, eval_batches = prepare_data(loaded, config.prune.data)
            teacher_eval = teacher_outputs(teacher, eval_batches)

        with stages("prune"):  # pruner.py: score -> search -> prune -> recover
            pruned = run_pruning(loaded, config.prune, progress=progress)
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

        with stages("quantize"):  # quantize.py: INT8 / fp16 for the target, held to the floor
            calibration = _calibration_feeds(score_batches, config.quantize.calibration_size)
            if config.quantize.mode == "static" and loaded.task == "embedding":
                quantized = _static_int8(exported.path, work / "model.onnx", calibration, eval_batches,
                                         teacher_eval, floor if floor is not None else 0.0)
            else:
                quantized = quantize(
                    fused.path, exported.path, work / "model.onnx", config.quantize,
                    calibration=calibration,
                    evaluate=evaluate,
                    quality_floor=floor,
                )

        with stages("validate"):  # validate.py: checker, quality per stage, latency, providers
            report_ = _validate(
                config, loaded, pruned, teacher_eval, eval_batches, split.source, parity,
                fused.path, quantized, reference, work,
            )

        with stages("write"):  # report.py + pruneserve.artifact: atomic, hashed
            manifest = Manifest(
                name=config.name or loaded.name,
                task=loaded.task,
                labels=list(loaded.labels),
                inputs=list(exported.input_names),
                outputs=[{"name": exported.output_names[0], "dims": [_output_dim(student)]}],
                max_sequence_length=loaded.max_sequence_length,
                reference_file="reference.onnx" if config.with_reference else None,
                batch_invariant=quantized.batch_invariant,
                quality_floor=floor,
                runtime={"engine": "onnxruntime", "providers": report_.providers_requested,
                         "providers_used_at_build": report_.providers_used},
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
                "pruning.json": _json_bytes({"source_model": loaded.name, "source_sha256": loaded.source_sha256,
                                             **pruned.record()}),
                **files,
            }
            if config.with_reference and reference is not None:
                sources["reference.onnx"] = reference
            artifact = write_artifact(config.out, manifest, sources, overwrite=config.overwrite)

    seconds = round(time.perf_counter() - started, 1)
    logger.info("optimize: wrote %s in %.0f s", artifact.path, seconds)
    return OptimizeResult(artifact, pruned, quantized, report_, list(stages), seconds)


def _calibration_feeds(batches: list[Any], limit: int) -> list[dict[str, Any]]:
    """Numpy feeds of up to ``limit`` texts from the scoring split, one text per feed.

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
    teacher_eval: list[Any], floor: float,
) -> QuantizeResult:
    """Batch-invariant static INT8 through static_int8.py (NNCF first, then ONNX Runtime with
    measured exclusions): plain calibrated QDQ keeps only ~0.85 cosine on MiniLM, this ~0.997."""
    from pruneserve.optimizer.quantize import QuantizeResult
    from pruneserve.optimizer.static_int8 import quantize_static_int8

    eval_feeds = [{k: v.numpy() for k, v in b.inputs.items()} for b in eval_batches]
    reference = [t.numpy() for t in teacher_eval]
    s8 = quantize_static_int8(unfused, out, calibration, eval_feeds, reference, floor)
    return QuantizeResult(
        s8.path, "static", True, True, "unfused",
        calibration_size=len(calibration), quality=s8.fidelity, attempts=list(s8.tried),
        settings={"method": s8.method, "batch_invariance": s8.batch_invariance, **s8.settings},
    )


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


__all__ = ["OptimizeConfig", "OptimizeResult", "StageRecord", "run_optimize"]
