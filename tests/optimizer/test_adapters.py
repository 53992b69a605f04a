"""Loading model folders: task detection, tokenizer set-up, metadata and every user error."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from pruneserve.optimizer.adapters import load_model, tokenize
from pruneserve.optimizer.errors import ModelLoadError

TinyModelFactory = Callable[..., Path]


def _copy(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_embedding_metadata(tiny_model_dir: TinyModelFactory) -> None:
    folder = tiny_model_dir("bert", "embedding")
    loaded = load_model(folder)
    assert loaded.task == "embedding" and loaded.labels == []
    spec = loaded.encoder.spec
    assert (spec.pooling, spec.normalize, spec.num_heads, spec.heads) == ("mean", True, 4, [4, 4, 4])
    assert not loaded.encoder.training
    assert loaded.source_sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.source_dir == folder.resolve()
    assert loaded.max_sequence_length == 64


def test_classification_labels(tiny_model_dir: TinyModelFactory) -> None:
    loaded = load_model(tiny_model_dir("distilbert", "classification", num_labels=2))
    assert loaded.task == "classification"
    assert loaded.labels == ["label_0", "label_1"]
    assert loaded.encoder.spec.num_labels == 2 and not loaded.encoder.uses_token_type_ids


def test_roberta_positions_limit_length(tiny_model_dir: TinyModelFactory) -> None:
    loaded = load_model(tiny_model_dir("roberta", "classification"))
    # 66 position rows, of which pad_token_id + 1 = 2 are never used by a real token.
    assert loaded.max_sequence_length == 64


def test_name_is_sanitised(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir("bert", "embedding"), tmp_path, "My Model (v2)")
    assert load_model(folder).name == "my-model-v2"


def test_plain_encoder_defaults_to_mean_pooling(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _copy(tiny_model_dir("bert", "embedding"), tmp_path)
    (folder / "modules.json").unlink()
    with caplog.at_level(logging.WARNING, logger="pruneserve.optimizer.adapters"):
        loaded = load_model(folder)
    assert loaded.task == "embedding"
    assert (loaded.encoder.spec.pooling, loaded.encoder.spec.normalize) == ("mean", False)
    assert "mean pooling" in caplog.text


def test_transformer_in_a_subfolder(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, sample_texts: list[str]
) -> None:
    src = tiny_model_dir("distilbert", "embedding")
    folder = _copy(src, tmp_path)
    (folder / "0_Transformer").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (folder / name).rename(folder / "0_Transformer" / name)
    modules = json.loads((folder / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (folder / "modules.json").write_text(json.dumps(modules))
    moved, original = load_model(folder), load_model(src)
    batch = tokenize(original.tokenizer, sample_texts, None, 64, False)
    with torch.no_grad():
        assert torch.equal(moved.encoder(**batch), original.encoder(**batch))


def test_tokenizer_padding_is_per_batch(tiny_model_dir: TinyModelFactory, sample_texts: list[str]) -> None:
    loaded = load_model(tiny_model_dir("roberta", "embedding"))
    batch = tokenize(loaded.tokenizer, sample_texts, None, 8, loaded.encoder.uses_token_type_ids)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape[1] == 8  # truncated to max_length
    short = tokenize(loaded.tokenizer, ["hello"], None, 64, False)
    assert short["input_ids"].shape[1] < 8  # padded to the longest text, not a fixed length
    assert short["input_ids"].dtype == torch.long
    padded = tokenize(loaded.tokenizer, ["hello", "hello there friend"], None, 64, False)
    assert padded["input_ids"][0, -1].item() == loaded.encoder.spec.pad_token_id == 1


def test_tokenize_rejects_mismatched_pairs(tiny_model_dir: TinyModelFactory) -> None:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    with pytest.raises(ValueError, match="2 texts but 1 text pairs"):
        tokenize(loaded.tokenizer, ["a", "b"], ["c"], 16, True)


def test_tokenizer_converted_when_no_tokenizer_json(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, sample_texts: list[str]
) -> None:
    src = tiny_model_dir("bert", "embedding")
    folder = _copy(src, tmp_path)
    (folder / "tokenizer.json").unlink()
    converted = load_model(folder)
    original = load_model(src)
    a = tokenize(converted.tokenizer, sample_texts, None, 64, True)
    b = tokenize(original.tokenizer, sample_texts, None, 64, True)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_missing_folder() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/nonexistent/model/folder")


def test_missing_config(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir("distilbert", "classification"), tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(folder)


def test_unsupported_model_type(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir("bert", "classification"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=r"'gpt2' is not supported.*bert, distilbert, roberta"):
        load_model(folder)


def test_missing_tokenizer(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir("bert", "embedding"), tmp_path)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_model(folder)


def test_pickle_weights_are_refused(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir("bert", "embedding"), tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle files are never loaded"):
        load_model(folder)


def test_unsupported_pooling(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dir("bert", "embedding"), tmp_path)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ModelLoadError, match="exactly one of cls, mean or max"):
        load_model(folder)


@pytest.mark.slow
def test_default_model_matches_sentence_transformers(sample_texts: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    from pruneserve.optimizer.adapters import default_model_dir

    loaded = load_model(None)
    assert loaded.name == "all-minilm-l6-v2" and loaded.task == "embedding"
    assert loaded.max_sequence_length == 256
    enc = loaded.encoder
    batch = tokenize(loaded.tokenizer, sample_texts, None, loaded.max_sequence_length, enc.uses_token_type_ids)
    with torch.no_grad():
        ours = enc(**batch)
    st = SentenceTransformer(str(default_model_dir()), device="cpu", local_files_only=True)
    theirs = torch.from_numpy(st.encode(sample_texts, convert_to_numpy=True, batch_size=len(sample_texts)))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
