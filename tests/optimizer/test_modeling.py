"""Our Encoder against the Hugging Face model it was copied from, and its gates."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from pruneserve.optimizer.adapters import load_model, tokenize
from pruneserve.optimizer.modeling import Encoder, EncoderSpec, head_flops, neuron_flops

TinyModelFactory = Callable[..., Path]
ARCH_TASKS = [(a, t) for a in ("bert", "roberta", "distilbert") for t in ("embedding", "classification")]


def _hf_model(folder: Path, task: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModel
    return auto.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()


@pytest.mark.parametrize(("arch", "task"), ARCH_TASKS)
def test_matches_hugging_face(tiny_model_dir: TinyModelFactory, sample_texts: list[str], arch: str, task: str) -> None:
    folder = tiny_model_dir(arch, task)
    loaded = load_model(folder)
    enc = loaded.encoder
    batch = tokenize(loaded.tokenizer, sample_texts, None, loaded.max_sequence_length, enc.uses_token_type_ids)
    assert batch["attention_mask"].min() == 0, "the sample must contain padding to test masking"
    hf = _hf_model(folder, task)
    with torch.no_grad():
        ours = enc(**batch)
        if task == "classification":
            theirs = hf(**batch).logits
        else:
            hidden = hf(**batch).last_hidden_state
            torch.testing.assert_close(enc.encode(**batch), hidden, atol=1e-5, rtol=0)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            theirs = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_bert_token_types_matter(tiny_model_dir: TinyModelFactory, sample_texts: list[str]) -> None:
    loaded = load_model(tiny_model_dir("bert", "classification"))
    assert loaded.encoder.uses_token_type_ids
    pairs = list(reversed(sample_texts))
    batch = tokenize(loaded.tokenizer, sample_texts, pairs, loaded.max_sequence_length, True)
    assert batch["token_type_ids"].max() == 1
    hf = _hf_model(loaded.source_dir, "classification")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(**batch), hf(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_other_poolings(tiny_model_dir: TinyModelFactory, sample_texts: list[str], pooling: str) -> None:
    loaded = load_model(tiny_model_dir("bert", "embedding", pooling=pooling, normalize=False))
    enc = loaded.encoder
    assert (enc.spec.pooling, enc.spec.normalize) == (pooling, False)
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, True)
    with torch.no_grad():
        hidden = enc.encode(**batch)
        out = enc(**batch)
    if pooling == "cls":
        expected = hidden[:, 0]
    else:
        expected = torch.stack([h[m.bool()].max(0).values for h, m in zip(hidden, batch["attention_mask"])])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_gates_of_ones_change_nothing_and_carry_gradients(
    tiny_model_dir: TinyModelFactory, sample_texts: list[str]
) -> None:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    enc, spec = loaded.encoder, loaded.encoder.spec
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, True)
    head_gates = torch.ones(spec.num_layers, spec.num_heads, requires_grad=True)
    ffn_gates = torch.ones(spec.num_layers, spec.intermediate_size, requires_grad=True)
    gated = enc(**batch, head_gates=head_gates, ffn_gates=ffn_gates)
    with torch.no_grad():
        plain = enc(**batch)
    torch.testing.assert_close(gated, plain, atol=1e-6, rtol=0)
    gated.pow(2).sum().backward()
    assert head_gates.grad is not None and ffn_gates.grad is not None
    assert head_gates.grad.abs().min() > 0 and ffn_gates.grad.abs().sum() > 0


def test_zero_gate_silences_a_head(tiny_model_dir: TinyModelFactory, sample_texts: list[str]) -> None:
    loaded = load_model(tiny_model_dir("bert", "embedding"))
    enc, spec = loaded.encoder, loaded.encoder.spec
    batch = tokenize(loaded.tokenizer, sample_texts, None, 64, True)
    gates = torch.ones(spec.num_layers, spec.num_heads)
    gates[1, 2] = 0.0
    with torch.no_grad():
        assert (enc(**batch, head_gates=gates) - enc(**batch)).abs().max() > 1e-3


def test_gate_shapes_are_checked(tiny_model_dir: TinyModelFactory) -> None:
    enc = load_model(tiny_model_dir("bert", "embedding")).encoder
    ids = torch.tensor([[2, 10, 3]])
    with pytest.raises(ValueError, match="layer 0 has 3 entries"):
        enc(ids, torch.ones_like(ids), head_gates=torch.ones(3, 3))
    with pytest.raises(ValueError, match="cover 2 layers"):
        enc(ids, torch.ones_like(ids), ffn_gates=torch.ones(2, 64))


def test_spec_round_trip_and_validation(tiny_model_dir: TinyModelFactory) -> None:
    spec = load_model(tiny_model_dir("roberta", "classification")).encoder.spec
    assert spec.position_offset == 2 and spec.type_vocab_size == 0 and spec.classifier == "roberta"
    assert EncoderSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="kept heads"):
        EncoderSpec.from_dict({**spec.to_dict(), "heads": [5, 4, 4]})
    with pytest.raises(ValueError, match="unknown encoder spec field"):
        EncoderSpec.from_dict({**spec.to_dict(), "colour": "red"})


def test_flops_count_heads_and_neurons(tiny_model_dir: TinyModelFactory) -> None:
    spec = load_model(tiny_model_dir("bert", "embedding")).encoder.spec
    full = Encoder(spec).flops(16)
    assert full == spec.num_layers * (4 * head_flops(spec, 16) + 64 * neuron_flops(spec, 16))
    smaller = Encoder(EncoderSpec.from_dict({**spec.to_dict(), "heads": [4, 0, 2], "ffn": [64, 10, 0]}))
    assert full - smaller.flops(16) == 6 * head_flops(spec, 16) + 118 * neuron_flops(spec, 16)
