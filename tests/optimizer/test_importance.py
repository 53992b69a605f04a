"""Importance scores: shapes, the gate gradient itself, variants, normalisation, clean-up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import torch
from prune_testing import TEXTS, batches_for

from pruneserve.optimizer import importance as importance_module
from pruneserve.optimizer.adapters import LoadedModel, load_model
from pruneserve.optimizer.config import ImportanceConfig
from pruneserve.optimizer.errors import ConfigError
from pruneserve.optimizer.importance import compute_importance, contrastive_loss
from pruneserve.optimizer.quality import teacher_outputs

TinyModelFactory = Callable[..., Path]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two threads on a shared 2-core machine were measured 10x slower than one for tiny models.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: TinyModelFactory) -> LoadedModel:
    return load_model(tiny_model_dir("bert", "embedding"))


@pytest.fixture(scope="module")
def classifier(tiny_model_dir: TinyModelFactory) -> LoadedModel:
    return load_model(tiny_model_dir("roberta", "classification"))


def test_shapes_and_values(embedder: LoadedModel, classifier: LoadedModel) -> None:
    for loaded in (embedder, classifier):
        spec = loaded.encoder.spec
        scores = compute_importance(loaded.encoder, batches_for(loaded, TEXTS[:32]), ImportanceConfig())
        assert scores.heads.shape == (spec.num_layers, spec.num_heads)
        assert scores.ffn.shape == (spec.num_layers, spec.intermediate_size)
        assert scores.examples == 32
        for t in (scores.heads, scores.ffn):
            assert torch.isfinite(t).all() and (t >= 0).all() and (t > 0).float().mean() > 0.9
    assert compute_importance(classifier.encoder, batches_for(classifier, TEXTS[:16]), ImportanceConfig()).loss == (
        "cross_entropy"
    )


def test_score_is_the_gate_gradient(embedder: LoadedModel) -> None:
    """One batch: the Michel score of a head equals |dL/dgate| by central finite differences."""
    encoder = embedder.encoder.double()
    try:
        batches = batches_for(embedder, TEXTS[:16])
        config = ImportanceConfig(temperature=0.5)
        scores = compute_importance(encoder, batches, config)
        teacher = teacher_outputs(encoder, batches)
        spec = encoder.spec
        for layer, head in [(0, 1), (2, 3)]:
            losses = []
            for delta in (1e-4, -1e-4):
                gates = torch.ones(spec.num_layers, spec.num_heads, dtype=torch.float64)
                gates[layer, head] += delta
                with torch.no_grad():
                    out = encoder(**batches[0].inputs, head_gates=gates)
                    losses.append(float(contrastive_loss(out, teacher[0], config.temperature)))
            numeric = abs(losses[0] - losses[1]) / 2e-4
            assert scores.heads[layer, head].item() == pytest.approx(numeric, rel=1e-3, abs=1e-9)
    finally:
        encoder.float()


def test_scoring_pass_is_capped(embedder: LoadedModel) -> None:
    batches = batches_for(embedder, TEXTS[:64])  # 4 batches of 16
    assert compute_importance(embedder.encoder, batches, ImportanceConfig(max_examples=20)).examples == 32
    assert compute_importance(embedder.encoder, batches, ImportanceConfig(max_examples=None)).examples == 64


def test_michel_and_fisher_differ_as_defined(embedder: LoadedModel) -> None:
    batches = batches_for(embedder, TEXTS[:48])
    michel = compute_importance(embedder.encoder, batches, ImportanceConfig(method="michel"))
    fisher = compute_importance(embedder.encoder, batches, ImportanceConfig(method="fisher"))
    assert not torch.allclose(michel.heads, fisher.heads)
    # With one batch, fisher = michel squared exactly; over several batches it is not.
    one = batches[:1]
    m1 = compute_importance(embedder.encoder, one, ImportanceConfig(method="michel"))
    f1 = compute_importance(embedder.encoder, one, ImportanceConfig(method="fisher"))
    torch.testing.assert_close(f1.heads, m1.heads**2, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(fisher.heads, michel.heads**2, rtol=1e-2)


def test_normalisation(embedder: LoadedModel) -> None:
    batches = batches_for(embedder, TEXTS[:32])
    raw = compute_importance(embedder.encoder, batches, ImportanceConfig(normalize="global"))
    layer = compute_importance(embedder.encoder, batches, ImportanceConfig(normalize="layer"))
    torch.testing.assert_close(layer.heads.norm(dim=1), torch.ones(layer.heads.shape[0]))
    torch.testing.assert_close(layer.ffn.norm(dim=1), torch.ones(layer.ffn.shape[0]))
    torch.testing.assert_close(layer.heads, raw.heads / raw.heads.norm(dim=1, keepdim=True))


def test_contrastive_loss_ranks_where_a_distance_cannot(embedder: LoadedModel) -> None:
    """At the unpruned point a distance to the teacher has zero gradient; the in-batch loss does not."""
    batches = batches_for(embedder, TEXTS[:32])
    teacher = teacher_outputs(embedder.encoder, batches)
    gates = torch.ones(3, 4, requires_grad=True)
    out = embedder.encoder(**batches[0].inputs, head_gates=gates)
    (grad,) = torch.autograd.grad(((out - teacher[0]) ** 2).sum(), [gates])
    assert grad.abs().max() == 0
    scores = compute_importance(embedder.encoder, batches, ImportanceConfig())
    assert scores.heads.min() > 0


def test_classifier_without_labels_uses_the_teachers_predictions(classifier: LoadedModel) -> None:
    texts = TEXTS[:32]
    predicted = torch.cat(teacher_outputs(classifier.encoder, batches_for(classifier, texts))).argmax(-1)
    labelled = batches_for(classifier, texts, labels=predicted.tolist())
    with_labels = compute_importance(classifier.encoder, labelled, ImportanceConfig())
    without = compute_importance(classifier.encoder, batches_for(classifier, texts), ImportanceConfig())
    torch.testing.assert_close(with_labels.heads, without.heads)
    flipped = batches_for(classifier, texts, labels=((predicted + 1) % 3).tolist())
    assert not torch.allclose(compute_importance(classifier.encoder, flipped, ImportanceConfig()).heads, without.heads)


def test_masked_rescoring_changes_scores(embedder: LoadedModel) -> None:
    batches = batches_for(embedder, TEXTS[:32])
    full = compute_importance(embedder.encoder, batches, ImportanceConfig())
    mask = torch.ones(3, 4)
    mask[1] = 0  # empty the middle layer
    masked = compute_importance(embedder.encoder, batches, ImportanceConfig(), head_mask=mask)
    assert not torch.allclose(full.heads[2], masked.heads[2])


def test_model_state_restored_even_on_error(embedder: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = embedder.encoder
    encoder.train()
    flags = {name: p.requires_grad for name, p in encoder.named_parameters()}
    assert all(flags.values())

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("loss exploded")

    monkeypatch.setattr(importance_module, "_loss", broken)
    with pytest.raises(RuntimeError, match="loss exploded"):
        compute_importance(encoder, batches_for(embedder, TEXTS[:16]), ImportanceConfig())
    assert encoder.training
    assert {name: p.requires_grad for name, p in encoder.named_parameters()} == flags
    assert all(p.grad is None for p in encoder.parameters())
    monkeypatch.undo()
    compute_importance(encoder, batches_for(embedder, TEXTS[:16]), ImportanceConfig())
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    assert all(p.grad is None for p in encoder.parameters())
    encoder.eval()


def test_loss_must_fit_the_task(embedder: LoadedModel, classifier: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="needs a classifier"):
        compute_importance(embedder.encoder, batches_for(embedder, TEXTS[:8]), ImportanceConfig(loss="cross_entropy"))
    with pytest.raises(ConfigError, match="compares embeddings"):
        compute_importance(classifier.encoder, batches_for(classifier, TEXTS[:8]), ImportanceConfig(loss="contrastive"))


def test_to_dict_round_trip(embedder: LoadedModel) -> None:
    scores = compute_importance(embedder.encoder, batches_for(embedder, TEXTS[:16]), ImportanceConfig(method="fisher"))
    again = importance_module.Importance.from_dict(scores.to_dict())
    torch.testing.assert_close(again.heads, scores.heads)
    assert (again.method, again.loss) == ("fisher", "contrastive")
