"""Pruned checkpoints: ``model.safetensors`` + ``pruning.json`` (+ ``tokenizer.json``). No pickle.

``pruning.json`` holds the :class:`EncoderSpec` (enough to rebuild the skeleton), the
:class:`PruningPlan` relative to the original model (if any), a free-form ``record`` (scores,
quality, provenance) and the sha256 of the weights file, checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pruneserve.optimizer.errors import CheckpointError
from pruneserve.optimizer.modeling import Encoder, EncoderSpec
from pruneserve.optimizer.pruning import PruningPlan
from pruneserve.outputs import PRUNING_FILE, WEIGHTS_FILE, OutputError, check_output_dir

__all__ = [
    "FORMAT_VERSION",
    "PRUNING_FILE",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "load_pruned",
    "read_pruning_document",
    "save_pruned",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# WEIGHTS_FILE and PRUNING_FILE come from pruneserve.outputs, which recognises a checkpoint by them.
TOKENIZER_FILE = "tokenizer.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_pruned(
    encoder: Encoder,
    out_dir: str | Path,
    *,
    plan: PruningPlan | None = None,
    record: dict[str, Any] | None = None,
    tokenizer: tokenizers.Tokenizer | None = None,
) -> Path:
    """Write ``encoder`` (pruned or not) to ``out_dir`` and return the folder.

    ``record`` must be JSON-serialisable. Each file is written beside its destination and
    renamed into place, so a crash never leaves a half-written file under the final name.
    ``out_dir`` must be new, empty or a pruned checkpoint: files of anything else (a model
    folder has a ``model.safetensors`` too) are never replaced. ``pruneserve prune`` calls this
    inside :func:`pruneserve.outputs.atomic_output_dir`, so the whole folder appears at once.
    """
    try:
        out = check_output_dir(out_dir, overwrite=True, kind="pruned")
    except OutputError as exc:
        raise CheckpointError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    try:
        record_json = json.loads(json.dumps(record or {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the pruning record is not JSON-serialisable: {exc}") from exc

    weights = out / WEIGHTS_FILE
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)

    if tokenizer is not None:
        tmp = out / f".{TOKENIZER_FILE}.tmp"
        tokenizer.save(str(tmp))
        os.replace(tmp, out / TOKENIZER_FILE)

    document = {
        "format_version": FORMAT_VERSION,
        "spec": encoder.spec.to_dict(),
        "plan": plan.to_dict() if plan is not None else None,
        "record": record_json,
        "weights_sha256": _sha256(weights),
    }
    tmp = out / f".{PRUNING_FILE}.tmp"
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / PRUNING_FILE)
    logger.info("saved pruned checkpoint to %s (heads per layer %s, FFN %s)", out, encoder.spec.heads,
                encoder.spec.ffn)
    return out


def read_pruning_document(path: str | Path) -> dict[str, Any]:
    """The parsed ``pruning.json`` of the checkpoint folder ``path`` (spec, plan and record as plain
    JSON; the weights are neither read nor checked). Raises :class:`CheckpointError` naming what
    to pass when ``path`` is not a pruned checkpoint."""
    folder = Path(path)
    doc_path = folder / PRUNING_FILE
    if not doc_path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {PRUNING_FILE}"
        raise CheckpointError(
            f"{folder} {what}; pass the --out folder of `pruneserve prune` (it holds {PRUNING_FILE} and {WEIGHTS_FILE})"
        )
    try:
        document = json.loads(doc_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {doc_path}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format_version") != FORMAT_VERSION:
        found = document.get("format_version") if isinstance(document, dict) else None
        raise CheckpointError(f"{doc_path} has format_version {found!r}; this version reads {FORMAT_VERSION}")
    return document


def load_pruned(path: str | Path) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the encoder from ``pruning.json`` and load its safetensors weights (eval mode).

    Returns the encoder and the parsed ``pruning.json`` (``spec``, ``plan``, ``record``, ...);
    the plan, if any, is returned as a :class:`PruningPlan` under ``"plan"``. Raises
    :class:`CheckpointError` when a file is missing, the weights' hash differs from the
    record, or a tensor's name or shape does not match the skeleton.
    """
    folder = Path(path)
    doc_path, weights = folder / PRUNING_FILE, folder / WEIGHTS_FILE
    for required in (doc_path, weights):
        if not required.is_file():
            raise CheckpointError(f"{required} is missing; a pruned checkpoint needs {PRUNING_FILE} and {WEIGHTS_FILE}")
    document = read_pruning_document(folder)
    try:
        spec = EncoderSpec.from_dict(document["spec"])
        plan = PruningPlan.from_dict(document["plan"]) if document.get("plan") is not None else None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{doc_path} has an invalid spec or plan: {exc}") from exc

    expected_sha = document.get("weights_sha256")
    actual_sha = _sha256(weights)
    if expected_sha != actual_sha:
        raise CheckpointError(
            f"{weights} has sha256 {actual_sha}, but {PRUNING_FILE} records {expected_sha}; "
            "the weights were changed or belong to another checkpoint"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc

    encoder = Encoder(spec)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the spec in {PRUNING_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{weights}: tensor {key!r} has shape {tuple(state[key].shape)}, but the spec in {PRUNING_FILE} "
                f"needs {tuple(tensor.shape)}"
            )
    encoder.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    encoder.eval()
    document["plan"] = plan
    return encoder, document
