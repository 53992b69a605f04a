"""On the real default model the scores rank heads: lowest-scored < random < highest-scored damage."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pruneserve.optimizer.adapters import load_model
from pruneserve.optimizer.config import DataConfig, ImportanceConfig
from pruneserve.optimizer.importance import compute_importance
from pruneserve.optimizer.pruner import prepare_data
from pruneserve.optimizer.quality import fidelity, teacher_outputs

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mask_without(indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.ones(shape[0] * shape[1])
    mask[indices] = 0
    return mask.view(shape)


def test_low_scored_heads_matter_least() -> None:
    loaded = load_model(None)
    # 256 texts: 128 to score, 128 held out to measure (small, so the test stays well under a minute).
    _, score, evaluation = prepare_data(loaded, DataConfig(max_examples=256, eval_fraction=0.5, max_length=64))
    scores = compute_importance(loaded.encoder, score, ImportanceConfig()).heads
    teacher = teacher_outputs(loaded.encoder, evaluation)
    shape = tuple(scores.shape)
    quarter = scores.numel() // 4  # 18 of 72 heads

    def cosine(mask: torch.Tensor) -> float:
        quality = fidelity(loaded.encoder, teacher, evaluation, head_gates=mask)
        assert quality.mean_cosine is not None
        return quality.mean_cosine

    order = scores.flatten().argsort()
    lowest = cosine(_mask_without(order[:quarter], shape))
    highest = cosine(_mask_without(order[-quarter:], shape))
    generator = torch.Generator().manual_seed(0)
    randoms = [cosine(_mask_without(torch.randperm(scores.numel(), generator=generator)[:quarter], shape))
               for _ in range(3)]
    random_mean = sum(randoms) / len(randoms)
    assert lowest > random_mean > highest, (lowest, randoms, highest)
    assert lowest > max(randoms)
