"""Export an :class:`Encoder` to ONNX under the artifact's graph contract, and check parity.

Graph contract (see docs/ARCHITECTURE.md): int64 inputs ``input_ids``, ``attention_mask`` and,
for BERT-style models, ``token_type_ids``, each ``[batch, sequence]`` with those dynamic axis
names; one float32 output, ``embedding`` ``[batch, dim]`` (pooling and normalisation inside
the graph) or ``logits`` ``[batch, num_labels]``.

The classic TorchScript exporter (``dynamo=False``) is used first: its graphs keep the eager
attention pattern, with each layer's head count as a Reshape constant, that ONNX Runtime's
transformer optimizer fuses. The dynamo exporter is only a fallback, and the fusion stage
will then say loudly if its graph does not fuse.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from pruneserve.engines.ort import inference_session
from pruneserve.optimizer.errors import ConfigError, ExportError
from pruneserve.optimizer.modeling import Encoder

__all__ = ["ExportConfig", "ExportResult", "check_parity", "export_onnx", "input_names_for"]

logger = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET = 14, 20
DYNAMIC_AXES = {0: "batch", 1: "sequence"}


@dataclass
class ExportConfig:
    """Settings of the ONNX export.

    ``opset``: ONNX opset (17 gives native LayerNormalization). ``sample_batch_size`` and
    ``sample_sequence_length`` shape the tracing inputs only; the exported axes are dynamic.
    ``fallback_to_dynamo``: try torch's dynamo exporter if the classic one fails.
    """

    opset: int = 17
    do_constant_folding: bool = True
    sample_batch_size: int = 2
    sample_sequence_length: int = 16
    fallback_to_dynamo: bool = True

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"opset {self.opset} is out of range; use {MIN_OPSET}..{MAX_OPSET} (17 recommended)")
        if self.sample_batch_size < 2:
            # A batch of 1 lets the tracer specialise batch-dependent shapes.
            raise ConfigError(f"sample_batch_size must be >= 2, got {self.sample_batch_size}")
        if self.sample_sequence_length < 2:
            raise ConfigError(f"sample_sequence_length must be >= 2, got {self.sample_sequence_length}")


@dataclass(frozen=True)
class ExportResult:
    """Where the graph was written and its interface."""

    path: Path
    input_names: list[str]
    output_names: list[str]
    opset: int
    exporter: str = field(default="torchscript")


class _GraphInterface(nn.Module):
    """Fixes the exported signature: positional int64 inputs, no gates."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        return self.encoder(input_ids, attention_mask, token_type_ids)


def input_names_for(encoder: Encoder) -> list[str]:
    """The graph's input names for this encoder, in contract order."""
    names = ["input_ids", "attention_mask"]
    if encoder.uses_token_type_ids:
        names.append("token_type_ids")
    return names


def _sample_inputs(encoder: Encoder, config: ExportConfig) -> dict[str, Tensor]:
    spec = encoder.spec
    gen = torch.Generator().manual_seed(0)
    b, s = config.sample_batch_size, min(config.sample_sequence_length, spec.max_position_embeddings - spec.position_offset)
    ids = torch.randint(0, spec.vocab_size, (b, s), generator=gen)
    ids[ids == spec.pad_token_id] = (spec.pad_token_id + 1) % spec.vocab_size
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, s // 2 :] = 0  # a padded row, so masking is traced as data, not folded away
    ids[mask == 0] = spec.pad_token_id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if encoder.uses_token_type_ids:
        inputs["token_type_ids"] = torch.zeros(b, s, dtype=torch.long)
    return inputs


def _export(module: nn.Module, inputs: dict[str, Tensor], path: Path, output: str, config: ExportConfig,
            dynamo: bool) -> None:
    names = list(inputs)
    kwargs: dict[str, object] = {
        "input_names": names,
        "output_names": [output],
        "opset_version": config.opset,
        "dynamo": dynamo,
    }
    if dynamo:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        kwargs["dynamic_shapes"] = {n: {0: batch, 1: seq} for n in names}
    else:
        kwargs["dynamic_axes"] = {**{n: DYNAMIC_AXES for n in names}, output: {0: "batch"}}
        kwargs["do_constant_folding"] = config.do_constant_folding
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but only its graphs fuse.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, tuple(inputs[n] for n in names), str(path), **kwargs)


def _pin_output_shape(path: Path, output_dim: int) -> None:
    """Declare the output as [batch, output_dim]: the tracer leaves the width symbolic after a Div."""
    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    del dims[:]
    dims.add().dim_param = "batch"
    dims.add().dim_value = output_dim
    onnx.save(model, str(path))


