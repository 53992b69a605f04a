"""Recovery after pruning: the least-squares target, improvements per method, teacher untouched."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import torch
from prune_testing import TEXTS, batches_for

from pruneserve.optimizer.adapters import LoadedModel, load_model
from pruneserve.optimizer.config import RecoveryConfig
from pruneserve.optimizer.pruning import PruningPlan, prune
from pruneserve.optimizer.quality import fidelity, teacher_outputs
from pruneserve.optimizer.recovery import distill, recover, refit, ridge_solve, teacher_hidden_states

TinyModelFactory = Callable[..., Path]

# 6 of 12 heads removed, one middle layer emptied, a quarter of the FFN gone in layer 0.
PLAN = PruningPlan(heads=[[0, 2, 3], [], [1, 2, 3]], ffn=[list(range(48)), list(range(64)), list(range(64))])


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: TinyModelFactory) -> LoadedModel:
    return load_model(tiny_model_dir("bert", "embedding"))


def _splits(loaded: LoadedModel) -> tuple[list, list]:
    return batches_for(loaded, TEXTS[:64]), batches_for(loaded, TEXTS[64:96])


def test_refit_of_an_unpruned_model_keeps_its_weights(embedder: LoadedModel) -> None:
    """With nothing removed the original weights fit the target exactly: the target is right."""
    teacher = embedder.encoder
    student = prune(teacher, PruningPlan.keep_all(teacher.spec))
    score = _splits(embedder)[0]
    refit(student, teacher, score, kinds=["attention", "ffn"], alpha_scale=1e-6)
    for got, want in zip(student.layers, teacher.layers):
        # float32 Gram products: close, not bit-equal. The error grows layer by layer (each
        # layer is fitted on the refitted layers below it; measured relative error 3e-5, 4e-4,
        # 4e-3 for layers 1-3), and one element of 1024 once moved 0.0106 at std 0.2 with
        # another summation order. A wrong target would move the matrix by its own size.
        w_got, w_want = got.attention.o.weight, want.attention.o.weight
        assert float(torch.linalg.norm(w_got - w_want) / torch.linalg.norm(w_want)) < 3e-2
        assert float((w_got - w_want).abs().max()) < 5e-2
    assert fidelity(student, teacher_outputs(teacher, score), score).min_cosine > 0.9999


def test_each_method_improves_fidelity_and_the_teacher_is_untouched(embedder: LoadedModel) -> None:
    teacher = embedder.encoder
    before = copy.deepcopy(teacher.state_dict())
    score, evaluation = _splits(embedder)
    t_score, t_eval = teacher_outputs(teacher, score), teacher_outputs(teacher, evaluation)
    student = prune(teacher, PLAN)
    stages = recover(
        student, teacher, score, evaluation, RecoveryConfig(distill_steps=40, lr=1e-3),
        teacher_score=t_score, teacher_eval=t_eval,
    )
    assert [s.method for s in stages] == ["pruned", "refit", "distillation"]
    cos = [s.quality.mean_cosine for s in stages]
    assert cos[0] == pytest.approx(fidelity(prune(teacher, PLAN), t_eval, evaluation).mean_cosine)
    assert cos[1] > cos[0] + 0.02, cos  # held-out texts: the refit generalises
    assert cos[2] > cos[0] + 0.02, cos
    # On the data they were fitted to, each method must not make things worse.
    assert fidelity(student, t_score, score).mean_cosine > cos[0]
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert student.spec.heads == [3, 0, 3]


def test_weak_ridge_fits_training_data_better_than_strong(embedder: LoadedModel) -> None:
    teacher = embedder.encoder
    score, _ = _splits(embedder)
    t_score = teacher_outputs(teacher, score)
    fits = {}
    for alpha in (1e-4, 10.0):
        student = prune(teacher, PLAN)
        refit(student, teacher, score, kinds=["attention"], alpha_scale=alpha)
        fits[alpha] = fidelity(student, t_score, score).mean_cosine
    assert fits[1e-4] > fits[10.0]


def test_distillation_lowers_the_loss_for_a_classifier(tiny_model_dir: TinyModelFactory) -> None:
    loaded = load_model(tiny_model_dir("distilbert", "classification"))
    score = batches_for(loaded, TEXTS[:64])
    t_score = teacher_outputs(loaded.encoder, score)
    student = prune(loaded.encoder, PLAN)
    losses = distill(student, score, t_score, steps=40, lr=1e-3, seed=0)
    assert len(losses) == 40
    assert sum(losses[-8:]) < sum(losses[:8])
    assert not student.training  # restored
    assert all(p.grad is None for p in student.parameters())
    # Embeddings are frozen during distillation.
    torch.testing.assert_close(student.embeddings.word.weight, loaded.encoder.embeddings.word.weight)


def test_ridge_solve_in_float32_recovers_a_known_linear_map() -> None:
    """float32 Gram accumulation over many rows still solves the least-squares problem."""
    generator = torch.Generator().manual_seed(0)
    n_in, n_out = 96, 24
    weight = torch.randn(n_out, n_in, generator=generator) * 0.5
    bias = torch.randn(n_out, generator=generator)
    xs = [torch.randn(4000, n_in, generator=generator) * 3 + 1 for _ in range(5)]  # offset: the bias matters
    ys = [x @ weight.T + bias + 0.01 * torch.randn(x.shape[0], n_out, generator=generator) for x in xs]
    start_w, start_b = torch.zeros(n_out, n_in), torch.zeros(n_out)
    got_w, got_b = ridge_solve(xs, ys, start_w, start_b, alpha_scale=1e-6)
    assert got_w.dtype == torch.float32 and got_w.shape == weight.shape
    torch.testing.assert_close(got_w, weight, atol=2e-3, rtol=0)
    torch.testing.assert_close(got_b, bias, atol=1e-2, rtol=0)
    # A strong ridge pulls the solution to the starting weights instead.
    strong_w, _ = ridge_solve(xs, ys, start_w, start_b, alpha_scale=1e4)
    assert strong_w.abs().max() < 0.05 * weight.abs().max()


def test_refit_returns_the_teacher_hidden_states(embedder: LoadedModel) -> None:
    teacher = embedder.encoder
    score = _splits(embedder)[0]
    hidden = refit(prune(teacher, PLAN), teacher, score, kinds=["attention"], alpha_scale=0.1)
    for got, want in zip(hidden, teacher_hidden_states(teacher, score)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_token_level_distillation_lowers_the_loss_and_helps_held_out(embedder: LoadedModel) -> None:
    teacher = embedder.encoder
    score, evaluation = _splits(embedder)
    t_score, t_eval = teacher_outputs(teacher, score), teacher_outputs(teacher, evaluation)
    hidden = teacher_hidden_states(teacher, score)
    student = prune(teacher, PLAN)
    before = fidelity(student, t_eval, evaluation).mean_cosine
    losses = distill(student, score, t_score, steps=40, lr=1e-3, hidden=hidden, hidden_weight=1.0, seed=0)
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8]), losses
    assert fidelity(student, t_eval, evaluation).mean_cosine > before


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_schedule(
    embedder: LoadedModel, schedule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = embedder.encoder
    score, _ = _splits(embedder)
    seen: list[float] = []
    step = torch.optim.AdamW.step

    def spy(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    distill(prune(teacher, PLAN), score, teacher_outputs(teacher, score), steps=10, lr=1e-3, schedule=schedule)
    assert len(seen) == 10 and seen[0] == pytest.approx(1e-3)
    if schedule == "constant":
        assert seen == [pytest.approx(1e-3)] * 10
    else:  # half a cosine wave: strictly falling, the last step nearly at 0
        assert all(a > b for a, b in zip(seen, seen[1:])), seen
        assert seen[-1] < 0.03 * 1e-3


def test_unknown_schedule_is_refused() -> None:
    from pruneserve.optimizer.errors import ConfigError

    with pytest.raises(ConfigError, match=r"recovery.lr_schedule='linear' is not one of 'constant', 'cosine'"):
        RecoveryConfig(lr_schedule="linear")  # type: ignore[arg-type]
