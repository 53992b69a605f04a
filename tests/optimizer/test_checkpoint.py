"""Pruned checkpoints survive a save/load round trip and refuse mismatched files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from pruneserve.optimizer.adapters import load_model, tokenize
from pruneserve.optimizer.checkpoint import load_pruned, save_pruned
from pruneserve.optimizer.errors import CheckpointError
from pruneserve.optimizer.pruning import PruningPlan, prune

TinyModelFactory = Callable[..., Path]
PLAN = PruningPlan(heads=[[1, 3], [], [0, 1, 2, 3]], ffn=[list(range(0, 64, 3)), list(range(64)), []])


@pytest.fixture()
def saved(tiny_model_dir: TinyModelFactory, tmp_path: Path):  # noqa: ANN201 - (loaded, pruned, folder)
    loaded = load_model(tiny_model_dir("roberta", "classification"))
    pruned = prune(loaded.encoder, PLAN)
    folder = save_pruned(pruned, tmp_path / "ckpt", plan=PLAN, record={"quality": 0.95},
                         tokenizer=loaded.tokenizer)
    return loaded, pruned, folder


def test_round_trip(saved, sample_texts: list[str]) -> None:  # noqa: ANN001
    loaded, pruned, folder = saved
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "pruning.json", "tokenizer.json"}
    restored, info = load_pruned(folder)
    assert restored.spec == pruned.spec and not restored.training
    assert info["plan"] == PLAN and info["record"] == {"quality": 0.95}
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, False)
    with torch.no_grad():
        assert torch.equal(restored(**batch), pruned(**batch))


def test_tampered_weights_are_refused(saved) -> None:  # noqa: ANN001
    _, _, folder = saved
    state = load_file(str(folder / "model.safetensors"))
    state["head.out.bias"] = state["head.out.bias"] + 1.0
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="sha256"):
        load_pruned(folder)


def test_spec_that_does_not_fit_the_weights(saved) -> None:  # noqa: ANN001
    _, _, folder = saved
    doc = json.loads((folder / "pruning.json").read_text())
    doc["spec"]["heads"] = [2, 1, 4]
    (folder / "pruning.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.q\.weight.*shape \(0, 32\).*\(8, 32\)"):
        load_pruned(folder)


def test_missing_file(saved) -> None:  # noqa: ANN001
    _, _, folder = saved
    (folder / "pruning.json").unlink()
    with pytest.raises(CheckpointError, match="pruning.json is missing"):
        load_pruned(folder)


def test_record_must_be_json(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    enc = load_model(tiny_model_dir("bert", "embedding")).encoder
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_pruned(enc, tmp_path, record={"tensor": torch.zeros(1)})
