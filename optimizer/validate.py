"""Validation: prove the artifact is a faithful, working, faster copy of the original model.

Checks, each able to fail the run:

* the ONNX checker accepts every graph we ship;
* the fp32 export matches the pruned PyTorch model within ``parity_atol`` (the export is
  exact; any larger difference is a bug, not quantization noise);
* quality against the ORIGINAL model on the held-out evaluation split, for every stage
  (pruned, recovered, fused, quantized), measured the same way (:mod:`quality`);
  the final quality must meet the floor or :class:`ValidationError` is raised.

And measurements for the report and the manifest:

* latency medians at the configured shapes (default batch 1 x 32 tokens and 32 x 128) with
  warm-up, on an ONNX Runtime session set up as ``pruneserve serve`` sets it up: intra-op
  threads spin inside a run and sleep when it ends (idle spinning threads would steal cores
  from the next session measured in the same process);
* the execution providers ONNX Runtime actually used: asking for CUDA where it is missing
  silently falls back to the CPU, so the fallback is recorded and warned about.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from pruneserve.engines.keys import ENGINE_KEYS, ONNXRUNTIME
from pruneserve.engines.measure import cosines
from pruneserve.engines.ort import inference_session
from pruneserve.optimizer.errors import ConfigError, ValidationError
from pruneserve.optimizer.quality import Quality, classifier_quality

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch

    from pruneserve.optimizer.data import Batch
    from pruneserve.optimizer.modeling import Encoder

logger = logging.getLogger(__name__)

#: Execution providers requested per target, best first; ORT falls back along the list.
TARGET_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
TARGETS: tuple[str, ...] = tuple(TARGET_PROVIDERS)


@dataclass
class ValidateConfig:
    """What validation checks and measures.

    Attributes:
        parity_atol: largest max-abs difference accepted between the fp32 ONNX export and
            the pruned PyTorch model.
        latency_shapes: ``[batch, sequence]`` pairs timed on the final artifact.
        warmup: untimed runs per shape before timing; at least one is always made, because a
            session's first run at a shape pays one-time set-up (measured on a tiny model in
            PyTorch: 358 ms against 1 ms for the next), which no median of a few runs hides.
        repeats: timed runs per shape (the median is reported).
        threads: intra-op threads for the timed sessions (0 = ONNX Runtime's default, all cores).
        baselines: also time the original model in PyTorch and the unpruned graph through
            the same fusion and quantization, so the report can state the speed-up.
        engine_rounds: interleaved timing rounds when every engine (and, for ``--quantize
            auto``, every quantization candidate) is measured (``engines.measure_graphs``).
        engines: the engine keys to measure and choose among (default ``None``: every one
            installed here), e.g. ``[openvino-f32]`` for a fleet that serves with OpenVINO only.
    """

    parity_atol: float = 1e-4
    latency_shapes: list[list[int]] = field(default_factory=lambda: [[1, 32], [32, 128]])
    warmup: int = 3
    repeats: int = 10
    threads: int = 0
    baselines: bool = True
    engine_rounds: int = 5
    engines: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.parity_atol > 0:
            raise ConfigError(f"validate.parity_atol={self.parity_atol!r} must be > 0 (1e-4 is the contract)")
        self.latency_shapes = [list(s) for s in self.latency_shapes]
        for shape in self.latency_shapes:
            if len(shape) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
                raise ConfigError(
                    f"validate.latency_shapes entry {shape!r} must be [batch, sequence] positive integers, e.g. [1, 32]"
                )
        if self.engines is not None:
            self.engines = list(self.engines)
            bad = [e for e in self.engines if e not in ENGINE_KEYS]
            if bad or not self.engines:
                raise ConfigError(
                    f"validate.engines {self.engines!r} must be a non-empty list of {list(ENGINE_KEYS)}, "
                    "or null for every engine installed"
                )
        for name, low in (("warmup", 0), ("repeats", 1), ("threads", 0), ("engine_rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"validate.{name}={value!r} must be an integer >= {low}")


@dataclass
class Latency:
    """Median milliseconds per shape key (``b1x32``) for one model on one runtime."""

    runtime: str
    provider: str
    median_ms: dict[str, float]
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_key(batch: int, sequence: int) -> str:
    """The label used for a latency shape in manifests and reports, e.g. ``b32x128``."""
    return f"b{batch}x{sequence}"


# -- sessions ------------------------------------------------------------------------------


def make_session(
    path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0
) -> ort.InferenceSession:
    """An ONNX Runtime session on the first available of ``providers``, spinning as ``serve`` does."""
    return inference_session(path, threads=threads, providers=providers)


def providers_used(
    path: str | Path, target: str, threads: int = 0
) -> tuple[list[str], list[str], str | None]:
    """(requested, actually used, warning or None) for ``target`` on this machine."""
    requested = list(TARGET_PROVIDERS[target])
    session = make_session(path, requested, threads)
    used = list(session.get_providers())
    warning = None
    if used[0] != requested[0]:
        warning = (
            f"target {target!r} asks for {requested[0]}, but ONNX Runtime on this machine runs the model "
            f"on {used[0]} (available: {used}); latency and quality here are CPU figures. Install "
            "onnxruntime-gpu with a matching CUDA/TensorRT to measure on the target"
        )
        logger.warning("validate: %s", warning)
    return requested, used, warning


def _feeds(session: ort.InferenceSession, batch: Batch) -> dict[str, np.ndarray]:
    return {i.name: batch.inputs[i.name].numpy().astype(np.int64) for i in session.get_inputs()}


def onnx_outputs(path: str | Path, batches: Sequence[Batch], threads: int = 0) -> list[np.ndarray]:
    """The graph's first output on each batch (CPU provider)."""
    session = make_session(path, threads=threads)
    return [session.run(None, _feeds(session, b))[0] for b in batches]


# -- checks --------------------------------------------------------------------------------


def check_graph(path: str | Path) -> None:
    """Run the ONNX checker on ``path`` (by path, so large models with external data work)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ValidationError(f"{Path(path).name} fails the ONNX checker: {exc}") from None


def compare_outputs(
    task: str, outputs: Sequence[np.ndarray], teacher: Sequence[torch.Tensor], batches: Sequence[Batch]
) -> Quality:
    """Quality of ``outputs`` against the original model's ``teacher`` outputs, as :mod:`quality` defines it."""
    if len(outputs) != len(teacher) or len(outputs) != len(batches):
        raise ValueError(f"{len(outputs)} outputs, {len(teacher)} teacher outputs and {len(batches)} batches")
    if task == "classification":
        return classifier_quality([
            (out.argmax(-1), ref.numpy().argmax(-1), None if batch.labels is None else batch.labels.numpy())
            for out, ref, batch in zip(outputs, teacher, batches)
        ])
    cos = cosines(list(outputs), [ref.numpy() for ref in teacher])
    if not np.isfinite(cos).all():
        # NaN compares false with every floor; make a broken graph fail loudly instead.
        return Quality(task, int(cos.size), mean_cosine=float("-inf"), min_cosine=float("-inf"))
    return Quality(task, int(cos.size), mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))


