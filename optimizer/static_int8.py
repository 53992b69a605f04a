"""Calibrated static INT8 whose answers do not depend on batch composition.

Why static: ONNX Runtime's dynamic INT8 computes each activation's scale over the whole padded
batch at run time, so a text's embedding changes with its batch-mates (measured on MiniLM:
3e-2 max abs difference). Static INT8 fixes every activation scale at calibration time from
the user's own texts; a request's answer is then the same alone or batched, up to float
rounding of the non-quantized parts.

Two producers of the same artifact form (ONNX QDQ: ``QuantizeLinear``/``DequantizeLinear``
pairs around the ``MatMul`` nodes of the **unfused** graph) are compared and the first that
meets the quality floor is kept (``auto``: NNCF first, then ONNX Runtime; where NNCF is not
installed ``auto`` runs ONNX Runtime's alone, says so at WARNING and records why in the
result, so the optimizer without the ``openvino`` extra still builds static INT8):

``nncf``
    NNCF's ONNX backend (``nncf.quantize`` with ``ModelType.TRANSFORMER``): SmoothQuant
    migrates activation outliers into the weights before the ranges are taken, and fast
    bias correction re-centres each quantized layer's output. The ``performance`` preset
    gives symmetric INT8 activations and per-channel symmetric INT8 weights (all zero-points
    0, signed), i.e. S8S8 QDQ that TensorRT accepts as is; ``mixed`` gives asymmetric
    activations (better on some models, not loadable as explicit-quantization by TensorRT).
``ort``
    ONNX Runtime's ``quantize_static`` (QDQ, per-channel symmetric S8S8, weight x activation
    ``MatMul`` only, calibration ``minmax``/``percentile``/``entropy``), then, if the floor is
    missed, the most sensitive nodes (measured: the quality regained by switching that one
    node back to float in the quantized graph) are kept in float, doubling the count until
    the floor is met.

Graph form matters per runtime: ONNX Runtime's CPU provider folds QDQ around plain ``MatMul``
into INT8 kernels, but on a graph already fused into ``Attention``/``SkipLayerNormalization``
contrib ops the QDQ pairs have no INT8 kernel to fold into and run as float; OpenVINO reads
ONNX QDQ directly and runs INT8 convolutions/matmuls from it. Both therefore take the
quantized **unfused** export, never the fused graph.

Entry points: :func:`quantize_static_int8`; :func:`check_static_method` (the optimizer's
preflight: a method that cannot run here fails before any work).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from pruneserve.engines.measure import (
    DEFAULT_INVARIANCE_TOLERANCE,
    Feeds,
    batch_invariance,
    fidelity,
    split_items,
    stack_items,
)
from pruneserve.engines.ort import inference_session, ort_runner, session_runner
from pruneserve.optimizer.errors import ConfigError, QuantizationError

if TYPE_CHECKING:
    from pruneserve.optimizer.quantize import QuantizeConfig

logger = logging.getLogger(__name__)


METHODS: tuple[str, ...] = ("auto", "nncf", "ort")
NNCF_PRESETS: tuple[str, ...] = ("performance", "mixed")
ORT_CALIBRATIONS: tuple[str, ...] = ("minmax", "percentile", "entropy")
#: What brings NNCF (with OpenVINO): said wherever NNCF is missing.
NNCF_INSTALL = "pip install 'pruneserve[openvino]'"


@dataclass(frozen=True)
class StaticInt8Config:
    """How :func:`quantize_static_int8` searches.

    Attributes:
        method: ``auto`` (NNCF first, then ONNX Runtime; ONNX Runtime alone where NNCF is not
            installed), ``nncf`` or ``ort``.
        nncf_presets: NNCF presets to try in order (``performance`` = S8S8 symmetric, TensorRT-ready).
        smooth_quant_alpha: SmoothQuant migration strength for ``MatMul`` (NNCF); None = off.
        fast_bias_correction: NNCF's bias correction after quantizing.
        ort_calibrations: ONNX Runtime calibration methods to try in order.
        max_excluded: most ``MatMul`` nodes the ORT path may keep in float.
        sensitivity_batches: evaluation batches used to rank nodes (the first ones).
        invariance_tolerance: largest alone-vs-batched max abs difference accepted.
        threads: intra-op threads of the measuring sessions.
    """

    method: str = "auto"
    nncf_presets: tuple[str, ...] = ("performance",)
    smooth_quant_alpha: float | None = 0.95
    fast_bias_correction: bool = True
    ort_calibrations: tuple[str, ...] = ("minmax", "percentile")
    max_excluded: int = 8
    sensitivity_batches: int = 2
    invariance_tolerance: float = DEFAULT_INVARIANCE_TOLERANCE
    threads: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"static INT8 method {self.method!r} is not one of {METHODS}; use 'auto'")
        bad = [p for p in self.nncf_presets if p not in NNCF_PRESETS]
        if bad:
            raise ConfigError(f"NNCF presets {bad} are not among {NNCF_PRESETS}; use 'performance'")
        bad = [c for c in self.ort_calibrations if c not in ORT_CALIBRATIONS]
        if bad:
            raise ConfigError(f"ORT calibration methods {bad} are not among {ORT_CALIBRATIONS}; use 'minmax'")
        if self.smooth_quant_alpha is not None and not 0.0 < self.smooth_quant_alpha <= 1.0:
            raise ConfigError(f"smooth_quant_alpha {self.smooth_quant_alpha} must lie in (0, 1], e.g. 0.95, or be None")
        if self.sensitivity_batches < 1:
            raise ConfigError(f"sensitivity_batches {self.sensitivity_batches} must be >= 1, e.g. 2")
        if self.max_excluded < 0:
            raise ConfigError(f"max_excluded {self.max_excluded} must be >= 0, e.g. 8")
        if not self.invariance_tolerance > 0:
            raise ConfigError(f"invariance_tolerance {self.invariance_tolerance} must be > 0, e.g. 1e-4")
        if self.threads < 1:
            raise ConfigError(f"threads {self.threads} must be >= 1")


@dataclass
class Attempt:
    """One tried setting and what it measured."""

    method: str
    settings: dict[str, Any]
    fidelity: float | None = None
    batch_invariance: float | None = None
    seconds: float = 0.0
    passed: bool = False
    error: str | None = None

    def describe(self) -> str:
        """One line for error messages and logs."""
        what = ", ".join(f"{k}={v}" for k, v in self.settings.items() if k not in ("excluded_nodes",))
        if self.error:
            return f"{self.method}({what}): failed: {self.error}"
        return f"{self.method}({what}): fidelity {self.fidelity:.4f}, batch invariance {self.batch_invariance:.1e}"


@dataclass
class StaticInt8Result:
    """The kept static INT8 graph and how it was chosen.

    ``requested_method`` is what was asked for (``auto``, ``nncf``, ``ort``); ``method`` the
    producer of the kept graph; ``fallback`` why that is not NNCF under ``auto`` (NNCF not
    installed, failed, or missed the floor), None when nothing fell back.
    """

    path: Path
    method: str
    fidelity: float
    batch_invariance: float
    settings: dict[str, Any]
    tried: list[dict[str, Any]] = field(default_factory=list)
    requested_method: str = "auto"
    fallback: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The ``manifest.quantization`` record."""
        return {
            "mode": "static",
            "format": "QDQ",
            "method": self.method,
            "requested_method": self.requested_method,
            "fallback": self.fallback,
            "fidelity": self.fidelity,
            "batch_invariance": self.batch_invariance,
            "settings": self.settings,
            "tried": self.tried,
        }