def _check_graph(path: Path, inputs: list[str], output: str, output_dim: int) -> None:
    """Raise ExportError unless the saved graph is valid and has exactly the contract's interface."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph {path} is invalid: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    found_inputs = [i.name for i in graph.input]
    found_outputs = [o.name for o in graph.output]
    if found_inputs != inputs or found_outputs != [output]:
        raise ExportError(
            f"the exported graph has inputs {found_inputs} and outputs {found_outputs}; expected {inputs} and [{output!r}]"
        )
    for value in graph.input:
        t = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        if t.elem_type != onnx.TensorProto.INT64 or len(dims) != 2 or not all(isinstance(d, str) for d in dims):
            raise ExportError(f"input {value.name} is {onnx.TensorProto.DataType.Name(t.elem_type)} {dims}; "
                              "expected INT64 [batch, sequence] with dynamic axes")
    out = graph.output[0].type.tensor_type
    dims = [d.dim_param or d.dim_value for d in out.shape.dim]
    if out.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or dims[1] != output_dim:
        raise ExportError(f"output {output} is {onnx.TensorProto.DataType.Name(out.elem_type)} {dims}; "
                          f"expected FLOAT [batch, {output_dim}]")


def export_onnx(encoder: Encoder, path: str | Path, config: ExportConfig | None = None) -> ExportResult:
    """Export ``encoder`` (eval mode, no gates) to ``path`` and check the graph's interface."""
    config = config or ExportConfig()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = encoder.spec
    output = encoder.output_name
    output_dim = spec.num_labels if spec.task == "classification" else spec.hidden_size
    inputs = _sample_inputs(encoder, config)
    names = list(inputs)
    was_training = encoder.training
    encoder.eval()
    exporter = "torchscript"
    try:
        with torch.no_grad():
            try:
                _export(_GraphInterface(encoder), inputs, out, output, config, dynamo=False)
            except Exception as exc:  # the exporter raises many unrelated types
                if not config.fallback_to_dynamo:
                    raise ExportError(f"torch.onnx.export (TorchScript) failed: {exc}") from exc
                logger.warning("TorchScript export failed (%s); retrying with the dynamo exporter, "
                               "whose graph ONNX Runtime may not fuse", exc)
                exporter = "dynamo"
                try:
                    _export(_GraphInterface(encoder), inputs, out, output, config, dynamo=True)
                except Exception as exc2:
                    raise ExportError(f"both ONNX exporters failed: TorchScript: {exc}; dynamo: {exc2}") from exc2
    finally:
        encoder.train(was_training)
    _pin_output_shape(out, output_dim)
    _check_graph(out, names, output, output_dim)
    logger.info("exported %s (%s exporter, opset %d): inputs %s, output %s", out, exporter, config.opset, names, output)
    return ExportResult(path=out, input_names=names, output_names=[output], opset=config.opset, exporter=exporter)


def check_parity(
    encoder: Encoder, onnx_path: str | Path, batches: Iterable[Mapping[str, Tensor]], atol: float = 1e-4
) -> float:
    """Largest absolute difference between ``encoder`` and the ONNX graph over ``batches``.

    Each batch is a tokenized dict (``input_ids``, ``attention_mask``, ...); keys the graph
    does not take are ignored. Raises :class:`ExportError` if the difference exceeds ``atol``.
    """
    # No spinning: a check session must not slow the timed ones next to it.
    session = inference_session(onnx_path, threads=1, spinning="off")
    graph_inputs = [i.name for i in session.get_inputs()]
    worst = 0.0
    seen = 0
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in batches:
            missing = [n for n in graph_inputs if n not in batch]
            if missing:
                raise ExportError(f"parity batch lacks the graph input(s) {missing}")
            with torch.no_grad():
                expected = encoder(
                    batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
                ).numpy()
            got = session.run(None, {n: batch[n].numpy().astype(np.int64) for n in graph_inputs})[0]
            if got.shape != expected.shape:
                raise ExportError(f"{onnx_path} returned shape {got.shape}; PyTorch returned {expected.shape}")
            worst = max(worst, float(np.abs(got - expected).max()))
            seen += 1
    finally:
        encoder.train(was_training)
    if seen == 0:
        raise ExportError("check_parity got no batches to compare")
    if not worst <= atol:  # also catches NaN
        raise ExportError(
            f"{onnx_path} differs from the PyTorch model by {worst:.3g} (max abs) over {seen} batch(es); "
            f"the limit is {atol:g}"
        )
    logger.info("ONNX parity: max abs diff %.3g over %d batch(es) (limit %g)", worst, seen, atol)
    return worst
