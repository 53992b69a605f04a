"""Helpers for server tests: tiny, torch-free artifacts, requests and an instrumented engine.

The artifacts are real ones (written through :func:`pruneserve.artifact.write_artifact`):
an ONNX graph built with ``onnx.helper`` (token embeddings -> dense + tanh -> attention-masked
mean pooling -> optional L2 normalisation -> ``embedding``; classifiers add a linear layer ->
``logits``) and a WordPiece ``tokenizer.json`` over a few dozen words. :func:`reference_forward`
recomputes the graph in numpy from the ONNX initializers, so tests compare against an
independent implementation rather than recorded numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pruneserve.artifact import Manifest, OutputSpec, write_artifact
from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.metrics import Metrics
from pruneserve.engines import Engine
from pruneserve.server.types import InferInput, InferRequest

WORDS = (
    "the quick brown fox jumps over lazy dog hello world cat cats and dogs are good bad happy sad "
    "a an is was this that model server text short long very fast slow red blue green small big "
    "run runs running sentence word"
).split()
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB: dict[str, int] = {t: i for i, t in enumerate((*SPECIALS, *WORDS, "##s", "##ing", "##er"))}
HIDDEN = 8
LABELS = ("negative", "neutral", "positive")
MAX_LEN = 24


# -- the graph ---------------------------------------------------------------------------
def build_graph(
    path: Path,
    *,
    task: str = "embedding",
    token_types: bool = True,
    normalize: bool = True,
    seed: int = 0,
    vocab_size: int = len(VOCAB),
    hidden: int = HIDDEN,
    num_labels: int = len(LABELS),
) -> list[str]:
    """Write a tiny encoder-like ONNX graph to ``path``; returns its input names."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (vocab_size, hidden)).astype(f32), "word_emb"),
        numpy_helper.from_array(rng.normal(0, 0.5, (hidden, hidden)).astype(f32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (hidden,)).astype(f32), "b1"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_seq"),
        numpy_helper.from_array(np.array(1e-9, dtype=f32), "eps"),
    ]
    seq = ["batch", "sequence"]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, seq),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, seq),
    ]
    nodes = [helper.make_node("Gather", ["word_emb", "input_ids"], ["tok"], axis=0)]
    x = "tok"
    if token_types:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, seq))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (2, hidden)).astype(f32), "type_emb"))
        nodes += [
            helper.make_node("Gather", ["type_emb", "token_type_ids"], ["typ"], axis=0),
            helper.make_node("Add", ["tok", "typ"], ["emb"]),
        ]
        x = "emb"
    nodes += [
        helper.make_node("MatMul", [x, "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axis_last"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis_seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis_seq"], ["count0"], keepdims=0),
        helper.make_node("Max", ["count0", "eps"], ["count"]),
        helper.make_node("Div", ["summed", "count"], ["pooled"]),
    ]
    if normalize:
        nodes += [
            helper.make_node("ReduceL2", ["pooled"], ["norm0"], axes=[1], keepdims=1),
            helper.make_node("Max", ["norm0", "eps"], ["norm"]),
            helper.make_node("Div", ["pooled", "norm"], ["pooled_n"]),
        ]
    final = "pooled_n" if normalize else "pooled"
    if task == "embedding":
        nodes.append(helper.make_node("Identity", [final], ["embedding"]))
        outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])]
    else:
        inits += [
            numpy_helper.from_array(rng.normal(0, 1, (hidden, num_labels)).astype(f32), "wc"),
            numpy_helper.from_array(rng.normal(0, 0.1, (num_labels,)).astype(f32), "bc"),
        ]
        nodes += [
            helper.make_node("MatMul", [final, "wc"], ["l0"]),
            helper.make_node("Add", ["l0", "bc"], ["logits"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])]
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pruneserve-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return [i.name for i in inputs]


def reference_forward(
    model_path: Path, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
) -> np.ndarray:
    """The tiny graph recomputed in float64 numpy from its initializers (independent of ORT)."""
    model = onnx.load(str(model_path))
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    x = w["word_emb"][input_ids]
    if "type_emb" in w:
        tt = np.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = x + w["type_emb"][tt]
    h = np.tanh(x @ w["w1"] + w["b1"])
    m = attention_mask.astype(np.float64)[..., None]
    pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if "ReduceL2" in ops:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-9)
    if "wc" in w:
        return pooled @ w["wc"] + w["bc"]
    return pooled


