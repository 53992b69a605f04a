"""Tokenization and the servable model: turning a validated request into model outputs. No gRPC here.

Three layers, each replaceable on its own:

* An :class:`~pruneserve.engines.Engine` (``pruneserve.engines``: ONNX Runtime, OpenVINO,
  registered by name in ``pruneserve.engines.ENGINES``) runs a graph on named numpy feeds;
  this module only chooses which (:func:`resolve_engine_name`) and builds it (:func:`create_engine`).
* :class:`TextProcessor` owns the artifact's ``tokenizer.json`` (``tokenizers``, server-side)
  and the checks on pre-tokenized ids: length limits, vocabulary range, UTF-8.
* :class:`ModelRuntime` binds an artifact's manifest, engine and processor: it validates a
  request into a :class:`Prepared` (on the caller's time, before batching, so a bad request
  never fails its batch-mates), runs a batch of them (:meth:`ModelRuntime.execute`, in a
  worker thread), and turns raw outputs into typed outputs (``label`` is derived here from
  ``manifest.labels[argmax(logits)]``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pruneserve import engines
from pruneserve.artifact import Artifact, Manifest
from pruneserve.engines import ONNXRUNTIME, OPENVINO, Engine, EngineLoadError, EngineOptions
from pruneserve.engines.facts import InvarianceFact, batch_invariance_fact
from pruneserve.engines.openvino import openvino_available
from pruneserve.server.config import ServeConfig
from pruneserve.server.errors import InvalidArgumentError, ModelLoadError
from pruneserve.server.types import InferInput, InferOutput, InferRequest, TensorSpec

logger = logging.getLogger(__name__)

#: Name of the raw-text input of every text model.
TEXT_INPUT = "text"
#: Output derived by the server from ``logits`` for classifiers.
LABEL_OUTPUT = "label"
_INT_DATATYPES = ("INT64", "INT32")


# =========================================================================================
# Engine choice (the engines themselves live in pruneserve.engines)
# =========================================================================================
def resolve_engine_name(config_engine: str, manifest: Manifest) -> str:
    """The engine to use: the config's choice, or with ``auto`` the artifact's recommendation.

    ``auto`` follows the manifest's ``runtime.engine`` when this process can run it, and
    otherwise falls back to ONNX Runtime, which runs every artifact.
    """
    if config_engine != "auto":
        return config_engine
    recommended = str(manifest.runtime.get("engine", ONNXRUNTIME))
    if recommended == OPENVINO and not openvino_available():
        logger.warning("model %s recommends engine 'openvino', which is not installed; using onnxruntime", manifest.name)
        return ONNXRUNTIME
    return recommended if recommended in engines.ENGINES else ONNXRUNTIME


def create_engine(
    name: str, model_path: str | Path, options: EngineOptions, input_names: Sequence[str], manifest: Manifest | None = None
) -> Engine:
    """Build the named engine (:func:`pruneserve.engines.create_engine`); its load errors become :class:`ModelLoadError`."""
    try:
        return engines.create_engine(name, model_path, options, input_names, manifest)
    except EngineLoadError as exc:
        raise ModelLoadError(str(exc)) from None


# =========================================================================================
# Tokenization and input validation
# =========================================================================================
@dataclass
class Encoded:
    """Token sequences of one request, padded to the request's own longest sequence."""

    input_ids: np.ndarray  # int64 [n, length]
    attention_mask: np.ndarray  # int64 [n, length]
    token_type_ids: np.ndarray | None  # int64 [n, length] or None

    @property
    def size(self) -> int:
        """Number of items (rows)."""
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        """Padded sequence length of this request."""
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        """Real (unmasked) tokens."""
        return int(self.attention_mask.sum())


