"""Helpers shared by the optimizer tests: tiny batches and quick ``optimize`` configs.

The tiny models come from ``conftest.tiny_model_dir``; the texts are real English sentences
from the bundled corpus so that the tiny tokenizer produces varied sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pruneserve.optimizer.adapters import LoadedModel
from pruneserve.optimizer.data import Batch, Dataset, Example, default_examples, make_batches
from pruneserve.optimizer.pipeline import OptimizeConfig

#: 96 distinct English sentences (the first of the bundled corpus).
TEXTS: list[str] = [e.text for e in default_examples()[:96]]


def batches_for(
    loaded: LoadedModel, texts: Sequence[str], *, batch_size: int = 16, labels: Sequence[int] | None = None
) -> list[Batch]:
    """Tokenize ``texts`` (with optional label indices) into batches for ``loaded``'s model."""
    dataset = Dataset(
        examples=tuple(Example(text=t, line=i + 1) for i, t in enumerate(texts)),
        label_ids=tuple(labels) if labels is not None else None,
        source="test",
    )
    return make_batches(
        dataset, loaded.tokenizer, batch_size=batch_size, max_length=32,
        uses_token_type_ids=loaded.encoder.uses_token_type_ids,
    )


def quick_optimize_config(
    model: Path, out: Path, *, latency_shapes: Sequence[Sequence[int]] = ((1, 8), (2, 16)),
    validate: dict[str, Any] | None = None, **overrides: Any,
) -> OptimizeConfig:
    """A quick ``optimize`` run: little data, attention refit only, tiny latency shapes, 2 timing rounds.

    ``validate`` adds to (or overrides) the validate section; other ``overrides`` replace top-level keys.
    """
    raw: dict[str, Any] = {
        "out": str(out),
        "model": str(model),
        "quality_floor": None,
        "prune": {"data": {"max_examples": 48, "batch_size": 16},
                  "recovery": {"least_squares": True, "refit_ffn": False, "distill_steps": 0}},
        "validate": {"latency_shapes": [list(s) for s in latency_shapes], "warmup": 0, "repeats": 1,
                     "engine_rounds": 2, **(validate or {})},
    }
    raw.update(overrides)
    return OptimizeConfig.from_dict(raw)