# -- the tokenizer -----------------------------------------------------------------------
def build_tokenizer(path: Path) -> None:
    """Write a BERT-style WordPiece ``tokenizer.json`` over :data:`VOCAB`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    tok = Tokenizer(WordPiece(VOCAB, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
    )
    tok.save(str(path))


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize like the server should (for reference computations): ids, mask, type ids padded right."""
    encs = [_TOKENIZER_CACHE.setdefault("tok", _load_tok()).encode(t) for t in texts]
    n, length = len(encs), max(len(e.ids) for e in encs)
    ids = np.zeros((n, length), np.int64)
    mask = np.zeros((n, length), np.int64)
    types = np.zeros((n, length), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
        types[i, : len(e.ids)] = e.type_ids
    return ids, mask, types


_TOKENIZER_CACHE: dict[str, Any] = {}


def _load_tok() -> Any:
    import tempfile

    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "tokenizer.json"
        build_tokenizer(p)
        return Tokenizer.from_file(str(p))


# -- artifacts ---------------------------------------------------------------------------
@dataclass
class ArtifactSpec:
    """What :func:`make_artifact` builds."""

    task: str = "embedding"
    name: str = "tiny-embed"
    version: int = 1
    batch_invariant: bool = True
    token_types: bool = True
    normalize: bool = True
    max_sequence_length: int = MAX_LEN
    seed: int = 0
    with_reference: bool = False
    #: Recorded in the manifest of an embedding artifact (the graph mean-pools); None = an older
    #: manifest that records neither pooling nor normalisation.
    pooling: str | None = "mean"
    #: ``manifest.runtime`` (None: ONNX Runtime on the CPU) and ``manifest.engines`` (the
    #: optimizer's per-engine measurements; None: none recorded).
    runtime: dict[str, Any] | None = None
    engines: dict[str, Any] | None = None


def make_artifact(out: Path, spec: ArtifactSpec | None = None, **overrides: Any) -> Path:
    """Build a tiny artifact at ``out`` (through ``write_artifact``) and return its path."""
    spec = spec or ArtifactSpec()
    for k, v in overrides.items():
        setattr(spec, k, v)
    work = out.parent / f".{out.name}-src"
    work.mkdir(parents=True, exist_ok=True)
    model, tok = work / "model.onnx", work / "tokenizer.json"
    inputs = build_graph(model, task=spec.task, token_types=spec.token_types, normalize=spec.normalize, seed=spec.seed)
    build_tokenizer(tok)
    sources: dict[str, Any] = {"model.onnx": model, "tokenizer.json": tok}
    if spec.with_reference:
        ref = work / "reference.onnx"
        # A slightly different "unpruned" model: same architecture, other weights.
        build_graph(ref, task=spec.task, token_types=spec.token_types, normalize=spec.normalize, seed=spec.seed + 100)
        sources["reference.onnx"] = ref
    if spec.task == "embedding":
        outputs = [OutputSpec("embedding", [HIDDEN])]
        labels: list[str] = []
    else:
        outputs = [OutputSpec("logits", [len(LABELS)])]
        labels = list(LABELS)
    manifest = Manifest(
        name=spec.name,
        task=spec.task,
        inputs=inputs,
        outputs=outputs,
        max_sequence_length=spec.max_sequence_length,
        version=spec.version,
        labels=labels,
        pooling=spec.pooling if spec.task == "embedding" else None,
        normalize=spec.normalize if spec.task == "embedding" and spec.pooling is not None else None,
        batch_invariant=spec.batch_invariant,
        reference_file="reference.onnx" if spec.with_reference else None,
        runtime=spec.runtime or {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        engines=dict(spec.engines or {}),
        quantization={"mode": "none"},
        pruning={"kept_heads_per_layer": [4, 2], "heads_original_per_layer": 6},
    )
    write_artifact(out, manifest, sources)
    return out


@contextlib.asynccontextmanager
async def running(config: ServeConfig, metrics: Metrics | None = None) -> AsyncIterator[DataPlane]:
    """A started :class:`DataPlane`, stopped (grace 5 s) on exit."""
    dp = DataPlane(config, metrics)
    await dp.start()
    try:
        yield dp
    finally:
        await dp.stop(5.0)


def text_request(model: str, texts: list[str], *, version: str = "", outputs: list[str] | None = None, rid: str = "") -> InferRequest:
    """A KServe-style text request: ``text`` BYTES ``[n, 1]``."""
    data = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
    return InferRequest(
        model=model,
        version=version,
        inputs=[InferInput("text", "BYTES", tuple(data.shape), data)],
        outputs=list(outputs or []),
        id=rid,
    )


# -- engine instrumentation ----------------------------------------------------------------
class GatedEngine(Engine):
    """Wraps a real engine to make batching observable without timing.

    Records every run's feeds; while :attr:`gate` is cleared, runs block (so requests pile up
    in the queue deterministically); raises on any batch containing ``poison_id``.
    """

    name = "gated"

    def __init__(self, inner: Engine, poison_id: int | None = None) -> None:
        self.inner = inner
        self.poison_id = poison_id
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.runs: list[dict[str, np.ndarray]] = []
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        return self.inner.providers

    @property
    def requested_providers(self) -> list[str]:
        return self.inner.requested_providers

    def run(self, feeds: Any, outputs: Any = None) -> dict[str, np.ndarray]:
        with self._lock:
            self.runs.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        self.entered.set()
        if not self.gate.wait(30):
            raise RuntimeError("test gate never opened")
        if self.poison_id is not None and (np.asarray(feeds["input_ids"]) == self.poison_id).any():
            raise RuntimeError("poisoned batch")
        return self.inner.run(feeds, outputs)

    @property
    def batch_sizes(self) -> list[int]:
        """Rows of every run so far."""
        return [int(r["input_ids"].shape[0]) for r in self.runs]


def gate_model(dp: DataPlane, name: str, version: str = "", poison_id: int | None = None) -> GatedEngine:
    """Replace a loaded model's engine with a :class:`GatedEngine` around it."""
    rt = dp.repository.get(name, version)
    gated = GatedEngine(rt.engine, poison_id)
    rt.engine = gated
    return gated


async def wait_until_running(engine: GatedEngine) -> None:
    """Wait (without a timing assert) until the engine has started a run."""
    ok = await asyncio.to_thread(engine.entered.wait, 30)
    assert ok, "the engine never started a run"


async def wait_for_pending(dp: DataPlane, name: str, count: int, version: str = "") -> None:
    """Yield to the event loop until ``count`` requests of ``name`` are queued."""
    batcher = dp.batcher(name, version)
    for _ in range(5000):
        if batcher.pending >= count:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"only {batcher.pending} of {count} requests were queued")
