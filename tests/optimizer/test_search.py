"""The mask search: exact fractions, cost-aware ranking, protection, the quality floor, BudgetError."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import torch
from prune_testing import TEXTS, batches_for

from pruneserve.optimizer import search as search_module
from pruneserve.optimizer.adapters import LoadedModel, load_model
from pruneserve.optimizer.config import BudgetConfig, ImportanceConfig
from pruneserve.optimizer.errors import BudgetError, ConfigError
from pruneserve.optimizer.importance import Importance
from pruneserve.optimizer.quality import fidelity, teacher_outputs
from pruneserve.optimizer.search import Rules, SearchResult, remove_lowest, search

TinyModelFactory = Callable[..., Path]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: TinyModelFactory) -> tuple[LoadedModel, list, list, list, list]:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    score, evaluation = batches_for(loaded, TEXTS[:64]), batches_for(loaded, TEXTS[64:96])
    return (loaded, score, evaluation, teacher_outputs(loaded.encoder, score),
            teacher_outputs(loaded.encoder, evaluation))


def _run(setup: tuple, budget: BudgetConfig, importance: ImportanceConfig | None = None) -> SearchResult:
    loaded, score, evaluation, t_score, t_eval = setup
    return search(loaded.encoder, score, evaluation, budget, importance or ImportanceConfig(),
                  teacher_score=t_score, teacher_eval=t_eval)


def test_fractions_are_met_exactly_step_by_step(setup: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = search_module.compute_importance
    monkeypatch.setattr(search_module, "compute_importance", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = _run(setup, BudgetConfig(head_fraction=0.5, ffn_fraction=0.25, step_fraction=0.2))
    assert int((result.head_mask == 0).sum()) == 6  # 0.5 x 12 heads
    assert int((result.ffn_mask == 0).sum()) == 48  # 0.25 x 192 neurons
    assert sum(len(k) for k in result.plan.heads) == 6
    assert [len(k) for k in result.plan.ffn] == result.ffn_mask.sum(dim=1).int().tolist()
    # Steps of ceil(0.2 x 12) = 3 heads (and 39 neurons): 2 steps, re-scored before the second.
    assert [(t.heads_removed, t.ffn_removed) for t in result.trace] == [(0, 0), (3, 39), (6, 48)]
    assert len(calls) == 2
    flops = [t.flops_removed for t in result.trace]
    assert flops == sorted(flops) and flops[0] == 0
    # The recorded quality is the masked model's quality.
    loaded, _, evaluation, _, t_eval = setup
    again = fidelity(loaded.encoder, t_eval, evaluation, head_gates=result.head_mask, ffn_gates=result.ffn_mask)
    assert result.quality.mean_cosine == pytest.approx(again.mean_cosine)
    assert result.quality.mean_cosine < 1.0


def test_last_layer_is_protected_and_impossible_fractions_raise(setup: tuple) -> None:
    with pytest.raises(BudgetError, match=r"at most 11 \(0.917\) can go"):
        _run(setup, BudgetConfig(head_fraction=1.0))
    result = _run(setup, BudgetConfig(head_fraction=11 / 12, step_fraction=0.5))
    assert result.head_mask.sum(dim=1).tolist() == [0, 0, 1]
    unprotected = _run(setup, BudgetConfig(head_fraction=1.0, protected_layers=(), step_fraction=1.0))
    assert unprotected.head_mask.sum() == 0
    with pytest.raises(ConfigError, match="outside the model's 3 layers"):
        _run(setup, BudgetConfig(head_fraction=0.5, protected_layers=(3,)))


def _importance(heads: list[list[float]], ffn: list[list[float]]) -> Importance:
    return Importance(heads=torch.tensor(heads), ffn=torch.tensor(ffn))


def test_remove_lowest_is_global_and_respects_minimums() -> None:
    scores = _importance([[5.0, 1.0, 2.0], [0.5, 0.6, 9.0]], [[1.0] * 2, [1.0] * 2])
    rules = Rules(min_heads=(0, 2), min_ffn=(0, 0))
    heads, ffn = remove_lowest(scores, torch.ones(2, 3), torch.ones(2, 2), max_heads=3, max_ffn=0, rules=rules)
    # Global order 0.5, 0.6, 1.0, 2.0 ... but layer 1 must keep 2 heads: 0.6 is skipped.
    assert heads.tolist() == [[1, 0, 0], [0, 1, 1]]
    assert ffn.tolist() == [[1, 1], [1, 1]]


def test_cost_aware_ranking_removes_compute_not_counts() -> None:
    # Heads matter twice as much as neurons but cost 10x more: per FLOP, heads are the cheaper loss.
    scores = _importance([[1.0, 1.0]], [[0.5, 0.5, 0.5, 0.5]])
    rules = Rules(min_heads=(0,), min_ffn=(0,))
    masks = (torch.ones(1, 2), torch.ones(1, 4))
    by_flops = remove_lowest(scores, *masks, max_heads=2, max_ffn=4, rules=rules, costs=(10.0, 1.0), cost_quota=10.0)
    assert by_flops[0].tolist() == [[0, 1]] and by_flops[1].sum() == 4
    by_count = remove_lowest(scores, *masks, max_heads=2, max_ffn=4, rules=rules, costs=(1.0, 1.0), cost_quota=2.0)
    assert by_count[0].sum() == 2 and by_count[1].tolist() == [[0, 0, 1, 1]]


def test_quality_floor_stops_at_the_last_step_above_it(setup: tuple) -> None:
    floor = 0.95
    result = _run(setup, BudgetConfig(quality_floor=floor, step_fraction=0.1))
    accepted = [t for t in result.trace if t.accepted]
    rejected = [t for t in result.trace if not t.accepted]
    assert len(accepted) >= 2, "the floor should allow at least one step on this model"
    assert all(t.quality.score >= floor for t in accepted)
    assert rejected and all(t.quality.score < floor for t in rejected)
    assert result.quality.score >= floor
    # The search removed both heads and neurons (it trades them by cost) and kept going while it could.
    last = accepted[-1]
    assert last.flops_removed > 0.05
    assert int((result.head_mask == 0).sum()) == last.heads_removed
    assert int((result.ffn_mask == 0).sum()) == last.ffn_removed


def test_quality_floor_with_caps(setup: tuple) -> None:
    result = _run(setup, BudgetConfig(quality_floor=0.5, head_fraction=0.25, step_fraction=0.1))
    assert int((result.head_mask == 0).sum()) == 3  # the cap, reached before the floor
    assert int((result.ffn_mask == 0).sum()) == 0  # ffn_fraction 0 excludes the pool


def test_unreachable_floor_raises_budget_error(setup: tuple) -> None:
    with pytest.raises(BudgetError, match=r"quality floor 0.99999 cannot be met.*lower --quality-floor"):
        _run(setup, BudgetConfig(quality_floor=0.99999, step_fraction=0.5, cost="count"))
