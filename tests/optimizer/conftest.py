"""Shared fixtures for the optimizer tests: tiny random Hugging Face model folders and sample texts.

``tiny_model_dir(arch, task, ...)`` writes (once per session and argument set) a complete local
model folder that :func:`pruneserve.optimizer.adapters.load_model` and transformers' Auto
classes can read, with no download:

* ``arch``: ``"bert"`` (WordPiece, token types), ``"roberta"`` (byte-level BPE, offset
  positions, pad id 1) or ``"distilbert"`` (WordPiece, no token types);
* ``task="embedding"``: the base model plus a sentence-transformers ``modules.json``,
  ``1_Pooling/config.json`` (``pooling``) and, if ``normalize``, a Normalize module;
* ``task="classification"``: ``*ForSequenceClassification`` with ``num_labels`` labels
  named ``label_0``, ``label_1``, ...

Defaults: 3 layers, 4 heads, hidden 32, FFN 64, 64 positions. Weights are random with a
large spread (std 0.2, LayerNorm gains around 1) so that pruning visibly changes outputs.
The folders are shared across the session: treat them as read-only and copy one
(``shutil.copytree``) before changing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning attention heads makes encoders faster.",
    "hello",
    "A longer sentence about serving pruned transformer models over gRPC with dynamic batching, "
    "tokenization on the server and metrics for every request.",
    "Python's standard library documents the json module.",
    "Short text.",
    "ONNX Runtime fuses attention when the graph shows the head count.",
    "What is the weather like today in the mountains?",
]

_WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]

TinyModelFactory = Callable[..., Path]


def _train_corpus() -> list[str]:
    return SAMPLE_TEXTS * 4 + [
        "the of and to in is was for on that with as by at from",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
    ]


def _wordpiece_tokenizer(folder: Path) -> int:
    """Train a tiny uncased BERT WordPiece tokenizer; write tokenizer.json, vocab.txt, tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        _train_corpus(), trainers.WordPieceTrainer(vocab_size=200, special_tokens=_WORDPIECE_SPECIALS)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.save(str(folder / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}),
        encoding="utf-8",
    )
    return tok.get_vocab_size()


def _bpe_tokenizer(folder: Path) -> int:
    """Train a tiny byte-level BPE (RoBERTa style, <pad> = 1); write tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        _train_corpus(),
        trainers.BpeTrainer(
            vocab_size=320, special_tokens=_BPE_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "RobertaTokenizer", "model_max_length": 512}), encoding="utf-8"
    )
    return tok.get_vocab_size()


def _hf_config(arch: str, vocab_size: int, num_layers: int, num_heads: int, hidden_size: int,
               intermediate_size: int, max_positions: int, hidden_act: str):  # noqa: ANN202 - a transformers config
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    if arch == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, intermediate_size=intermediate_size, hidden_act=hidden_act,
            max_position_embeddings=max_positions, type_vocab_size=2, pad_token_id=0,
        )
    if arch == "roberta":
        return RobertaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, intermediate_size=intermediate_size, hidden_act=hidden_act,
            max_position_embeddings=max_positions + 2, type_vocab_size=1, pad_token_id=1,
            bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
        )
    if arch == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab_size, dim=hidden_size, n_layers=num_layers, n_heads=num_heads,
            hidden_dim=intermediate_size, activation=hidden_act, max_position_embeddings=max_positions,
            pad_token_id=0,
        )
    raise ValueError(f"unknown tiny arch {arch!r}")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Spread the weights out so that every head and neuron matters measurably."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "LayerNorm" in name or "layer_norm" in name:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                param.copy_(0.2 * noise)


def write_tiny_model(
    folder: Path,
    arch: str = "bert",
    task: str = "embedding",
    *,
    num_layers: int = 3,
    num_heads: int = 4,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    max_positions: int = 64,
    num_labels: int = 3,
    pooling: str = "mean",
    normalize: bool = True,
    hidden_act: str = "gelu",
    seed: int = 0,
) -> Path:
    """Write one tiny random model folder (see the module docstring) and return it."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _bpe_tokenizer(folder) if arch == "roberta" else _wordpiece_tokenizer(folder)
    config = _hf_config(arch, vocab_size, num_layers, num_heads, hidden_size, intermediate_size,
                        max_positions, hidden_act)
    torch.manual_seed(seed)
    if task == "classification":
        config.num_labels = num_labels
        config.id2label = {i: f"label_{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = AutoModelForSequenceClassification.from_config(config)
    elif task == "embedding":
        model = AutoModel.from_config(config)
    else:
        raise ValueError(f"unknown tiny task {task!r}")
    _randomise(model, seed)
    model.save_pretrained(str(folder), safe_serialization=True)

    if task == "embedding":
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (folder / "2_Normalize").mkdir(exist_ok=True)
        (folder / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        }), encoding="utf-8")
        (folder / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_positions, "do_lower_case": False}), encoding="utf-8"
        )
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Factory ``tiny_model_dir(arch="bert", task="embedding", **options) -> Path`` (cached per session).

    Options are :func:`write_tiny_model`'s keyword arguments. The returned folder is shared: do
    not modify it in place.
    """
    cache: dict[tuple, Path] = {}

    def make(arch: str = "bert", task: str = "embedding", **options: object) -> Path:
        key = (arch, task, tuple(sorted(options.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}-{task}")
            cache[key] = write_tiny_model(folder, arch, task, **options)  # type: ignore[arg-type]
        return cache[key]

    return make


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """Eight short English texts of varied length (1 to ~30 tokens)."""
    return list(SAMPLE_TEXTS)

