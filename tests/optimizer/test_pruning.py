"""Physical pruning equals gating: the sliced model computes what the masked model computes."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from pruneserve.optimizer.adapters import LoadedModel, load_model, tokenize
from pruneserve.optimizer.pruning import PruningPlan, prune

TinyModelFactory = Callable[..., Path]

# (kept heads, kept FFN neurons) per layer of the tiny 3-layer, 4-head, FFN-64 models.
CASES = {
    "uneven heads": ([[0, 1, 2, 3], [1, 3], [2]], [list(range(64))] * 3),
    "emptied attention layer": ([[0, 2], [], [0, 1, 2, 3]], [list(range(64))] * 3),
    "pruned FFN": ([[0, 1, 2, 3]] * 3, [list(range(0, 64, 2)), list(range(50)), [7]]),
    "emptied FFN": ([[0, 1, 2, 3]] * 3, [list(range(64)), [], list(range(10, 40))]),
    "everything at once": ([[3], [], [0, 2]], [[], list(range(5, 60, 3)), [1, 2, 3]]),
}


def _batch(loaded: LoadedModel, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenize(loaded.tokenizer, texts, None, loaded.max_sequence_length, loaded.encoder.uses_token_type_ids)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_keeping_everything_is_bit_identical(
    tiny_model_dir: TinyModelFactory, sample_texts: list[str], arch: str
) -> None:
    loaded = load_model(tiny_model_dir(arch, "classification"))
    plan = PruningPlan.keep_all(loaded.encoder.spec)
    pruned = prune(loaded.encoder, plan)
    batch = _batch(loaded, sample_texts)
    with torch.no_grad():
        assert torch.equal(pruned(**batch), loaded.encoder(**batch))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("arch", "task"), [("bert", "embedding"), ("roberta", "classification"),
                                            ("distilbert", "embedding")])
def test_pruned_equals_gated(
    tiny_model_dir: TinyModelFactory, sample_texts: list[str], arch: str, task: str, case: str
) -> None:
    loaded = load_model(tiny_model_dir(arch, task))
    enc = loaded.encoder
    heads, ffn = CASES[case]
    plan = PruningPlan(heads=heads, ffn=ffn)
    head_mask, ffn_mask = plan.to_masks(enc.spec)
    pruned = prune(enc, plan)
    assert pruned.spec.heads == [len(h) for h in heads] and pruned.spec.ffn == [len(f) for f in ffn]
    assert [layer.attention.q.out_features for layer in pruned.layers] == [8 * len(h) for h in heads]
    batch = _batch(loaded, sample_texts)
    with torch.no_grad():
        gated = enc(**batch, head_gates=head_mask, ffn_gates=ffn_mask)
        physical = pruned(**batch)
        unpruned = enc(**batch)
    torch.testing.assert_close(physical, gated, atol=1e-4, rtol=0)
    # The case must actually change the model, or the comparison above proves nothing.
    assert (physical - unpruned).abs().max() > 1e-3


def test_prune_leaves_the_original_untouched(tiny_model_dir: TinyModelFactory, sample_texts: list[str]) -> None:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    before = {k: v.clone() for k, v in loaded.encoder.state_dict().items()}
    prune(loaded.encoder, PruningPlan(*CASES["everything at once"]))
    assert loaded.encoder.spec.heads == [4, 4, 4]
    assert all(torch.equal(before[k], v) for k, v in loaded.encoder.state_dict().items())


def test_pruning_twice_composes(tiny_model_dir: TinyModelFactory, sample_texts: list[str]) -> None:
    loaded = load_model(tiny_model_dir("bert", "classification"))
    first = prune(loaded.encoder, PruningPlan([[0, 1, 3], [0, 2, 3], [1, 2]], [list(range(0, 64, 2))] * 3))
    # Indices of the second plan count within the already-pruned layers.
    twice = prune(first, PruningPlan([[0, 2], [1], [0, 1]], [[0, 1, 31]] * 3))
    once = prune(loaded.encoder, PruningPlan([[0, 3], [2], [1, 2]], [[0, 2, 62]] * 3))
    batch = _batch(loaded, sample_texts)
    with torch.no_grad():
        torch.testing.assert_close(twice(**batch), once(**batch), atol=1e-6, rtol=0)


def test_pruned_model_accepts_ragged_gates(tiny_model_dir: TinyModelFactory, sample_texts: list[str]) -> None:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    pruned = prune(loaded.encoder, PruningPlan(*CASES["everything at once"]))
    gates = [torch.ones(h, requires_grad=True) for h in pruned.spec.heads]
    out = pruned(**_batch(loaded, sample_texts), head_gates=gates)
    out.sum().backward()
    assert gates[0].grad is not None and gates[0].grad.shape == (1,)


def test_plan_masks_and_json_round_trip(tiny_model_dir: TinyModelFactory) -> None:
    spec = load_model(tiny_model_dir("bert", "embedding")).encoder.spec
    plan = PruningPlan(*CASES["everything at once"])
    head_mask, ffn_mask = plan.to_masks(spec)
    assert head_mask.shape == (3, 4) and ffn_mask.shape == (3, 64)
    assert head_mask.sum() == 3 and ffn_mask[0].sum() == 0
    assert PruningPlan.from_masks(head_mask, ffn_mask) == plan
    assert PruningPlan.from_dict(plan.to_dict()) == plan
    assert plan.summary(spec).startswith("heads kept 3/12 per layer [1, 0, 2]")


@pytest.mark.parametrize(
    ("heads", "ffn", "message"),
    [
        ([[0, 4], [0], [0]], [[0]] * 3, "keeps head 4 but the layer has 4"),
        ([[0], [0], [0]], [[0], [64], [0]], "keeps FFN neuron 64"),
        ([[0], [0]], [[0], [0]], "covers 2 layers"),
    ],
)
def test_plan_must_fit_the_model(
    tiny_model_dir: TinyModelFactory, heads: list[list[int]], ffn: list[list[int]], message: str
) -> None:
    enc = load_model(tiny_model_dir("bert", "embedding")).encoder
    with pytest.raises(ValueError, match=message):
        prune(enc, PruningPlan(heads, ffn))


def test_plan_rejects_unsorted_or_duplicate_indices() -> None:
    with pytest.raises(ValueError, match="distinct, sorted"):
        PruningPlan([[1, 0]], [[0]])
    with pytest.raises(ValueError, match="distinct, sorted"):
        PruningPlan([[0]], [[2, 2]])
