"""Fuse an exported encoder with ONNX Runtime's transformer optimizer, and prove it fused.

ONNX Runtime's optimizer (``onnxruntime.transformers.optimizer.optimize_model``, model type
``bert``) rewrites the eager graph into EmbedLayerNormalization, Attention,
SkipLayerNormalization and (Bias)Gelu kernels. It reports nothing when a pattern does not
match, and it *silently fuses wrongly* if told a head count that is not the graph's, so:

* ``num_heads=0, hidden_size=0``: the optimizer reads each layer's head count from the
  explicit Reshape constants our :class:`~pruneserve.optimizer.modeling.Encoder` exports;
* the fused op counts are checked against the model's structure (:func:`expected_fusions`)
  and a shortfall raises :class:`FusionError` naming what was expected and what was found;
* the fused graph's outputs are compared with the unfused graph's on random inputs.

ONNX Runtime's own fusion log lines are re-emitted at DEBUG under this module's logger (they
explain *why* a pattern did not match); the counts are logged at INFO.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from pruneserve.engines.ort import inference_session
from pruneserve.optimizer.errors import ConfigError, FusionError
from pruneserve.optimizer.modeling import EncoderSpec

__all__ = ["FusionConfig", "FusionResult", "check_fusions", "expected_fusions", "fuse"]

logger = logging.getLogger(__name__)

#: Op types counted in a fused graph (ONNX Runtime contrib ops plus the leftovers we check).
COUNTED_OPS = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "GemmFastGelu",
    "Softmax",
    "MatMul",
)
_GELU_OPS = ("BiasGelu", "FastGelu", "Gelu", "GemmFastGelu")
#: Loggers of onnxruntime/transformers, which imports its modules under their bare names.
_ORT_LOGGER_PREFIXES = ("fusion_", "onnx_model", "optimizer", "onnxruntime.transformers")


@dataclass
class FusionConfig:
    """Settings of the fusion stage.

    ``opt_level`` 0 runs only the Python fusions (ONNX Runtime's own graph optimisations run
    when a session loads the model). ``require_embed_layer_norm``: treat an unfused embedding
    block as an error. ``verify``: compare the fused and unfused graphs on ``verify_batches``
    random padded batches of up to ``verify_sequence_length`` tokens, within ``atol``.
    """

    opt_level: int = 0
    use_gpu: bool = False
    require_embed_layer_norm: bool = True
    verify: bool = True
    atol: float = 1e-4
    verify_batches: int = 2
    verify_batch_size: int = 4
    verify_sequence_length: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if self.opt_level not in (0, 1, 2, 99):
            raise ConfigError(f"opt_level {self.opt_level} is invalid; use 0 (recommended), 1, 2 or 99")
        if not self.atol > 0:
            raise ConfigError(f"atol must be positive, got {self.atol}")
        for name in ("verify_batches", "verify_batch_size", "verify_sequence_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class FusionResult:
    """The fused graph, the count of each op type in it, and the fused-vs-unfused difference."""

    path: Path
    counts: dict[str, int]
    expected: dict[str, int]
    max_abs_diff: float | None = None


def expected_fusions(spec: EncoderSpec, config: FusionConfig | None = None) -> dict[str, int]:
    """The fused-op counts this model's structure requires.

    * ``Attention``: one per layer that keeps at least one head; no ``Softmax`` left over;
    * ``SkipLayerNormalization``: one per residual LayerNorm whose branch still computes
      (an emptied attention/FFN block adds only a constant bias, which stays a plain
      Add + LayerNormalization);
    * ``Gelu (any)``: one per layer that keeps FFN neurons, for GELU activations;
    * ``EmbedLayerNormalization``: one (unless ``require_embed_layer_norm`` is off).
    """
    config = config or FusionConfig()
    attn_layers = sum(1 for h in spec.heads if h > 0)
    ffn_layers = sum(1 for f in spec.ffn if f > 0)
    expected = {
        "Attention": attn_layers,
        "SkipLayerNormalization": attn_layers + ffn_layers,
        "Softmax": 0,
    }
    if spec.hidden_act.startswith("gelu"):
        expected["Gelu (any)"] = ffn_layers
    if config.require_embed_layer_norm:
        expected["EmbedLayerNormalization"] = 1
    return expected


def check_fusions(spec: EncoderSpec, counts: dict[str, int], config: FusionConfig | None = None) -> dict[str, int]:
    """Raise :class:`FusionError` unless ``counts`` meet :func:`expected_fusions`; return the expectation."""
    expected = expected_fusions(spec, config)
    found = dict(counts)
    found["Gelu (any)"] = sum(counts.get(op, 0) for op in _GELU_OPS)
    problems = [
        f"{op}: expected {want}, found {found.get(op, 0)}"
        for op, want in expected.items()
        if found.get(op, 0) != want
    ]
    if problems:
        raise FusionError(
            "ONNX Runtime's transformer optimizer did not fuse the graph as the model's structure requires ("
            + "; ".join(problems)
            + f"; heads per layer {spec.heads}, FFN per layer {spec.ffn}). The unfused graph would run, but slowly; "
            "re-export with pruneserve's Encoder (explicit per-layer head counts, TorchScript exporter) and "
            "run with --log-level DEBUG to see why a pattern did not match"
        )
    return expected


class _ForwardToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger.debug("onnxruntime %s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def _ort_logs_at_debug() -> Iterator[None]:
    """Route onnxruntime.transformers' own log lines to our logger at DEBUG while fusing.

    Its warnings (for example "Input hidden size (16) is not same as weight matrix dimension
    of q,k,v (32)" for every pruned layer) are expected for pruned models and would mislead
    a user at WARNING level; the counts checks above are what decide success.
    """
    handler = _ForwardToDebug()
    saved: list[tuple[logging.Logger, bool, int]] = []
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(_ORT_LOGGER_PREFIXES):
            log = logging.getLogger(name)
            saved.append((log, log.propagate, log.level))
            log.propagate = False
            log.setLevel(logging.DEBUG)
            log.addHandler(handler)
    try:
        yield
    finally:
        for log, propagate, level in saved:
            log.removeHandler(handler)
            log.propagate = propagate
            log.setLevel(level)


def _random_batches(spec: EncoderSpec, input_names: list[str], config: FusionConfig) -> list[dict[str, np.ndarray]]:
    """Right-padded random batches (the padding the tokenizer produces and the fused kernels assume)."""
    rng = np.random.default_rng(config.seed)
    max_len = min(config.verify_sequence_length, spec.max_position_embeddings - spec.position_offset)
    batches = []
    for _ in range(config.verify_batches):
        b = config.verify_batch_size
        lengths = rng.integers(1, max_len + 1, size=b)
        lengths[0] = max_len
        ids = rng.integers(0, spec.vocab_size, size=(b, max_len), dtype=np.int64)
        ids[ids == spec.pad_token_id] = (spec.pad_token_id + 1) % spec.vocab_size
        mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int64)
        ids[mask == 0] = spec.pad_token_id
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in input_names:
            types = (np.arange(max_len)[None, :] >= (lengths[:, None] // 2)).astype(np.int64) * mask
            feeds["token_type_ids"] = types if spec.type_vocab_size > 1 else np.zeros_like(ids)
        batches.append({n: feeds[n] for n in input_names})
    return batches


def _max_diff(reference: Path, candidate: Path, spec: EncoderSpec, config: FusionConfig) -> float:
    ref = inference_session(reference, threads=1, spinning="off")
    cand = inference_session(candidate, threads=1, spinning="off")
    names = [i.name for i in ref.get_inputs()]
    cand_names = [i.name for i in cand.get_inputs()]
    if names != cand_names:
        raise FusionError(f"the fused graph's inputs {cand_names} differ from the unfused graph's {names}")
    worst = 0.0
    for feeds in _random_batches(spec, names, config):
        a = ref.run(None, feeds)[0]
        b = cand.run(None, feeds)[0]
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def fuse(onnx_in: str | Path, onnx_out: str | Path, spec: EncoderSpec, config: FusionConfig | None = None) -> FusionResult:
    """Fuse ``onnx_in`` into ``onnx_out``; raise :class:`FusionError` if the fusion is incomplete or wrong."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    config = config or FusionConfig()
    src, dst = Path(onnx_in), Path(onnx_out)
    if not src.is_file():
        raise FusionError(f"{src} does not exist; export the model first")
    options = FusionOptions("bert")
    with _ort_logs_at_debug():
        try:
            # num_heads/hidden_size 0: read every layer's own head count from its Reshape constants.
            # Forcing the original head count on a pruned graph "fuses" it wrongly without a word.
            model = optimize_model(
                str(src), model_type="bert", num_heads=0, hidden_size=0, optimization_options=options,
                opt_level=config.opt_level, use_gpu=config.use_gpu,
            )
        except Exception as exc:  # the optimizer raises arbitrary types on odd graphs
            raise FusionError(f"ONNX Runtime's transformer optimizer failed on {src}: {exc}") from exc
        counts_all = Counter(node.op_type for node in model.model.graph.node)
        counts = {op: int(counts_all.get(op, 0)) for op in COUNTED_OPS}
        logger.info("fused op counts: %s", ", ".join(f"{k}={v}" for k, v in counts.items() if v))
        expected = check_fusions(spec, counts, config)

        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        model.save_model_to_file(str(tmp), use_external_data_format=False)
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, dst)

    diff: float | None = None
    if config.verify:
        diff = _max_diff(src, dst, spec, config)
        if not diff <= config.atol:
            raise FusionError(
                f"the fused graph {dst} differs from the unfused one by {diff:.3g} (max abs); the limit is "
                f"{config.atol:g}. A fusion matched the wrong pattern: do not ship this graph"
            )
        logger.info("fused vs unfused: max abs diff %.3g (limit %g)", diff, config.atol)
    return FusionResult(path=dst, counts=counts, expected=expected, max_abs_diff=diff)