def onnx_quality(
    path: str | Path, task: str, teacher: Sequence[torch.Tensor], batches: Sequence[Batch], threads: int = 0
) -> Quality:
    """Quality of the graph at ``path`` against the original model on ``batches``."""
    return compare_outputs(task, onnx_outputs(path, batches, threads), teacher, batches)


def check_parity(encoder: Encoder, path: str | Path, batches: Sequence[Batch], atol: float) -> float:
    """Max abs difference between the fp32 graph and ``encoder``; :class:`ValidationError` above ``atol``."""
    from pruneserve.optimizer.errors import ExportError
    from pruneserve.optimizer.export import check_parity as export_parity

    try:
        return export_parity(encoder, path, [b.inputs for b in batches], atol=atol)
    except ExportError as exc:
        raise ValidationError(
            f"the fp32 ONNX graph does not match the pruned PyTorch model on the evaluation data: {exc}. "
            "This is an export bug: report it with the model folder"
        ) from None


def require_floor(quality: Quality, floor: float | None, stage: str, data_source: str) -> None:
    """Raise :class:`ValidationError` when ``quality`` misses ``floor``."""
    if floor is not None and not quality.score >= floor:
        raise ValidationError(
            f"{stage} quality {quality.score:.4f} ({quality.describe()}) on {quality.examples} held-out "
            f"examples from {data_source} is under the quality floor {floor}; prune less "
            "(--preset light or a smaller --heads), quantize less (--quantize none), or lower --quality-floor"
        )