# =========================================================================================
# Which method runs here
# =========================================================================================
def _one_line(exc: BaseException | str, limit: int = 200) -> str:
    """An exception as one short line (import errors can span lines)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def nncf_unavailable(*, load: bool = True) -> str | None:
    """Why NNCF cannot run here, or None when it can.

    ``load=False`` only looks the package up (milliseconds: what the preflight can afford);
    ``load=True`` imports it (seconds), which also catches an NNCF that is installed but
    breaks on import (a version clash), as the build itself would.
    """
    if not load:
        try:
            found = importlib.util.find_spec("nncf") is not None
        except (ImportError, ValueError) as exc:
            return f"{type(exc).__name__}: {_one_line(exc)}"
        return None if found else "No module named 'nncf'"
    try:
        import nncf  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an installed NNCF can fail to import with anything
        return f"{type(exc).__name__}: {_one_line(exc)}"
    return None


def resolve_static_method(method: str, *, load: bool = True) -> tuple[str, str | None]:
    """The method :func:`quantize_static_int8` runs for ``method`` here, and why it is another.

    Returns ``(method to run, fallback)``: ``auto`` stays ``auto`` (NNCF, then ONNX Runtime)
    where NNCF imports and becomes ``ort`` where it does not, with the reason as ``fallback``
    (None when nothing falls back). ``load`` as in :func:`nncf_unavailable`.

    Raises:
        ConfigError: ``method`` is unknown, or is ``nncf`` and NNCF cannot run here (the
            message names the package to install and the flag that avoids it).
    """
    if method not in METHODS:
        raise ConfigError(
            f"static INT8 method {method!r} is not one of {', '.join(METHODS)}; use auto (NNCF where installed, "
            "else ONNX Runtime)"
        )
    if method == "ort":
        return method, None
    why = nncf_unavailable(load=load)
    if why is None:
        return method, None
    if method == "nncf":
        raise ConfigError(
            f"static INT8 method 'nncf' needs the nncf package, which cannot be imported here ({why}); install it "
            f"with {NNCF_INSTALL}, or use ONNX Runtime's quantizer: --int8-method ort (quantize.static_method: ort)",
            key="quantize.static_method",
        )
    return "ort", (
        f"nncf cannot be imported here ({why}), so static INT8 uses ONNX Runtime's static quantizer instead of NNCF; "
        f"{NNCF_INSTALL} adds NNCF (SmoothQuant calibration, usually closer to fp32)"
    )


def check_static_method(quantize: QuantizeConfig) -> None:
    """Preflight (milliseconds): fail before any work when the static INT8 method asked for
    cannot run here; nothing to check when no static INT8 graph will be built.

    Raises:
        ConfigError: as :func:`resolve_static_method`.
    """
    if quantize.mode == "static" or (quantize.mode == "auto" and "static" in quantize.candidates):
        resolve_static_method(quantize.static_method, load=False)


# =========================================================================================
# Producers
# =========================================================================================
def quantize_nncf(
    fp32_path: Path,
    out_path: Path,
    calibration_feeds: Sequence[Feeds],
    *,
    preset: str = "performance",
    smooth_quant_alpha: float | None = 0.95,
    fast_bias_correction: bool = True,
) -> dict[str, Any]:
    """NNCF post-training INT8 (ONNX backend, transformer scheme) of ``fp32_path`` into ``out_path``."""
    try:
        import nncf
    except ImportError as exc:
        raise QuantizationError(
            f"static INT8 method 'nncf' needs the nncf package ({_one_line(exc)}); install it with {NNCF_INSTALL}, "
            "or use ONNX Runtime's quantizer: --int8-method ort (quantize.static_method: ort)"
        ) from None
    model = onnx.load(str(fp32_path))
    inputs = [i.name for i in model.graph.input]
    samples = [{k: np.asarray(f[k]) for k in inputs} for f in calibration_feeds]
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha if smooth_quant_alpha else -1.0),
        disable_bias_correction=not fast_bias_correction,
    )
    with _quiet_nncf():
        quantized = nncf.quantize(
            model,
            nncf.Dataset(samples),
            preset=nncf.QuantizationPreset.PERFORMANCE if preset == "performance" else nncf.QuantizationPreset.MIXED,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(samples),
            fast_bias_correction=True,
            advanced_parameters=advanced,
        )
    onnx.save(quantized, str(out_path))
    return {
        "tool": f"nncf {nncf.__version__}",
        "preset": preset,
        "model_type": "transformer",
        "smooth_quant_alpha": smooth_quant_alpha,
        "fast_bias_correction": fast_bias_correction,
        "calibration_samples": len(samples),
        **_qdq_summary(out_path),
    }


def weight_matmuls(path: Path) -> list[str]:
    """Names of the ``MatMul`` nodes with a constant (initializer) operand: the ones ORT static quantizes."""
    model = onnx.load(str(path), load_external_data=False)
    consts = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i in consts for i in n.input)]


def quantize_ort(
    fp32_path: Path,
    out_path: Path,
    calibration_feeds: Sequence[Feeds],
    *,
    calibration: str = "minmax",
    exclude: Sequence[str] = (),
    include: Sequence[str] | None = None,
    cache: Path | None = None,
) -> dict[str, Any]:
    """ONNX Runtime static S8S8 QDQ (per-channel, symmetric) of the weight ``MatMul`` nodes.

    ``cache`` is a calibration-range file: the first call writes it, later calls (other
    exclusion sets) reuse it instead of calibrating again.
    """
    from pruneserve.optimizer.quantize import quantize_static_qdq

    samples = len(calibration_feeds)
    if calibration != "minmax":
        # The histogram collectors stack every batch's activations into one array, so all
        # batches need one shape: pad to the longest (masked positions add a little to the
        # histogram's tails; percentile/entropy cut tails anyway).
        calibration_feeds = [stack_items(split_items(calibration_feeds))]
    quantize_static_qdq(
        Path(fp32_path), Path(out_path), calibration_feeds,
        per_channel=True, method=calibration, exclude=exclude, include=include, cache=cache,
    )
    import onnxruntime

    return {
        "tool": f"onnxruntime {onnxruntime.__version__}",
        "calibration": calibration,
        "per_channel": True,
        "excluded": len(exclude),
        "excluded_nodes": list(exclude),
        "calibration_samples": samples,
        **_qdq_summary(out_path),
    }


def _qdq_summary(path: Path) -> dict[str, Any]:
    """Whether the QDQ graph is S8S8 symmetric (TensorRT's explicit-quantization form)."""
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    tensors = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            tensors[node.output[0]] = node.attribute[0].t
    signed, zero = True, True
    quantized = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        quantized += node.op_type == "QuantizeLinear"
        if len(node.input) > 2 and node.input[2] in tensors:
            zp = numpy_helper.to_array(tensors[node.input[2]])
            signed &= zp.dtype == np.int8
            zero &= bool(np.all(zp == 0))
    return {"quantized_activations": quantized, "s8s8_symmetric": bool(signed and zero), "tensorrt_compatible": bool(signed and zero)}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantizer logs through the root logger (advice to pre-process, at WARNING); keep it quiet."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF draws progress bars and logs at INFO; keep them to debug logging."""
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf_logger.setLevel(level)


# =========================================================================================
# The search
# =========================================================================================
def _measure(
    attempt: Attempt,
    path: Path,
    eval_feeds: Sequence[Feeds],
    reference_outputs: Sequence[np.ndarray],
    quality_floor: float,
    config: StaticInt8Config,
) -> None:
    run = ort_runner(path, config.threads)
    attempt.fidelity = fidelity(run, eval_feeds, reference_outputs)
    attempt.batch_invariance = batch_invariance(run, eval_feeds)
    attempt.passed = attempt.fidelity >= quality_floor and attempt.batch_invariance <= config.invariance_tolerance
    logger.info("static INT8 %s", attempt.describe())


def _float_source(
    name: str, producers: Mapping[str, onnx.NodeProto], fp32_weights: Mapping[str, onnx.TensorProto]
) -> tuple[str, onnx.TensorProto | None] | None:
    """The float tensor a ``DequantizeLinear`` output stands for: ``(activation name, None)`` or
    ``(weight name, original fp32 initializer)``; None when ``name`` is not a DQ output."""
    dq = producers.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear":
        return q.input[0], None
    weight = dq.input[0].removesuffix("_quantized")
    return (weight, fp32_weights[weight]) if weight in fp32_weights else None


def _without_quantization(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, nodes: Sequence[str] | None
) -> onnx.ModelProto:
    """``qdq`` with the QDQ pairs around ``nodes`` bypassed (all pairs when None), in memory.

    A bypassed node reads its float inputs again (original fp32 weights) and its consumers read
    its float output (ORT also quantizes outputs it can propagate through). Used to rank nodes,
    not to ship: the kept graph is re-quantized with ``nodes_to_exclude``.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    fp32_weights = {i.name: i for i in fp32.graph.initializer}
    replace: dict[str, tuple[str, onnx.TensorProto | None]] = {}
    if nodes is None:
        for n in graph.node:
            if n.op_type == "DequantizeLinear":
                source = _float_source(n.output[0], producers, fp32_weights)
                if source is not None:
                    replace[n.output[0]] = source
    else:
        wanted = set(nodes)
        for node in graph.node:
            if node.name not in wanted:
                continue
            # Only this node's inputs: a DQ output is often shared (q, k and v read one tensor).
            for k, name in enumerate(node.input):
                source = _float_source(name, producers, fp32_weights)
                if source is not None:
                    _rewire(graph, node, k, source)
            for out in node.output:
                for q in consumers.get(out, []):
                    if q.op_type != "QuantizeLinear":
                        continue
                    for dq in consumers.get(q.output[0], []):
                        if dq.op_type == "DequantizeLinear":
                            replace[dq.output[0]] = (out, None)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in replace:
                _rewire(graph, node, k, replace[name])
    return model


def _rewire(graph: onnx.GraphProto, node: onnx.NodeProto, k: int, source: tuple[str, onnx.TensorProto | None]) -> None:
    """Point ``node.input[k]`` at a float tensor, adding the fp32 weight initializer if needed."""
    name, weight = source
    node.input[k] = name
    if weight is not None and all(i.name != name for i in graph.initializer):
        graph.initializer.append(weight)


def _node_sensitivity(
    fp32_path: Path,
    qdq_path: Path,
    eval_feeds: Sequence[Feeds],
    reference_outputs: Sequence[np.ndarray],
    threads: int,
) -> list[tuple[str, float]]:
    """Fidelity gained by keeping each quantized weight ``MatMul`` in float, largest first.

    Measured on the fully quantized graph with one node at a time switched back to float
    (its QDQ pairs bypassed in memory): one session per node, no re-calibration.
    """
    qdq = onnx.load(str(qdq_path))
    fp32 = onnx.load(str(fp32_path))
    base = fidelity(ort_runner(qdq_path, threads), eval_feeds, reference_outputs)
    gains: list[tuple[str, float]] = []
    for name in weight_matmuls(fp32_path):
        # No spinning: one short-lived session per node, none left spinning behind it.
        session = inference_session(
            _without_quantization(qdq, fp32, [name]).SerializeToString(), threads=threads, spinning="off"
        )
        run = session_runner(session)
        gains.append((name, fidelity(run, eval_feeds, reference_outputs) - base))
    return sorted(gains, key=lambda kv: kv[1], reverse=True)


def _exclusion_counts(limit: int) -> list[int]:
    counts, k = [], 1
    while k < limit:
        counts.append(k)
        k *= 2
    return [*counts, limit] if limit else []


def quantize_static_int8(
    fp32_onnx_path: str | Path,
    out_path: str | Path,
    calibration_feeds: Sequence[Feeds],
    eval_feeds: Sequence[Feeds],
    reference_outputs: Sequence[np.ndarray],
    quality_floor: float,
    method: str = "auto",
    config: StaticInt8Config | None = None,
) -> StaticInt8Result:
    """Calibrate a batch-invariant static INT8 QDQ graph that meets ``quality_floor``.

    Args:
        fp32_onnx_path: the **unfused** fp32 export (QDQ on a fused graph runs as float).
        out_path: where the kept graph is written.
        calibration_feeds: batches of the graph's inputs from the user's calibration texts
            (one text per batch calibrates exactly the ranges served texts produce).
        eval_feeds: held-out batches, disjoint from the calibration texts.
        reference_outputs: the fp32 model's first output on each of ``eval_feeds``.
        quality_floor: least mean cosine to the reference accepted.
        method: ``auto`` (NNCF, then ONNX Runtime; ONNX Runtime alone where NNCF cannot be
            imported, logged at WARNING and recorded as the result's ``fallback``), ``nncf``
            or ``ort``.
        config: search settings; ``method`` overrides ``config.method``.

    Returns:
        The first setting, in order of expected speed, that meets the floor and is batch
        invariant (within ``config.invariance_tolerance`` on ONNX Runtime CPU), with every
        tried setting recorded.

    Raises:
        QuantizationError: no setting passed; the message lists what each one measured.
        ConfigError: bad method or settings, or ``nncf`` where NNCF cannot be imported.
    """
    config = StaticInt8Config(**{**asdict(config or StaticInt8Config()), "method": method})
    if not calibration_feeds:
        raise QuantizationError("static INT8 needs calibration texts, but none were given; pass the user's data")
    if not eval_feeds or len(eval_feeds) != len(reference_outputs):
        raise QuantizationError(
            f"static INT8 needs held-out texts with one reference output per batch; got {len(eval_feeds)} "
            f"batches and {len(reference_outputs)} references"
        )
    src, dst = Path(fp32_onnx_path), Path(out_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fused = {n.op_type for n in onnx.load(str(src), load_external_data=False).graph.node} & {
        "Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization"
    }
    if fused:
        raise QuantizationError(
            f"{src.name} is a fused graph ({sorted(fused)}); static QDQ on fused contrib ops runs in float. "
            "Pass the unfused fp32 export"
        )
    run_method, fallback = resolve_static_method(config.method)
    if fallback:
        logger.warning("static INT8: %s", fallback)
    tried: list[Attempt] = []
    best: tuple[Attempt, Path] | None = None
    with tempfile.TemporaryDirectory(prefix="static-int8-") as tmp:
        work = Path(tmp)

        def attempt(method_name: str, produce: Callable[[Path], dict[str, Any]], settings: dict[str, Any]) -> bool:
            nonlocal best
            path = work / f"candidate-{len(tried)}.onnx"
            record = Attempt(method_name, dict(settings))
            tried.append(record)
            start = time.perf_counter()
            try:
                record.settings.update(produce(path))
                _measure(record, path, eval_feeds, reference_outputs, quality_floor, config)
            except QuantizationError:
                raise
            except Exception as exc:  # the quantizers raise many unrelated types on odd graphs
                record.error = f"{type(exc).__name__}: {exc}"
                logger.warning("static INT8 %s", record.describe())
            record.seconds = round(time.perf_counter() - start, 2)
            if record.passed:
                best = (record, path)
            return record.passed

        done = False
        if run_method in ("auto", "nncf"):
            for preset in config.nncf_presets:
                settings = {"preset": preset}
                if attempt(
                    "nncf",
                    lambda p, preset=preset: quantize_nncf(
                        src, p, calibration_feeds, preset=preset,
                        smooth_quant_alpha=config.smooth_quant_alpha,
                        fast_bias_correction=config.fast_bias_correction,
                    ),
                    settings,
                ):
                    done = True
                    break
        if not done and run_method in ("auto", "ort"):
            for calibration in config.ort_calibrations:
                cache = work / f"ranges-{calibration}.json"
                if attempt(
                    "ort",
                    lambda p, c=calibration, cache=cache: quantize_ort(src, p, calibration_feeds, calibration=c, cache=cache),
                    {"calibration": calibration},
                ):
                    done = True
                    break
            measured = [a for a in tried if a.method == "ort" and a.error is None and a.fidelity is not None]
            if not done and config.max_excluded > 0 and measured:
                # Exclude nodes on top of the best calibration tried; its ranges are cached.
                best_ort = max(measured, key=lambda a: a.fidelity or 0.0)
                calibration = str(best_ort.settings["calibration"])
                cache = work / f"ranges-{calibration}.json"
                ranked = _node_sensitivity(
                    src, work / f"candidate-{tried.index(best_ort)}.onnx",
                    eval_feeds[: config.sensitivity_batches], reference_outputs[: config.sensitivity_batches],
                    config.threads,
                )
                logger.info("static INT8: most sensitive nodes %s", ranked[: config.max_excluded])
                for k in _exclusion_counts(min(config.max_excluded, len(ranked))):
                    exclude = [name for name, _ in ranked[:k]]
                    if attempt(
                        "ort",
                        lambda p, ex=exclude: quantize_ort(
                            src, p, calibration_feeds, calibration=calibration, exclude=ex, cache=cache
                        ),
                        {"calibration": calibration, "excluded_by": "sensitivity"},
                    ):
                        break
        if best is None:
            lines = "; ".join(a.describe() for a in tried) or "nothing"
            raise QuantizationError(
                f"no static INT8 setting reached the quality floor {quality_floor} with batch invariance "
                f"<= {config.invariance_tolerance:g}. Tried: {lines}. Lower the floor, calibrate on more of "
                "your own texts, or use dynamic INT8 / fp32"
            )
        record, path = best
        shutil.copyfile(path, dst)
    assert record.fidelity is not None and record.batch_invariance is not None
    if fallback is None and config.method == "auto" and record.method != "nncf":
        # NNCF ran but did not give the kept graph: say what it measured, not only that ORT won.
        fallback = ("NNCF did not give the kept graph (" + "; ".join(a.describe() for a in tried if a.method == "nncf")
                    + "); ONNX Runtime's static quantizer kept instead")
    logger.info("static INT8 kept %s -> %s", record.describe(), dst)
    return StaticInt8Result(
        path=dst,
        method=record.method,
        fidelity=record.fidelity,
        batch_invariance=record.batch_invariance,
        settings=record.settings,
        tried=[asdict(a) for a in tried],
        requested_method=config.method,
        fallback=fallback,
    )


__all__ = [
    "METHODS",
    "NNCF_INSTALL",
    "StaticInt8Config",
    "StaticInt8Result",
    "check_static_method",
    "nncf_unavailable",
    "quantize_nncf",
    "quantize_ort",
    "quantize_static_int8",
    "resolve_static_method",
    "weight_matmuls",
]
