"""Quantization: make the exported graph cheaper per token for the chosen target.

Three modes, each chosen for where the artifact will run:

``dynamic`` (CPU)
    INT8 weights with per-output-channel scales, activations quantized at run time
    (``MatMulInteger``). Applied to the *fused* graph: ONNX Runtime's fused ``Attention``
    keeps its INT8 kernels. ``DefaultTensorType`` must be given because the fused
    contrib ops carry no type information the quantizer can read. Per-channel scales
    matter: per-tensor weights cost about 0.03 mean cosine on MiniLM (.961 vs .993).
    Activation scales are computed over the whole padded batch, so a text's answer
    depends slightly on its batch-mates: the result is **not** batch-invariant.
``static`` (TensorRT; runs on the CPU provider too)
    Symmetric S8S8 QDQ with activation ranges calibrated on the user's data. Applied to
    the *unfused* graph: on a fused graph the QDQ pairs land around contrib ops that have
    no quantized kernels and nothing is quantized at run time, while on a graph of plain
    ``MatMul`` nodes both ONNX Runtime and TensorRT fold the pairs into INT8 kernels.
    Fixed scales make it batch-invariant.
``fp16`` (CUDA)
    ONNX Runtime's float16 converter on the fused graph, keeping numerically sensitive
    ops (normalisations, Softmax, reductions) in fp32 and the graph's inputs/outputs in
    their original types.

When a quantized graph misses the quality floor, :func:`quantize` measures each node's
sensitivity (the quality with only that node quantized) and keeps the most sensitive
nodes in float until the floor is met, or raises :class:`QuantizationError` saying what
it tried.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from pruneserve.optimizer.errors import ConfigError, QuantizationError
from pruneserve.optimizer.static_int8 import METHODS as STATIC_METHODS

logger = logging.getLogger(__name__)

#: ``auto``: on a CPU target the pipeline builds :data:`AUTO_CANDIDATES` and keeps the fastest
#: one (on the fastest engine) that meets the quality floor and batch invariance; on GPU
#: targets it is resolved from the target before quantizing.
QUANT_MODES: tuple[str, ...] = ("auto", "dynamic", "static", "fp16", "none")
#: What ``auto`` compares on CPU targets, by default.
AUTO_CANDIDATES: tuple[str, ...] = ("dynamic", "static", "none")
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")

#: Ops the fp16 converter leaves in fp32: normalisations and Softmax lose too much
#: precision in half, and reductions/exponentials overflow its range.
FP16_KEEP_FP32_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Erf",
    "Exp",
    "Div",
)

#: Node types whose weights each mode quantizes. Embedding gathers are left alone: they
#: cost no arithmetic, and their error reaches every layer.
_DYNAMIC_OPS: tuple[str, ...] = ("MatMul", "Attention")
_STATIC_OPS: tuple[str, ...] = ("MatMul",)

Batch = Mapping[str, np.ndarray]
#: Scores an ONNX file: higher is better, on the same scale as the quality floor.
Evaluator = Callable[[Path], float]


@dataclass
class QuantizeConfig:
    """How to quantize the exported graph.

    Attributes:
        mode: ``dynamic`` (CPU INT8), ``static`` (calibrated S8S8 QDQ, for TensorRT),
            ``fp16`` (CUDA), ``none``, or ``auto`` (CPU: measured, see ``candidates``; GPU
            targets: fixed by the target).
        candidates: the modes ``auto`` builds and measures on a CPU target.
        per_channel: one weight scale per output channel instead of per tensor.
        calibration_size: texts used to calibrate activation ranges (``static`` only).
        calibration_method: how ranges are taken from the calibration activations (static
            INT8 of embedding models: the ONNX Runtime calibration tried first).
        static_method: who builds static INT8 of embedding models (static_int8.py): ``auto``
            (NNCF, then ONNX Runtime's static quantizer; ONNX Runtime's alone where NNCF is
            not installed, said in the log and the manifest), ``nncf`` (fails before any work
            where NNCF is missing) or ``ort``. CLI: ``--int8-method``.
        sensitivity_fallback: when the quality floor is missed, keep the most sensitive
            nodes in float instead of failing at once (static INT8 of embedding models too,
            through static_int8.py's ONNX Runtime search).
        max_excluded_nodes: the most nodes the fallback may keep in float.
        keep_fp32_ops: op types the fp16 converter leaves in fp32.
    """

    mode: str = "dynamic"
    candidates: list[str] = field(default_factory=lambda: list(AUTO_CANDIDATES))
    per_channel: bool = True
    calibration_size: int = 256
    calibration_method: str = "minmax"
    static_method: str = "auto"
    sensitivity_fallback: bool = True
    max_excluded_nodes: int = 8
    keep_fp32_ops: list[str] = field(default_factory=lambda: list(FP16_KEEP_FP32_OPS))

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise ConfigError(f"quantize mode {self.mode!r} is not one of {QUANT_MODES}")
        self.candidates = list(self.candidates)
        bad = [c for c in self.candidates if c not in AUTO_CANDIDATES]
        if bad or not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(
                f"quantize.candidates {self.candidates!r} must be distinct modes among {list(AUTO_CANDIDATES)}, "
                "e.g. [dynamic, static, none]"
            )
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration_method {self.calibration_method!r} is not one of {CALIBRATION_METHODS}"
            )
        if self.static_method not in STATIC_METHODS:
            raise ConfigError(
                f"quantize.static_method={self.static_method!r} is not one of {', '.join(STATIC_METHODS)}; "
                "use auto (NNCF where installed, else ONNX Runtime's static quantizer)",
                key="quantize.static_method",
            )
        if not isinstance(self.calibration_size, int) or self.calibration_size < 1:
            raise ConfigError(
                f"calibration_size {self.calibration_size!r} must be a positive integer "
                "(a few hundred texts from your own traffic is typical)"
            )
        if not isinstance(self.max_excluded_nodes, int) or self.max_excluded_nodes < 0:
            raise ConfigError(f"max_excluded_nodes {self.max_excluded_nodes!r} must be an integer >= 0")
        self.keep_fp32_ops = list(self.keep_fp32_ops)

    @property
    def batch_invariant(self) -> bool:
        """Whether an answer is independent of its batch-mates under this mode (``auto``: not
        known until measured, so False)."""
        return self.mode not in ("dynamic", "auto")


@dataclass
class QuantizeResult:
    """The quantized graph and everything the manifest records about how it was made."""

    path: Path
    mode: str
    per_channel: bool
    batch_invariant: bool
    source_graph: str
    excluded_nodes: list[str] = field(default_factory=list)
    calibration_size: int | None = None
    quality: float | None = None
    #: node name -> quality with only that node quantized (filled only by the fallback).
    sensitivity: dict[str, float] = field(default_factory=dict)
    #: every setting tried, in order, with its measured quality.
    attempts: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    #: how this mode was chosen: every candidate considered, its numbers and the verdict (pipeline).
    selection: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self) -> dict[str, Any]:
        """The ``quantization`` block of the manifest (JSON-serialisable)."""
        data = asdict(self)
        data["path"] = self.path.name
        return data


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Silence ONNX Runtime's quantizer, which logs one INFO line per tensor on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


# -- the three converters -----------------------------------------------------------------


def quantize_dynamic_int8(
    src: Path, dst: Path, *, per_channel: bool = True, exclude: Sequence[str] = (),
    include: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Dynamic INT8 (signed weights, per-channel by default) of a fused graph; returns settings."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    settings: dict[str, Any] = {
        "weight_type": "QInt8",
        "activation_type": "QUInt8 (dynamic)",
        "op_types": list(_DYNAMIC_OPS),
        "format": "QOperator",
    }
    with _quiet_root_logger():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(_DYNAMIC_OPS),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(include) if include is not None else None,
            nodes_to_exclude=list(exclude),
            # Fused contrib ops (Attention, SkipLayerNormalization) have no type information
            # the quantizer can infer; without a default it refuses to quantize around them.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return settings


class _BatchReader:
    """ONNX Runtime's CalibrationDataReader protocol over prepared input batches."""

    def __init__(self, batches: Sequence[Batch], input_names: Sequence[str]) -> None:
        self._batches = [{k: np.asarray(b[k]) for k in input_names} for b in batches]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def quantize_static_qdq(
    src: Path,
    dst: Path,
    calibration: Sequence[Batch],
    *,
    per_channel: bool = True,
    method: str = "minmax",
    exclude: Sequence[str] = (),
    include: Sequence[str] | None = None,
    cache: Path | None = None,
    percentile: float = 99.999,
) -> dict[str, Any]:
    """Static symmetric S8S8 QDQ of an unfused graph, calibrated on ``calibration``.

    The one ONNX Runtime static-quantization call of the optimizer (static_int8.py uses it
    too). ``cache`` is a JSON file of calibrated tensor ranges: written by the first call and
    read by later ones, so the sensitivity search calibrates once instead of per node.
    ``percentile`` applies to ``method="percentile"`` only.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration and not (cache is not None and cache.is_file()):
        raise QuantizationError("static quantization needs calibration data, but none was given")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    inputs = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    with _quiet_root_logger():
        quantize_static(
            str(src),
            str(dst),
            _BatchReader(calibration, inputs),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(_STATIC_OPS),
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(include) if include is not None else None,
            nodes_to_exclude=list(exclude),
            calibrate_method=methods[method],
            extra_options={
                # TensorRT reads only symmetric (zero-point 0) INT8.
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # Only weight x activation products: quantizing the attention scores
                # (activation x activation) costs quality for little speed.
                "MatMulConstBOnly": True,
                "CalibTensorRangeSymmetric": True,
                "CalibPercentile": percentile,
            },
            calibration_cache_path=cache,
        )
    return {
        "weight_type": "QInt8",
        "activation_type": "QInt8",
        "symmetric": True,
        "format": "QDQ",
        "op_types": list(_STATIC_OPS),
        "calibration_method": method,
        "calibration_batches": len(calibration),
    }


def convert_fp16(src: Path, dst: Path, *, keep_fp32_ops: Sequence[str] = FP16_KEEP_FP32_OPS) -> dict[str, Any]:
    """Convert a graph to fp16, keeping ``keep_fp32_ops`` and the graph's I/O types in fp32.

    Goes through ONNX Runtime's ``OnnxModel`` wrapper because it runs symbolic shape inference
    first: without the types of the fused contrib ops' outputs, the converter cannot place the
    Casts between kept-fp32 and fp16 nodes and the graph fails to load (``Attention`` bound to
    both float and float16).
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    with _quiet_root_logger():
        model.convert_float_to_float16(
            use_symbolic_shape_infer=True, keep_io_types=True, op_block_list=list(keep_fp32_ops)
        )
    model.save_model_to_file(str(dst))
    return {"weight_type": "float16", "kept_fp32_ops": list(keep_fp32_ops), "keep_io_types": True}


# -- orchestration ----------------------------------------------------------------------------


def quantizable_nodes(path: Path, mode: str) -> list[str]:
    """Names of the nodes ``mode`` would quantize: those of its op types with a constant weight."""
    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    ops = _DYNAMIC_OPS if mode == "dynamic" else _STATIC_OPS
    names = []
    for node in model.graph.node:
        if node.op_type in ops and len(node.input) > 1 and node.input[1] in constants:
            names.append(node.name)
    if any(not n for n in names):
        raise QuantizationError(
            f"{path.name} has unnamed nodes; sensitivity analysis needs node names (re-export the model)"
        )
    return names


def _exclusion_schedule(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit`` (always ending at ``limit``)."""
    steps, k = [], 1
    while k < limit:
        steps.append(k)
        k *= 2
    if limit > 0:
        steps.append(limit)
    return steps


def quantize(
    fused: Path,
    unfused: Path,
    out: Path,
    config: QuantizeConfig,
    *,
    calibration: Sequence[Batch] = (),
    evaluate: Evaluator | None = None,
    quality_floor: float | None = None,
) -> QuantizeResult:
    """Quantize for ``config.mode`` and meet ``quality_floor`` if one is given.

    Args:
        fused: the graph after ONNX Runtime's transformer fusion (dynamic, fp16 and none).
        unfused: the plain exported graph (static QDQ).
        out: where the quantized graph is written.
        config: the mode and its settings.
        calibration: input batches for static calibration (already capped at
            ``config.calibration_size`` texts by the caller).
        evaluate: scores a graph against the original model; ``None`` skips the floor check
            (fp16 graphs run on the CPU provider too, only slowly).
        quality_floor: the lowest acceptable score from ``evaluate``.

    Raises:
        QuantizationError: the floor was missed with every setting tried.
    """
    mode = config.mode
    if mode == "auto":
        raise ConfigError("quantize mode 'auto' must be resolved from the target before quantizing")
    out.parent.mkdir(parents=True, exist_ok=True)
    if mode == "none":
        out.write_bytes(Path(fused).read_bytes())
        quality = evaluate(out) if evaluate is not None else None
        return QuantizeResult(out, mode, False, True, "fused", quality=quality,
                              settings={"weight_type": "float32"})
    if mode == "fp16":
        settings = convert_fp16(fused, out, keep_fp32_ops=config.keep_fp32_ops)
        quality = evaluate(out) if evaluate is not None else None
        result = QuantizeResult(out, mode, False, True, "fused", quality=quality, settings=settings)
        _check_floor_no_fallback(result, quality_floor)
        return result

    src = Path(fused) if mode == "dynamic" else Path(unfused)
    with tempfile.TemporaryDirectory(prefix="pruneserve-quant-") as tmp:
        cache = Path(tmp) / "calibration.json"

        def apply(dst: Path, exclude: Sequence[str] = (), include: Sequence[str] | None = None) -> dict[str, Any]:
            if mode == "dynamic":
                return quantize_dynamic_int8(
                    src, dst, per_channel=config.per_channel, exclude=exclude, include=include
                )
            return quantize_static_qdq(
                src, dst, calibration, per_channel=config.per_channel, method=config.calibration_method,
                exclude=exclude, include=include, cache=cache,
            )

        result = _quantize_to_floor(src, out, Path(tmp) / "probe.onnx", config, apply, evaluate, quality_floor)
    if mode == "static":
        result.calibration_size = sum(len(next(iter(b.values()))) for b in calibration)
    return result


Apply = Callable[..., dict[str, Any]]


def _quantize_to_floor(
    src: Path,
    out: Path,
    probe: Path,
    config: QuantizeConfig,
    apply: Apply,
    evaluate: Evaluator | None,
    quality_floor: float | None,
) -> QuantizeResult:
    """Quantize everything; if that misses the floor, keep the most sensitive nodes in float."""
    mode = config.mode
    result = QuantizeResult(
        out, mode, config.per_channel, config.batch_invariant,
        "fused" if mode == "dynamic" else "unfused", settings=apply(out),
    )
    if evaluate is None:
        return result
    result.quality = evaluate(out)
    result.attempts.append({"excluded": [], "quality": result.quality})
    logger.info("quantize: %s per_channel=%s -> quality %.4f", mode, config.per_channel, result.quality)
    if quality_floor is None or result.quality >= quality_floor:
        return result
    if not config.sensitivity_fallback or config.max_excluded_nodes == 0:
        raise QuantizationError(
            f"{mode} INT8 quality {result.quality:.4f} is under the floor {quality_floor} and the "
            "sensitivity fallback is off; enable it (quantize.sensitivity_fallback), lower "
            "--quality-floor, prune less, or use --quantize none"
        )

    candidates = quantizable_nodes(src, mode)
    logger.warning(
        "quantize: quality %.4f < floor %s; measuring the sensitivity of %d nodes",
        result.quality, quality_floor, len(candidates),
    )
    for name in candidates:
        apply(probe, include=[name])
        result.sensitivity[name] = evaluate(probe)
        logger.debug("quantize: only %s quantized -> %.4f", name, result.sensitivity[name])
    ranked = sorted(candidates, key=lambda n: result.sensitivity[n])
    limit = min(config.max_excluded_nodes, len(ranked))
    for k in _exclusion_schedule(limit):
        excluded = ranked[:k]
        result.settings = apply(out, exclude=excluded)
        quality = evaluate(out)
        result.attempts.append({"excluded": list(excluded), "quality": quality})
        logger.info("quantize: keeping the %d most sensitive nodes in float -> quality %.4f", k, quality)
        if quality >= quality_floor:
            result.excluded_nodes, result.quality = list(excluded), quality
            return result
    best = max(result.attempts, key=lambda a: a["quality"])
    out.unlink(missing_ok=True)
    raise QuantizationError(
        f"{mode} INT8 could not reach the quality floor {quality_floor}: all nodes quantized gave "
        f"{result.attempts[0]['quality']:.4f}; keeping up to {limit} of the {len(ranked)} most sensitive "
        f"nodes in float gave at best {best['quality']:.4f} (kept {best['excluded']}). Lower "
        "--quality-floor, prune less (--preset light), raise quantize.max_excluded_nodes, or use "
        "--quantize none"
    )


def _check_floor_no_fallback(result: QuantizeResult, floor: float | None) -> None:
    if floor is not None and result.quality is not None and result.quality < floor:
        raise QuantizationError(
            f"{result.mode} quality {result.quality:.4f} is under the floor {floor}; "
            "lower --quality-floor or use --quantize none"
        )