# -- latency -------------------------------------------------------------------------------


def synthetic_inputs(names: Sequence[str], batch: int, sequence: int, vocab: int) -> dict[str, np.ndarray]:
    """Random token ids (seed 0), full attention: the feeds every latency figure is timed on."""
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(5, max(vocab, 6), size=(batch, sequence), dtype=np.int64),
        "attention_mask": np.ones((batch, sequence), dtype=np.int64),
        "token_type_ids": np.zeros((batch, sequence), dtype=np.int64),
    }
    return {n: feeds[n] for n in names}


def _median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(max(1, warmup)):
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000.0)
    return round(statistics.median(times), 3)


def latency_shapes(config: ValidateConfig, max_sequence_length: int | None) -> list[tuple[int, int]]:
    """``config.latency_shapes`` with each sequence length clamped to what the model accepts.

    A model with fewer positions than a configured shape (say 64 < 128) is timed at its own
    limit rather than fed positions it has no embedding for.
    """
    shapes: list[tuple[int, int]] = []
    for batch, seq in config.latency_shapes:
        shape = (batch, min(seq, max_sequence_length) if max_sequence_length else seq)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def onnx_latency(
    path: str | Path, config: ValidateConfig, vocab_size: int, providers: Sequence[str] = ("CPUExecutionProvider",),
    runtime: str = ONNXRUNTIME, max_sequence_length: int | None = None,
) -> Latency:
    """Median latency of the graph at each of ``config.latency_shapes`` (clamped to the model's length)."""
    session = make_session(path, providers, config.threads)
    names = [i.name for i in session.get_inputs()]
    medians = {}
    for batch, seq in latency_shapes(config, max_sequence_length):
        feeds = synthetic_inputs(names, batch, seq, vocab_size)
        medians[shape_key(batch, seq)] = _median_ms(lambda: session.run(None, feeds), config.warmup, config.repeats)
    return Latency(runtime, session.get_providers()[0], medians, config.repeats)


def torch_latency(
    encoder: Encoder, config: ValidateConfig, runtime: str = "pytorch fp32", max_sequence_length: int | None = None
) -> Latency:
    """Median latency of a PyTorch encoder (eval, no grad) at each of ``config.latency_shapes`` (clamped)."""
    import torch

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if encoder.uses_token_type_ids else [])
    medians = {}
    encoder.eval()
    with torch.inference_mode():
        for batch, seq in latency_shapes(config, max_sequence_length):
            feeds = {k: torch.from_numpy(v) for k, v in
                     synthetic_inputs(names, batch, seq, encoder.spec.vocab_size).items()}
            medians[shape_key(batch, seq)] = _median_ms(lambda: encoder(**feeds), config.warmup, config.repeats)
    return Latency(runtime, "torch-cpu", medians, config.repeats)


# -- the stage -----------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """Everything validation checked and measured (the manifest's quality and latency blocks)."""

    parity_max_abs_diff: float
    quality: dict[str, Quality]
    quality_data: str
    quality_examples: int
    quality_floor: float | None
    latency: dict[str, Latency]
    providers_requested: list[str]
    providers_used: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def final_quality(self) -> Quality:
        """Quality of the artifact's graph (the last stage measured)."""
        return list(self.quality.values())[-1]

    def quality_block(self) -> dict[str, Any]:
        """The manifest's ``quality`` block."""
        return {
            "metric": quality_metric(self.final_quality),
            "data": self.quality_data,
            "evaluated_on": f"{self.quality_examples} held-out examples (not used for scoring, recovery "
            "or calibration)",
            "stages": {k: v.to_dict() for k, v in self.quality.items()},
            "final": self.final_quality.to_dict(),
            "parity_max_abs_diff": self.parity_max_abs_diff,
        }

    def latency_block(self) -> dict[str, Any]:
        """The manifest's ``latency`` block: medians per runtime and shape, in milliseconds."""
        return {k: v.to_dict() for k, v in self.latency.items()}


def quality_metric(quality: Quality) -> str:
    """What :attr:`Quality.score` measures for ``quality``'s task and data, in words."""
    if quality.task == "embedding":
        return "mean cosine to the original model"
    if quality.accuracy is None:
        return "agreement with the original model's predictions (the data has no labels)"
    return "1 - accuracy drop vs the original model, on the data's labels"


