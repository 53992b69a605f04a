"""Tiny artifacts that carry a reference model, for live-fidelity tests (server and e2e).

:func:`make_shadowed_artifact` writes a real artifact (through ``write_artifact``) whose
``reference.onnx`` is the tiny graph of :mod:`tiny_artifacts` and whose ``model.onnx`` is either
the same graph (fidelity 1) or a damaged copy: a fraction of the hidden units' input weights
zeroed, as if those neurons had been pruned without recovery. :func:`expected_fidelity`
recomputes what the server should measure with the independent numpy forward pass.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from tiny_artifacts import HIDDEN, LABELS, MAX_LEN, build_graph, build_tokenizer, reference_forward, tokenize

from pruneserve.artifact import Manifest, OutputSpec, write_artifact


def damage_graph(source: Path, out: Path, fraction: float) -> None:
    """Copy ``source`` to ``out`` with the first ``fraction`` of ``w1``'s output columns zeroed."""
    model = onnx.load(str(source))
    for i, init in enumerate(model.graph.initializer):
        if init.name == "w1":
            w = numpy_helper.to_array(init).copy()
            w[:, : int(round(fraction * w.shape[1]))] = 0.0
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, "w1"))
    onnx.save(model, str(out))


def make_shadowed_artifact(
    out: Path,
    *,
    name: str = "shadowed",
    task: str = "embedding",
    damage: float = 0.0,
    quality_floor: float | None = 0.95,
    seed: int = 0,
) -> Path:
    """An artifact at ``out`` with ``reference.onnx``; ``damage`` > 0 makes the served model differ."""
    work = out.parent / f".{out.name}-src"
    work.mkdir(parents=True, exist_ok=True)
    reference, model, tok = work / "reference.onnx", work / "model.onnx", work / "tokenizer.json"
    inputs = build_graph(reference, task=task, seed=seed)
    if damage > 0:
        damage_graph(reference, model, damage)
    else:
        shutil.copyfile(reference, model)
    build_tokenizer(tok)
    embedding = task == "embedding"
    manifest = Manifest(
        name=name,
        task=task,
        inputs=inputs,
        outputs=[OutputSpec("embedding", [HIDDEN])] if embedding else [OutputSpec("logits", [len(LABELS)])],
        max_sequence_length=MAX_LEN,
        labels=[] if embedding else list(LABELS),
        reference_file="reference.onnx",
        quality_floor=quality_floor,
        runtime={"engine": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        quantization={"mode": "none"},
        pruning={"kept_heads_per_layer": [4, 2], "heads_original_per_layer": 6},
    )
    write_artifact(out, manifest, {"model.onnx": model, "tokenizer.json": tok, "reference.onnx": reference})
    return out


def served_and_reference(artifact: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The served model's and the reference's outputs for ``texts``, in float64 numpy (no ORT)."""
    ids, mask, types = tokenize(texts)
    return (
        reference_forward(artifact / "model.onnx", ids, mask, types),
        reference_forward(artifact / "reference.onnx", ids, mask, types),
    )


def expected_fidelity(artifact: Path, texts: list[str], task: str = "embedding") -> np.ndarray:
    """Per-text fidelity the server should report: cosine, or label agreement as 1/0."""
    served, ref = served_and_reference(artifact, texts)
    if task == "classification":
        return (served.argmax(1) == ref.argmax(1)).astype(np.float64)
    return (served * ref).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(ref, axis=1))
