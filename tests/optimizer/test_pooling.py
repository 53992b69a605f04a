"""Pooling and normalisation are explicit: chosen by flag or by the folder, warned about when
defaulted, computed by the exported (and fused) graph, recorded in the checkpoint, and the
importance ranking's flag no longer shares their name."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pruneserve.cli import build_parser
from pruneserve.engines.ort import inference_session
from pruneserve.optimizer.adapters import load_model, tokenize
from pruneserve.optimizer.checkpoint import load_pruned, save_pruned
from pruneserve.optimizer.errors import ConfigError
from pruneserve.optimizer.export import check_parity, export_onnx
from pruneserve.optimizer.fusion import fuse

TinyModelFactory = Callable[..., Path]
ADAPTERS_LOGGER = "pruneserve.optimizer.adapters"


def _plain_bert(tiny_model_dir: TinyModelFactory, tmp_path: Path) -> Path:
    """A plain ``BertModel`` folder: the tiny model without its sentence-transformers files."""
    folder = tmp_path / "plain-bert"
    shutil.copytree(tiny_model_dir("bert", "embedding"), folder)
    (folder / "modules.json").unlink()
    (folder / "sentence_bert_config.json").unlink()
    shutil.rmtree(folder / "1_Pooling")
    shutil.rmtree(folder / "2_Normalize")
    return folder


def _feeds(batch: dict[str, torch.Tensor], session) -> dict[str, np.ndarray]:  # noqa: ANN001 - an ORT session
    return {i.name: batch[i.name].numpy() for i in session.get_inputs()}


def test_plain_folder_gets_the_default_with_a_warning_naming_the_flags(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _plain_bert(tiny_model_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger=ADAPTERS_LOGGER):
        loaded = load_model(folder)
    assert (loaded.pooling, loaded.normalize) == ("mean", False)
    assert (loaded.encoder.spec.pooling, loaded.encoder.spec.normalize) == ("mean", False)
    warned = [r.getMessage() for r in caplog.records if "does not say how to pool" in r.getMessage()]
    assert len(warned) == 1
    assert "mean pooling and no normalisation" in warned[0]
    assert "--pooling mean|cls|max" in warned[0] and "--normalize/--no-normalize" in warned[0]


def test_a_flag_for_one_leaves_only_the_other_to_warn_about(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _plain_bert(tiny_model_dir, tmp_path)
    with caplog.at_level(logging.WARNING, logger=ADAPTERS_LOGGER):
        loaded = load_model(folder, pooling="max")
    assert (loaded.pooling, loaded.normalize) == ("max", False)
    warned = [r.getMessage() for r in caplog.records if "does not say how to pool" in r.getMessage()]
    assert len(warned) == 1 and "--normalize/--no-normalize" in warned[0] and "--pooling" not in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ADAPTERS_LOGGER):
        load_model(folder, pooling="cls", normalize=True)
    assert not [r for r in caplog.records if "does not say how to pool" in r.getMessage()]


def test_cls_and_normalize_give_unit_norm_embeddings_equal_to_the_torch_reference(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, sample_texts: list[str]
) -> None:
    from transformers import AutoModel

    folder = _plain_bert(tiny_model_dir, tmp_path)
    loaded = load_model(folder, pooling="cls", normalize=True)
    assert (loaded.pooling, loaded.normalize) == ("cls", True)
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, True)
    reference = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True).eval()
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    expected = F.normalize(hidden[:, 0], dim=1).numpy()  # the CLS token, L2-normalised

    exported = export_onnx(loaded.encoder, tmp_path / "raw.onnx").path
    fused = fuse(exported, tmp_path / "fused.onnx", loaded.encoder.spec)
    assert fused.counts["Attention"] == 3 and fused.counts["EmbedLayerNormalization"] == 1
    for path in (exported, fused.path):
        session = inference_session(path)
        got = session.run(None, _feeds(batch, session))[0]
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_max_pooling_ignores_padding_in_the_exported_and_fused_graph(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, sample_texts: list[str], normalize: bool
) -> None:
    loaded = load_model(_plain_bert(tiny_model_dir, tmp_path), pooling="max", normalize=normalize)
    exported = export_onnx(loaded.encoder, tmp_path / "raw.onnx").path
    fused = fuse(exported, tmp_path / "fused.onnx", loaded.encoder.spec)
    assert fused.counts["Attention"] == 3 and fused.counts["SkipLayerNormalization"] == 6
    padded = tokenize(loaded.tokenizer, sample_texts, None, 64, True)
    assert (padded["attention_mask"] == 0).any()  # the batch really is padded
    check_parity(loaded.encoder, fused.path, [padded], atol=1e-4)
    for path in (exported, fused.path):
        session = inference_session(path)
        together = session.run(None, _feeds(padded, session))[0]
        for row, text in enumerate(sample_texts):
            alone = session.run(None, _feeds(tokenize(loaded.tokenizer, [text], None, 64, True), session))[0]
            np.testing.assert_allclose(together[row], alone[0], atol=1e-5, err_msg=f"{path.name}: {text!r}")


def test_a_sentence_transformers_folder_keeps_its_config_unless_a_flag_overrides_it(
    tiny_model_dir: TinyModelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tiny_model_dir("bert", "embedding", pooling="cls", normalize=True)
    with caplog.at_level(logging.WARNING, logger=ADAPTERS_LOGGER):
        assert (load_model(folder).pooling, load_model(folder).normalize) == ("cls", True)
    assert not [r for r in caplog.records if "does not say how to pool" in r.getMessage()]
    assert (load_model(folder, pooling="max").pooling, load_model(folder, pooling="max").normalize) == ("max", True)
    overridden = load_model(folder, normalize=False)
    assert (overridden.pooling, overridden.normalize) == ("cls", False)
    assert (overridden.encoder.spec.pooling, overridden.encoder.spec.normalize) == ("cls", False)


def test_pooling_flags_for_a_classifier_or_a_bad_value_are_refused(tiny_model_dir: TinyModelFactory) -> None:
    classifier = tiny_model_dir("bert", "classification")
    assert (load_model(classifier).pooling, load_model(classifier).normalize) == (None, None)
    with pytest.raises(ConfigError, match=r"classification model.*--pooling apply to embedding models only"):
        load_model(classifier, pooling="cls")
    with pytest.raises(ConfigError, match=r"--normalize/--no-normalize apply to embedding models only"):
        load_model(classifier, normalize=False)
    with pytest.raises(ConfigError, match=r"pooling 'sum' is not supported; pass --pooling mean or cls or max"):
        load_model(tiny_model_dir("bert", "embedding"), pooling="sum")


def test_the_pruned_checkpoint_records_the_choice(
    tiny_model_dir: TinyModelFactory, tmp_path: Path, sample_texts: list[str]
) -> None:
    loaded = load_model(_plain_bert(tiny_model_dir, tmp_path), pooling="max", normalize=True)
    save_pruned(loaded.encoder, tmp_path / "pruned", record={}, tokenizer=loaded.tokenizer)
    encoder, document = load_pruned(tmp_path / "pruned")
    assert (document["spec"]["pooling"], document["spec"]["normalize"]) == ("max", True)
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch), loaded.encoder(**batch))


def _parse(*argv: str):  # noqa: ANN202 - an argparse.Namespace
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", ["score", "prune", "optimize"])
def test_the_flags_parse_on_every_command(command: str) -> None:
    args = _parse(command, "--out", "x")
    assert (args.pooling, args.normalize_embeddings) == (None, None)  # unset: the folder decides
    args = _parse(command, "--out", "x", "--pooling", "cls", "--normalize")
    assert (args.pooling, args.normalize_embeddings) == ("cls", True)
    assert _parse(command, "--out", "x", "--no-normalize").normalize_embeddings is False


def test_the_renamed_importance_flag_reaches_the_config() -> None:
    from pruneserve.optimizer.commands_prune import build_prune_config

    args = _parse("prune", "--out", "x", "--head-ranking", "layer", "--normalize")
    assert build_prune_config(args).importance.normalize == "layer"
    assert args.normalize_embeddings is True
    assert build_prune_config(_parse("prune", "--out", "x")).importance.normalize == "global"


@pytest.mark.parametrize("old", [["--normalize", "layer"], ["--normalize=global"]])
@pytest.mark.parametrize("command", ["score", "prune", "optimize"])
def test_the_old_importance_spelling_names_the_new_flag(
    command: str, old: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse(command, "--out", "x", *old)
    assert exc.value.code == 2
    value = old[-1].rpartition("=")[2]
    assert f"use --head-ranking {value}" in capsys.readouterr().err