class TextProcessor:
    """Server-side tokenization with the artifact's ``tokenizer.json`` and id validation.

    Args:
        tokenizer_path: the ``tokenizers`` JSON file, or None for an artifact that accepts
            pre-tokenized ids only.
        max_length: longest sequence (special tokens included) the model accepts.
        truncate: cut longer texts to ``max_length`` instead of refusing them.
        with_token_types: whether the graph takes ``token_type_ids``.
    """

    def __init__(self, tokenizer_path: Path | None, max_length: int, truncate: bool, with_token_types: bool) -> None:
        self.max_length = max_length
        self.truncate = truncate
        self.with_token_types = with_token_types
        self._tokenizer = None
        self._truncating = None
        self.pad_id = 0
        self.vocab_size: int | None = None
        if tokenizer_path is not None:
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(tokenizer_path))
                trunc = Tokenizer.from_file(str(tokenizer_path))
            except Exception as exc:  # tokenizers raises untyped errors for bad files
                raise ModelLoadError(f"tokenizer {tokenizer_path.name} cannot be read: {exc}") from None
            # The processor pads and truncates itself (per request, to the request's longest).
            tok.no_padding()
            tok.no_truncation()
            trunc.no_padding()
            trunc.enable_truncation(max_length)
            self._tokenizer, self._truncating = tok, trunc
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
            self.pad_id = self._find_pad_id(tok, tokenizer_path)

    @staticmethod
    def _find_pad_id(tok: Any, path: Path) -> int:
        import json

        try:
            padding = json.loads(path.read_text(encoding="utf-8")).get("padding") or {}
        except (OSError, ValueError):
            padding = {}
        if isinstance(padding, dict) and isinstance(padding.get("pad_id"), int):
            return int(padding["pad_id"])
        for token in ("[PAD]", "<pad>", "<PAD>"):
            tid = tok.token_to_id(token)
            if tid is not None:
                return int(tid)
        return 0

    @property
    def accepts_text(self) -> bool:
        """Whether raw text can be sent (the artifact has a tokenizer)."""
        return self._tokenizer is not None

    def encode_texts(self, raw: Sequence[Any]) -> Encoded:
        """Tokenize UTF-8 byte strings; refuses non-UTF-8, and over-long texts unless truncating."""
        if self._tokenizer is None:
            raise InvalidArgumentError(
                "this model has no tokenizer; send pre-tokenized 'input_ids' and 'attention_mask' (INT64)"
            )
        texts: list[str] = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                texts.append(item)
                continue
            if not isinstance(item, (bytes, bytearray, memoryview)):
                raise InvalidArgumentError(f"text[{i}] is {type(item).__name__}; send UTF-8 bytes")
            try:
                texts.append(bytes(item).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidArgumentError(
                    f"text[{i}] is not valid UTF-8 (byte {exc.start}); encode the text as UTF-8"
                ) from None
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = list(encode(texts))
        too_long = [i for i, e in enumerate(encodings) if len(e.ids) > self.max_length]
        if too_long:
            if not self.truncate:
                i = too_long[0]
                raise InvalidArgumentError(
                    f"text[{i}] is {len(encodings[i].ids)} tokens but this model accepts at most "
                    f"{self.max_length}; shorten it or start the server with truncation enabled"
                )
            assert self._truncating is not None
            redone = self._truncating.encode_batch([texts[i] for i in too_long])
            for i, e in zip(too_long, redone):
                encodings[i] = e
        length = max((len(e.ids) for e in encodings), default=0)
        n = len(encodings)
        ids = np.full((n, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.int64)
        types = np.zeros((n, length), dtype=np.int64) if self.with_token_types else None
        for row, e in enumerate(encodings):
            k = len(e.ids)
            ids[row, :k] = e.ids
            mask[row, :k] = 1
            if types is not None:
                types[row, :k] = e.type_ids
        return Encoded(ids, mask, types)

    def check_ids(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None, token_type_ids: np.ndarray | None
    ) -> Encoded:
        """Validate pre-tokenized ``[batch, sequence]`` arrays and drop all-padding tail columns."""
        n, length = input_ids.shape
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if arr is not None and arr.shape != input_ids.shape:
                raise InvalidArgumentError(
                    f"{name} has shape {list(arr.shape)} but input_ids has {list(input_ids.shape)}; they must match"
                )
        if attention_mask.size and not np.isin(attention_mask, (0, 1)).all():
            raise InvalidArgumentError("attention_mask must contain only 0 and 1")
        if n and length and (attention_mask.sum(axis=1) == 0).any():
            row = int(np.flatnonzero(attention_mask.sum(axis=1) == 0)[0])
            raise InvalidArgumentError(f"row {row} of attention_mask is all zeros; every sequence needs a token")
        # Trailing columns that are padding in every row carry no information; dropping them
        # keeps a client's own padding from pushing the request into a longer bucket.
        used = np.flatnonzero(attention_mask.any(axis=0))
        keep = int(used[-1]) + 1 if used.size else length
        input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
        if token_type_ids is not None:
            token_type_ids = token_type_ids[:, :keep]
        if keep > self.max_length:
            raise InvalidArgumentError(
                f"input_ids has {keep} tokens per sequence but this model accepts at most {self.max_length}; shorten the input"
            )
        if self.vocab_size is not None and input_ids.size:
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise InvalidArgumentError(
                    f"input_ids contains {bad}, outside this model's vocabulary [0, {self.vocab_size - 1}]"
                )
        if token_type_ids is not None and token_type_ids.size and (token_type_ids.min() < 0 or token_type_ids.max() > 1):
            raise InvalidArgumentError("token_type_ids must contain only 0 and 1")
        if self.with_token_types and token_type_ids is None:
            token_type_ids = np.zeros_like(input_ids)
        if not self.with_token_types:
            token_type_ids = None
        return Encoded(
            np.ascontiguousarray(input_ids, dtype=np.int64),
            np.ascontiguousarray(attention_mask, dtype=np.int64),
            None if token_type_ids is None else np.ascontiguousarray(token_type_ids, dtype=np.int64),
        )


# =========================================================================================
# A servable model: manifest + engine + processor
# =========================================================================================
@dataclass
class Prepared:
    """A validated, tokenized request, ready to be batched."""

    encoded: Encoded
    #: Outputs to return, in the order the client asked (all when it asked for none).
    outputs: list[str]
    #: Whether the text input was ``[n]`` rather than ``[n, 1]`` (kept for the reply's shapes).
    flat_text: bool = False

    @property
    def size(self) -> int:
        return self.encoded.size

    @property
    def length(self) -> int:
        return self.encoded.length


@dataclass
class ExecutionTimes:
    """Nanoseconds spent assembling inputs, in the engine, and splitting outputs."""

    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0

    @property
    def total_ns(self) -> int:
        return self.input_ns + self.infer_ns + self.output_ns


@dataclass
class ModelRuntime:
    """Everything needed to serve one artifact version, independent of transport and batching."""

    name: str
    version: str
    artifact: Artifact
    engine: Engine
    processor: TextProcessor
    max_sequence_length: int
    info: dict[str, str] = field(default_factory=dict)
    #: The unpruned reference graph, loaded only when shadow traffic is on.
    reference: Engine | None = None
    #: Whether answers are independent of batch-mates on this engine, and how that is known
    #: (set by :meth:`load`; None: the artifact's claim at the graph's own precision).
    invariance: InvarianceFact | None = None

    @classmethod
    def load(
        cls, artifact: Artifact, config: ServeConfig, *, name: str | None = None, version: str | None = None
    ) -> ModelRuntime:
        """Create the engine and tokenizer of a verified artifact.

        ``name`` and ``version`` override the manifest's (a model repository's folder names
        are the model's name and version, whatever the manifest says).
        """
        m = artifact.manifest
        max_len = m.max_sequence_length
        if config.max_sequence_length is not None:
            if config.max_sequence_length > m.max_sequence_length:
                logger.warning(
                    "max_sequence_length %d exceeds model %s's limit %d; using %d",
                    config.max_sequence_length, m.name, m.max_sequence_length, m.max_sequence_length,
                )
            max_len = min(max_len, config.max_sequence_length)
        engine_name = resolve_engine_name(config.engine, m)
        engine = create_engine(engine_name, artifact.model_path, EngineOptions.from_config(config, max_len), m.inputs, m)
        graph_inputs = set(getattr(engine, "input_names", m.inputs))
        if graph_inputs != set(m.inputs):
            raise ModelLoadError(
                f"model {m.name}: the graph's inputs {sorted(graph_inputs)} differ from the manifest's {sorted(m.inputs)}"
            )
        graph_outputs = set(getattr(engine, "output_names", m.output_names))
        if not set(m.output_names) <= graph_outputs:
            raise ModelLoadError(
                f"model {m.name}: the manifest's outputs {m.output_names} are not all in the graph ({sorted(graph_outputs)})"
            )
        processor = TextProcessor(artifact.tokenizer_path, max_len, config.truncate, "token_type_ids" in m.inputs)
        rt = cls(name or m.name, version or str(m.version), artifact, engine, processor, max_len)
        # The fact for the engine and precision actually compiled, not the recommended one's.
        rt.invariance = batch_invariance_fact(
            m, engine, probe=config.probe_invariance, vocab_size=processor.vocab_size
        )
        rt.info = rt._describe(engine)
        if config.shadow_rate > 0 and artifact.reference_path is not None:
            # CPU, one intra-op thread: ORT then computes on the calling thread (the shadow
            # worker, which runs at low priority) and never competes for the accelerator.
            ref_options = dataclasses.replace(
                EngineOptions.from_config(config, max_len), providers=("cpu",), threads=1, intra_op_spinning="off"
            )
            rt.reference = create_engine(ONNXRUNTIME, artifact.reference_path, ref_options, m.inputs)
        elif config.shadow_rate > 0:
            logger.warning(
                "model %s version %s has no reference model (manifest.reference_file); its live fidelity is not "
                "measured. Re-run `pruneserve optimize --with-reference` to ship one",
                m.name, m.version,
            )
        return rt

    # -- description -----------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def batch_invariant(self) -> bool:
        """Whether answers are independent of batch-mates on the engine and precision served.

        The optimizer's measurement for :attr:`Engine.key <pruneserve.engines.Engine.key>`
        when the manifest has one, else a probe at load (``probe_invariance``), else the
        artifact's claim kept only at the graph's own precision (:attr:`invariance`).
        """
        if self.invariance is not None:
            return self.invariance.invariant
        return bool(self.manifest.batch_invariant) and self.engine.exact

    @property
    def output_names(self) -> list[str]:
        """Outputs a client may request: the graph's, plus ``label`` for classifiers."""
        names = list(self.manifest.output_names)
        if self.manifest.task == "classification":
            names.append(LABEL_OUTPUT)
        return names

    def _describe(self, engine: Engine) -> dict[str, str]:
        m = self.manifest
        info = dict(engine.describe())
        quant = m.quantization
        info.update(
            task=m.task,
            quantization=str(quant.get("mode") or quant.get("method") or ("yes" if quant else "none")),
            batch_invariant=str(self.batch_invariant).lower(),
            max_sequence_length=str(self.max_sequence_length),
            target=m.target,
        )
        info.update(_pruning_labels(m.pruning))
        info.setdefault("kept_heads", "")
        return info

    @functools.cached_property
    def input_names(self) -> frozenset[str]:
        """Names of the inputs a client may send (computed once: every request checks them)."""
        return frozenset(s.name for s in self.input_specs(with_batch=True))

    def input_specs(self, with_batch: bool) -> list[TensorSpec]:
        """The inputs a client can send: ``text``, or pre-tokenized ids (all optional)."""
        b = [-1] if with_batch else []
        specs = []
        if self.processor.accepts_text:
            specs.append(TensorSpec(TEXT_INPUT, "BYTES", [*b, 1], optional=True))
        for name in self.manifest.inputs:
            specs.append(TensorSpec(name, "INT64", [*b, -1], optional=True))
        return specs

    def output_specs(self, with_batch: bool) -> list[TensorSpec]:
        """The outputs a client can request."""
        b = [-1] if with_batch else []
        specs = [TensorSpec(o.name, o.datatype, [*b, *o.dims]) for o in self.manifest.outputs]
        if self.manifest.task == "classification":
            specs.append(TensorSpec(LABEL_OUTPUT, "BYTES", [*b, 1]))
        return specs

    # -- request validation (caller's time, before batching) -------------------------------
    def prepare(self, request: InferRequest, max_batch_size: int) -> Prepared:
        """Validate and tokenize one request; raises :class:`InvalidArgumentError`."""
        outputs = self._check_outputs(request.outputs)
        by_name: dict[str, InferInput] = {}
        for inp in request.inputs:
            if inp.name in by_name:
                raise InvalidArgumentError(f"input {inp.name!r} is given twice")
            by_name[inp.name] = inp
        known = self.input_names
        unknown = sorted(set(by_name) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown inputs {unknown}; model {self.name!r} accepts {sorted(known)}")
        flat = False
        if TEXT_INPUT in by_name:
            if len(by_name) > 1:
                raise InvalidArgumentError(
                    f"send either {TEXT_INPUT!r} or pre-tokenized ids, not both (got {sorted(by_name)})"
                )
            texts, flat = self._text_values(by_name[TEXT_INPUT])
            self._check_batch(len(texts), max_batch_size)
            encoded = self.processor.encode_texts(texts)
        elif "input_ids" in by_name:
            ids = self._int_matrix(by_name["input_ids"])
            self._check_batch(ids.shape[0], max_batch_size)
            mask = self._int_matrix(by_name["attention_mask"]) if "attention_mask" in by_name else None
            types = self._int_matrix(by_name["token_type_ids"]) if "token_type_ids" in by_name else None
            encoded = self.processor.check_ids(ids, mask, types)
        else:
            raise InvalidArgumentError(
                f"model {self.name!r} needs input {TEXT_INPUT!r} (BYTES [batch, 1]) or 'input_ids' (INT64 [batch, sequence])"
            )
        return Prepared(encoded, outputs, flat)

    def _check_outputs(self, requested: Sequence[str]) -> list[str]:
        valid = self.output_names
        if not requested:
            return valid
        unknown = [o for o in requested if o not in valid]
        if unknown:
            raise InvalidArgumentError(f"unknown outputs {unknown}; model {self.name!r} has {valid}")
        if len(set(requested)) != len(requested):
            raise InvalidArgumentError(f"outputs {list(requested)} names an output twice")
        return list(requested)

    @staticmethod
    def _check_batch(n: int, max_batch_size: int) -> None:
        if n < 1:
            raise InvalidArgumentError("the request has an empty batch; send at least one item")
        if n > max_batch_size:
            raise InvalidArgumentError(
                f"the request has {n} items but max_batch_size is {max_batch_size}; split it into smaller requests"
            )

    @staticmethod
    def _text_values(inp: InferInput) -> tuple[list[Any], bool]:
        if inp.datatype != "BYTES":
            raise InvalidArgumentError(f"input {TEXT_INPUT!r} must be BYTES, got {inp.datatype}")
        shape = tuple(int(d) for d in inp.shape)
        if len(shape) == 1:
            flat = True
        elif len(shape) == 2 and shape[1] == 1:
            flat = False
        else:
            raise InvalidArgumentError(f"input {TEXT_INPUT!r} has shape {list(shape)}; expected [batch] or [batch, 1]")
        data = np.asarray(inp.data, dtype=object)
        if data.size != math.prod(shape):
            raise InvalidArgumentError(
                f"input {TEXT_INPUT!r} declares shape {list(shape)} but carries {data.size} elements"
            )
        return list(data.reshape(-1)), flat

    @staticmethod
    def _int_matrix(inp: InferInput) -> np.ndarray:
        if inp.datatype not in _INT_DATATYPES:
            raise InvalidArgumentError(f"input {inp.name!r} must be INT64 (or INT32), got {inp.datatype}")
        shape = tuple(int(d) for d in inp.shape)
        if len(shape) != 2:
            raise InvalidArgumentError(f"input {inp.name!r} has shape {list(shape)}; expected [batch, sequence]")
        data = np.asarray(inp.data)
        if data.size != int(np.prod(shape)):
            raise InvalidArgumentError(f"input {inp.name!r} declares shape {list(shape)} but carries {data.size} elements")
        if data.dtype.kind not in "iu":
            raise InvalidArgumentError(f"input {inp.name!r} must hold integers, got {data.dtype}")
        return data.reshape(shape).astype(np.int64, copy=False)

    # -- execution (worker thread) ---------------------------------------------------------
    def graph_outputs_for(self, requested: Sequence[str]) -> list[str]:
        """Graph outputs needed to answer ``requested`` (``label`` needs ``logits``)."""
        names = {LABEL_OUTPUT: self.manifest.output_names[0]}
        return sorted({names.get(r, r) for r in requested})

    def execute(self, batch: Sequence[Prepared]) -> tuple[list[dict[str, np.ndarray]], ExecutionTimes]:
        """Run one batch: pad every request to the batch's longest sequence, run, split per request.

        Padding is masked inside the graph, so (for batch-invariant artifacts) a request's
        answer does not depend on its batch-mates up to floating-point rounding.
        """
        times = ExecutionTimes()
        t0 = time.perf_counter_ns()
        feeds = assemble_feeds([p.encoded for p in batch], self.processor.pad_id, self.manifest.inputs)
        wanted = sorted({o for p in batch for o in self.graph_outputs_for(p.outputs)})
        t1 = time.perf_counter_ns()
        raw = self.engine.run(feeds, wanted)
        t2 = time.perf_counter_ns()
        results: list[dict[str, np.ndarray]] = []
        start = 0
        for p in batch:
            stop = start + p.size
            results.append({k: v[start:stop] for k, v in raw.items()})
            start = stop
        t3 = time.perf_counter_ns()
        times.input_ns, times.infer_ns, times.output_ns = t1 - t0, t2 - t1, t3 - t2
        return results, times

    def make_outputs(self, prepared: Prepared, raw: Mapping[str, np.ndarray]) -> list[InferOutput]:
        """Typed outputs for one request, in the order it asked for them."""
        out: list[InferOutput] = []
        for name in prepared.outputs:
            if name == LABEL_OUTPUT:
                logits = raw[self.manifest.output_names[0]]
                labels = np.array([self.manifest.labels[int(i)].encode("utf-8") for i in logits.argmax(axis=-1)], dtype=object)
                arr = labels.reshape(-1) if prepared.flat_text else labels.reshape(-1, 1)
                out.append(InferOutput(name, "BYTES", tuple(arr.shape), arr))
            else:
                arr = np.ascontiguousarray(raw[name], dtype=np.float32)
                out.append(InferOutput(name, "FP32", tuple(arr.shape), arr))
        return out

    def warmup(self) -> None:
        """Run one tiny batch so a graph that loads but cannot run is refused before serving.

        It also moves the engine's first-run costs (memory arenas, kernel selection, a
        TensorRT engine build) out of the first real request.
        """
        if self.processor.accepts_text:
            encoded = self.processor.encode_texts([b"warm up"])
        else:
            ids = np.zeros((1, 2), dtype=np.int64)
            encoded = self.processor.check_ids(ids, np.ones_like(ids), None)
        prepared = Prepared(encoded, self.output_names)
        try:
            [raw], _ = self.execute([prepared])
            self.make_outputs(prepared, raw)
        except Exception as exc:  # any engine failure here means the model cannot serve
            raise ModelLoadError(f"model {self.name} version {self.version} failed its warm-up run: {exc}") from None
        expected = {o.name: o.dims for o in self.manifest.outputs}
        for name, dims in expected.items():
            got = list(raw[name].shape[1:])
            if got != dims:
                raise ModelLoadError(
                    f"model {self.name}: output {name!r} has shape [batch, {', '.join(map(str, got))}] "
                    f"but the manifest declares [batch, {', '.join(map(str, dims))}]; rebuild the artifact"
                )

    @property
    def primary_output(self) -> str:
        """The graph output live fidelity compares: ``embedding`` or ``logits``."""
        return self.manifest.output_names[0]

    def run_reference(self, prepared: Prepared) -> np.ndarray:
        """The unpruned reference model's primary output for one request's rows.

        Runs the request alone (no batch-mates), on the caller's thread: the shadow worker's,
        never a serving thread. Raises :class:`RuntimeError` when no reference is loaded.
        """
        if self.reference is None:
            raise RuntimeError(f"model {self.name} version {self.version} has no reference model loaded")
        name = self.primary_output
        feeds = assemble_feeds([prepared.encoded], self.processor.pad_id, self.manifest.inputs)
        return self.reference.run(feeds, [name])[name]

    def close(self) -> None:
        """Release the engines."""
        self.engine.close()
        if self.reference is not None:
            self.reference.close()


def _pruning_labels(pruning: Mapping[str, Any]) -> dict[str, str]:
    """``pruneserve_model_info`` labels from the manifest's pruning block.

    Reads the optimizer's record (``kept_heads_per_layer``, ``heads_original_per_layer``,
    ``ffn_sizes_per_layer``, ``ffn_size_original``), falling back to plain totals
    (``kept_heads``/``total_heads``/...) for artifacts written by other tools.
    """
    labels: dict[str, str] = {}
    heads = pruning.get("kept_heads_per_layer")
    ffn = pruning.get("ffn_sizes_per_layer")
    layers = len(heads) if isinstance(heads, list) else len(ffn) if isinstance(ffn, list) else 0
    per_layer_heads, per_layer_ffn = pruning.get("heads_original_per_layer"), pruning.get("ffn_size_original")
    candidates = {
        "kept_heads": heads if heads is not None else pruning.get("kept_heads"),
        "total_heads": per_layer_heads * layers if isinstance(per_layer_heads, int) and layers
        else pruning.get("total_heads"),
        "kept_ffn": ffn if ffn is not None else pruning.get("kept_ffn"),
        "total_ffn": per_layer_ffn * layers if isinstance(per_layer_ffn, int) and layers else pruning.get("total_ffn"),
    }
    for key, value in candidates.items():
        count = _count(value)
        if count is not None:
            labels[key] = str(count)
    if isinstance(heads, list) and all(isinstance(h, int) for h in heads):
        labels["kept_heads_per_layer"] = ",".join(str(h) for h in heads)
    return labels


def _count(value: Any) -> int | None:
    """A total from a pruning record entry: a number, per-layer counts, or per-layer index lists."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return sum(value)
        if all(isinstance(v, (list, tuple)) for v in value):
            return sum(len(v) for v in value)
    return None


def assemble_feeds(encs: Sequence[Encoded], pad_id: int, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Stack requests into ``[sum(n), max(length)]`` int64 feeds, right-padding each."""
    total = sum(e.size for e in encs)
    length = max(e.length for e in encs)
    ids = np.full((total, length), pad_id, dtype=np.int64)
    mask = np.zeros((total, length), dtype=np.int64)
    types = np.zeros((total, length), dtype=np.int64)
    row = 0
    for e in encs:
        n, k = e.size, e.length
        ids[row : row + n, :k] = e.input_ids
        mask[row : row + n, :k] = e.attention_mask
        if e.token_type_ids is not None:
            types[row : row + n, :k] = e.token_type_ids
        row += n
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: feeds[k] for k in input_names}


__all__ = [
    "Encoded",
    "ExecutionTimes",
    "ModelRuntime",
    "Prepared",
    "TextProcessor",
    "assemble_feeds",
    "create_engine",
    "resolve_engine_name",
]
