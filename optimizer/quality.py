"""How close a (pruned, masked or quantized) model stays to the original: one measure for all stages.

Embedding models: cosine similarity between the student's and the teacher's embedding of
each evaluation text (mean and minimum). Classifiers: accuracy against the data's labels and
agreement with the teacher's predictions; data without labels has no accuracy to measure, so
only the agreement is (``labeled=False``, ``accuracy`` None) and nothing calls it accuracy.

:attr:`Quality.score` folds this into one number in ``[0, 1]`` where 1 means "as good as the
original": the mean cosine for embedding models, ``1 - accuracy drop`` for classifiers (the
agreement without labels: every changed prediction counts against it). The search's quality
floor compares against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pruneserve.engines.measure import cosines

if TYPE_CHECKING:
    from torch import Tensor

    from pruneserve.optimizer.data import Batch
    from pruneserve.optimizer.modeling import Encoder, Gates


@dataclass(frozen=True)
class Quality:
    """Fidelity of a student to the teacher on one set of batches."""

    task: str
    examples: int
    mean_cosine: float | None = None
    min_cosine: float | None = None
    accuracy: float | None = None
    teacher_accuracy: float | None = None
    agreement: float | None = None
    #: Classifiers: whether the data had labels (``accuracy`` is measured only then).
    labeled: bool | None = None

    @property
    def score(self) -> float:
        """One number, 1.0 = unchanged: mean cosine (embedding), 1 - accuracy drop (labeled
        classifier data) or agreement with the original's predictions (unlabeled)."""
        if self.task == "classification":
            if self.accuracy is None:
                assert self.agreement is not None
                return self.agreement
            assert self.teacher_accuracy is not None
            return 1.0 - (self.teacher_accuracy - self.accuracy)
        assert self.mean_cosine is not None
        return self.mean_cosine

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``score`` included and absent measures dropped."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["score"] = self.score
        return out

    def describe(self) -> str:
        """A short human-readable summary for logs and reports."""
        if self.task == "classification":
            if self.accuracy is None:
                return f"agreement with the original's predictions {self.agreement:.4f} (no labels: accuracy not measured)"
            return f"accuracy {self.accuracy:.4f} (original {self.teacher_accuracy:.4f}), agreement {self.agreement:.4f}"
        return f"mean cosine {self.mean_cosine:.4f} (min {self.min_cosine:.4f})"


def teacher_outputs(encoder: Encoder, batches: Sequence[Batch]) -> list[Tensor]:
    """The original model's outputs (embeddings or logits) for each batch, computed once."""
    import torch

    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return [encoder(**batch.inputs).detach() for batch in batches]
    finally:
        encoder.train(was_training)


def fidelity(
    student: Encoder,
    teacher: Sequence[Tensor],
    batches: Sequence[Batch],
    *,
    head_gates: Gates = None,
    ffn_gates: Gates = None,
) -> Quality:
    """Compare ``student`` (optionally under 0/1 gate masks) to the teacher's outputs.

    ``teacher`` comes from :func:`teacher_outputs` on the same ``batches``. For classifiers the
    reference labels are the batches' labels when present; without them only the agreement
    with the teacher's predictions is measured (see :func:`classifier_quality`).
    """
    import torch

    if len(teacher) != len(batches):
        raise ValueError(f"{len(teacher)} teacher outputs for {len(batches)} batches")
    task = student.spec.task
    was_training = student.training
    student.eval()
    outputs: list[np.ndarray] = []
    references: list[np.ndarray] = []
    predictions: list[tuple[Any, Any, Any]] = []
    try:
        with torch.no_grad():
            for batch, reference in zip(batches, teacher):
                out = student(**batch.inputs, head_gates=head_gates, ffn_gates=ffn_gates)
                if task == "classification":
                    predictions.append((out.argmax(-1).numpy(), reference.argmax(-1).numpy(),
                                        None if batch.labels is None else batch.labels.numpy()))
                else:
                    outputs.append(out.float().numpy())
                    references.append(reference.float().numpy())
    finally:
        student.train(was_training)
    if task == "classification":
        return classifier_quality(predictions)
    cos = cosines(outputs, references)
    return Quality(task=task, examples=int(cos.size), mean_cosine=float(cos.mean()), min_cosine=float(cos.min()))


def classifier_quality(predictions: Sequence[tuple[Any, Any, Any]]) -> Quality:
    """A classifier's quality from ``(predicted, teacher predicted, labels or None)`` index
    arrays per batch: accuracy (and the original's) on labeled data, agreement always."""
    correct = teacher_correct = agree = total = 0
    labeled = all(labels is not None for _, _, labels in predictions)
    for pred, teacher_pred, labels in predictions:
        agree += int((pred == teacher_pred).sum())
        total += int(pred.size)
        if labeled:
            correct += int((pred == labels).sum())
            teacher_correct += int((teacher_pred == labels).sum())
    if not labeled:
        return Quality("classification", total, agreement=agree / total, labeled=False)
    return Quality("classification", total, accuracy=correct / total, teacher_accuracy=teacher_correct / total,
                   agreement=agree / total, labeled=True)