#: The latency row of the artifact timed on ONNX Runtime (``pipeline._validate``).
ARTIFACT = "artifact"
#: The prefix of the artifact's row timed on the engine that serves it, when that is not ONNX
#: Runtime (``pipeline._select`` adds ``artifact on openvino-bf16`` from the engines stage).
ARTIFACT_ON = "artifact on "
#: The baseline of the headline: the original model as its users run it today.
ORIGINAL = "original (PyTorch fp32)"
#: A speed-up beyond this (or a slow-down beyond its inverse) is a disturbed measurement, not a
#: property of the artifact: pruning, INT8 and a fused graph together come nowhere near it on
#: an encoder of any size (a tiny 3-layer model, where PyTorch's per-op overhead dominates,
#: measured about 15-25x against PyTorch), while one run slowed by another process or a first call's
#: set-up reads as 100x-2000x.
MAX_CREDIBLE_SPEEDUP = 100.0


def served_row(rows: Iterable[str]) -> str | None:
    """The latency row of the artifact as it is served: timed on its chosen engine
    (``artifact on ENGINE``) when that is not ONNX Runtime, else ``artifact``; None without one."""
    names = list(rows)
    on_engine = [n for n in names if n.startswith(ARTIFACT_ON)]
    if on_engine:
        return on_engine[0]
    return ARTIFACT if ARTIFACT in names else None


def _is_artifact(name: str) -> bool:
    return name == ARTIFACT or name.startswith(ARTIFACT_ON)


def _ratios(
    latency: Mapping[str, Latency], final: str | None
) -> Iterator[tuple[str, str, float | None, float, float]]:
    """(baseline, shape, baseline_ms / artifact_ms or None when either is no measurement, the two ms)."""
    final = final or served_row(latency)
    if final is None or final not in latency:
        return
    for name, lat in latency.items():
        if _is_artifact(name):
            continue  # the artifact on another engine is no baseline (the selection table compares engines)
        for shape, ms in latency[final].median_ms.items():
            base = lat.median_ms.get(shape)
            if base is None:
                continue
            usable = math.isfinite(base) and math.isfinite(ms) and base > 0 and ms > 0
            yield name, shape, (base / ms if usable else None), base, ms


def speedups(latency: Mapping[str, Latency], final: str | None = None) -> dict[str, dict[str, float]]:
    """For each baseline, ``baseline_ms / artifact_ms`` per shape, against the artifact as served
    (``final``, default :func:`served_row`).

    Ratios outside ``[1 / MAX_CREDIBLE_SPEEDUP, MAX_CREDIBLE_SPEEDUP]`` and non-positive or
    non-finite medians are left out (:func:`speedup_outliers` says which and why): a disturbed
    measurement must never read as an 897x speed-up.
    """
    out: dict[str, dict[str, float]] = {}
    for name, shape, ratio, _, _ in _ratios(latency, final):
        row = out.setdefault(name, {})
        if ratio is not None and 1 / MAX_CREDIBLE_SPEEDUP <= ratio <= MAX_CREDIBLE_SPEEDUP:
            row[shape] = round(ratio, 2)
    return out


def speedup_outliers(latency: Mapping[str, Latency], final: str | None = None) -> list[str]:
    """One sentence per speed-up that :func:`speedups` leaves out, naming both medians and the fix."""
    final = final or served_row(latency)
    notes = []
    for name, shape, ratio, base, ms in _ratios(latency, final):
        if ratio is not None and 1 / MAX_CREDIBLE_SPEEDUP <= ratio <= MAX_CREDIBLE_SPEEDUP:
            continue
        if ratio is None:
            what, why = "is not a measurement", "a median that is zero, negative or not a number is no timing"
        else:
            what, why = f"would be {ratio:.3g}x", f"beyond {MAX_CREDIBLE_SPEEDUP:g}x either way one of the two runs was disturbed"
        notes.append(
            f"speed-up of the artifact vs {name} at {shape} {what} ({name} {base:g} ms, {final} {ms:g} ms): "
            f"{why}, so it is not reported; re-run on a quiet machine or raise validate.warmup and validate.repeats"
        )
    return notes
