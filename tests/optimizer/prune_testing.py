"""Helpers shared by the pruning-stage tests (scoring, search, recovery, CLI): tiny models and batches.

The tiny models come from ``conftest.tiny_model_dir``; the texts are real English sentences
from the bundled corpus so that the tiny tokenizer produces varied sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

from pruneserve.optimizer.adapters import LoadedModel
from pruneserve.optimizer.data import Batch, Dataset, Example, default_examples, make_batches

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
