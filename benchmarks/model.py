"""Model-level benchmark: every runtime on the same tokens, interleaved in one process.

Runtimes (each skipped with a note when it cannot be built here):

* ``pytorch-fp32``: the original model as its authors run it (sentence-transformers, or
  transformers ``AutoModel`` + the folder's pooling), sdpa attention, fp32;
* ``ort-fp32``: our plain ONNX export of the original, in ONNX Runtime (its default graph
  optimizations, no transformer fusion);
* ``ort-fp32-fused``: the same after ONNX Runtime's transformer optimizer;
* ``ort-int8-dynamic``: the fused graph after ``quantize_dynamic`` with per-channel int8
  weights: the recipe Optimum's O2 + dynamic INT8 gives, built with ONNX Runtime's own tools;
  unpruned, it is the peer our pruning has to beat;
* ``pruneserve-<preset>``: artifacts built by ``pruneserve optimize --preset <preset>``;
* ``openvino-*``: OpenVINO default / f32 hint / NNCF INT8, when those packages are installed.

For each: b1x32 latency and b32x128 throughput (medians after warm-up), fidelity (cosine to
the PyTorch fp32 original over real sentences), batch invariance (max |change| of a text's
embedding alone vs in a padded batch), FLOPs left, and the share of the int8 ceiling reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import (
    REPO_ROOT,
    BenchConfig,
    BenchmarkError,
    TokenBatch,
    default_model_dir,
    interleaved_medians,
    load_corpus,
    median,
    ort_session,
    percentile,
    shaped_batch,
    tokenize,
    write_rows,
)
from benchmarks.ceilings import Ceilings, measure_ceilings, model_flops
from benchmarks.optimizer_bench import run_optimize
from pruneserve.engines.keys import ONNXRUNTIME, OPENVINO
from pruneserve.engines.measure import alone_vs_batched, cosines
from pruneserve.outputs import OutputError, check_output_dir

logger = logging.getLogger(__name__)

#: (label, batch, sequence) of the two timed shapes.
SHAPES: tuple[tuple[str, int, int], ...] = (("b1x32", 1, 32), ("b32x128", 32, 128))
REFERENCE = "pytorch-fp32"


@dataclass
class Runtime:
    """One way of computing the embeddings: a callable on pre-tokenized batches."""

    name: str
    kind: str
    run: Callable[[TokenBatch], np.ndarray]
    onnx_path: Path | None = None
    note: str = ""


@dataclass
class ModelBenchResult:
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    ceilings: Ceilings | None = None


# -- the original model ------------------------------------------------------------------


def _pooling(model_dir: Path) -> tuple[str, bool]:
    """(pooling mode, L2-normalise) as the folder's sentence-transformers config defines them."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return "mean", True
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    mode = "mean"
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = json.loads((model_dir / m["path"] / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                mode = "cls"
    return mode, normalize


class _PooledEncoder:
    """transformers ``AutoModel`` + pooling + optional normalisation, as a torch module."""

    def __new__(cls, model_dir: Path, attn: str) -> Any:
        import torch
        from transformers import AutoModel

        mode, normalize = _pooling(model_dir)
        base = AutoModel.from_pretrained(str(model_dir), attn_implementation=attn).eval()

        class Pooled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.base = base

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
            ) -> torch.Tensor:
                h = self.base(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state
                if mode == "cls":
                    e = h[:, 0]
                else:
                    m = attention_mask.unsqueeze(-1).to(h.dtype)
                    e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(e, dim=-1) if normalize else e

        return Pooled().eval()


def torch_runtime(model_dir: Path, threads: int) -> Runtime:
    """The original in PyTorch fp32 with sdpa attention (sentence-transformers when the folder is one)."""
    import torch

    torch.set_num_threads(threads)
    if (model_dir / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(
            str(model_dir), device="cpu", model_kwargs={"attn_implementation": "sdpa"}, local_files_only=True
        ).eval()

        def run(b: TokenBatch) -> np.ndarray:
            with torch.inference_mode():
                out = st(
                    {
                        "input_ids": torch.from_numpy(b.input_ids),
                        "attention_mask": torch.from_numpy(b.attention_mask),
                        "token_type_ids": torch.from_numpy(b.token_type_ids),
                    }
                )
            return out["sentence_embedding"].numpy()

        return Runtime(REFERENCE, "pytorch", run, note="sentence-transformers, sdpa")
    pooled = _PooledEncoder(model_dir, "sdpa")

    def run_plain(b: TokenBatch) -> np.ndarray:
        with torch.inference_mode():
            return pooled(
                torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask), torch.from_numpy(b.token_type_ids)
            ).numpy()

    return Runtime(REFERENCE, "pytorch", run_plain, note="transformers AutoModel + pooling, sdpa")


def export_original(model_dir: Path, out: Path, opset: int = 17) -> Path:
    """Export the original (pooling included) to ONNX with the TorchScript exporter.

    Eager attention traces to plain MatMul/Softmax, which ONNX Runtime's transformer optimizer
    fuses into ``Attention`` when it is told the head count and hidden size.
    """
    import torch

    model = _PooledEncoder(model_dir, "eager")
    ids = torch.ones(2, 16, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"embedding": {0: "batch"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(out),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return out


def fuse_original(src: Path, dst: Path, model_dir: Path) -> dict[str, int]:
    """ONNX Runtime's transformer optimizer (BERT fusions), as Optimum's O2 level applies it."""
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = json.loads((model_dir / "config.json").read_text())
    opt = optimize_model(
        str(src),
        model_type="bert",
        num_heads=int(cfg["num_attention_heads"]),
        hidden_size=int(cfg["hidden_size"]),
        opt_level=0,
    )
    opt.save_model_to_file(str(dst))
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def quantize_original(src: Path, dst: Path) -> None:
    """Dynamic INT8, per-channel int8 weights, on MatMul and fused Attention (Optimum's dynamic recipe)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        op_types_to_quantize=["MatMul", "Attention"],
        # Fused contrib ops (com.microsoft domain) defeat ONNX shape inference; their outputs are fp32.
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )


def baseline_cache(cfg: BenchConfig, model_dir: Path) -> Path:
    """Where the original's ONNX baselines are cached: one folder per model folder."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:10]
    return cfg.out_dir / "artifacts" / "baselines" / f"{model_dir.resolve().name}-{digest}"


def baseline_models(model_dir: Path, cache: Path) -> dict[str, Path]:
    """Export, fuse and quantize the original once; cached under ``cache`` by model folder."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = {
        "ort-fp32": cache / "original.onnx",
        "ort-fp32-fused": cache / "original_fused.onnx",
        "ort-int8-dynamic": cache / "original_fused_int8.onnx",
    }
    stamp = cache / "source.json"
    source = {"model_dir": str(model_dir.resolve()), "config_mtime": (model_dir / "config.json").stat().st_mtime}
    if stamp.is_file() and json.loads(stamp.read_text()) == source and all(p.is_file() for p in paths.values()):
        return paths
    logger.info("exporting, fusing and quantizing the original model into %s", cache)
    export_original(model_dir, paths["ort-fp32"])
    stats = fuse_original(paths["ort-fp32"], paths["ort-fp32-fused"], model_dir)
    logger.info("fusion: %s", stats)
    quantize_original(paths["ort-fp32-fused"], paths["ort-int8-dynamic"])
    stamp.write_text(json.dumps(source))
    return paths


def static_int8_original(
    fp32: Path, calibration: list[TokenBatch], held_out: list[TokenBatch], threads: int
) -> Path | None:
    """The original model through the optimizer's batch-invariant static INT8 (issue 9's mode).

    Built by :func:`pruneserve.optimizer.static_int8.quantize_static_int8` (NNCF) from the same
    calibration texts as the OpenVINO + NNCF peer, so the table shows dynamic INT8 and the
    batch-invariant mode side by side on the same unpruned model. Cached beside ``fp32`` and
    keyed by the calibration texts; ``None`` when NNCF is not installed.
    """
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        return None
    from pruneserve.engines.ort import ort_runner
    from pruneserve.optimizer.static_int8 import quantize_static_int8

    names = ["input_ids", "attention_mask", "token_type_ids"]
    digest = hashlib.sha256(b"".join(b.input_ids.tobytes() for b in calibration)).hexdigest()[:10]
    out = fp32.parent / f"original_static_int8-{digest}.onnx"
    if out.is_file():
        return out
    logger.info("building the unpruned batch-invariant static INT8 baseline into %s", out)
    calib = [b.feeds(names) for b in calibration]
    evals = [b.feeds(names) for b in held_out]
    reference_run = ort_runner(fp32, threads)
    quantize_static_int8(fp32, out, calib, evals, [reference_run(f) for f in evals], 0.0, method="nncf")
    return out


# -- ONNX runtimes -----------------------------------------------------------------------


def ort_runtime(name: str, path: Path, threads: int, kind: str = ONNXRUNTIME, note: str = "") -> Runtime:
    """A CPU ONNX Runtime session (spinning inside a run only, as served) fed with whatever inputs the graph declares."""
    sess = ort_session(path, threads)
    inputs = [i.name for i in sess.get_inputs()]
    output = sess.get_outputs()[0].name

    def run(b: TokenBatch) -> np.ndarray:
        return sess.run([output], b.feeds(inputs))[0]

    return Runtime(name, kind, run, onnx_path=path, note=note)


def openvino_runtimes(onnx_path: Path, threads: int, calib: list[TokenBatch]) -> tuple[list[Runtime], list[str]]:
    """OpenVINO default / f32 hint / NNCF INT8 peers when the packages are installed."""
    notes: list[str] = []
    from pruneserve.engines import openvino as ov_engine

    if not ov_engine.openvino_available():
        return [], ["OpenVINO not installed: its rows are skipped (`pip install openvino nncf` to add them)."]
    ov_model = ov_engine.read_model(onnx_path)
    names = [p.get_any_name() for p in ov_model.inputs]

    def make(name: str, model: Any, config: dict[str, Any], note: str) -> Runtime:
        # Deliberately not serving_config(): these rows show OpenVINO as a user gets it.
        run_first = ov_engine.compiled_runner(
            ov_engine.compile_graph(model, {"INFERENCE_NUM_THREADS": threads, **config})
        )

        def run(b: TokenBatch) -> np.ndarray:
            return run_first(b.feeds(names))

        return Runtime(name, OPENVINO, run, note=note)

    out = [
        make("openvino-default", ov_model, {}, f"OpenVINO {ov_engine.openvino_version()} default precision"),
        make("openvino-f32", ov_model, {"INFERENCE_PRECISION_HINT": "f32"}, "INFERENCE_PRECISION_HINT=f32"),
    ]
    try:
        import nncf

        dataset = nncf.Dataset([b.feeds(names) for b in calib])
        q = nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
        out.append(make("openvino-nncf-int8", q, {}, f"NNCF {nncf.__version__} post-training INT8"))
    except ImportError:
        notes.append("NNCF not installed: the OpenVINO INT8 row is skipped.")
    return out, notes


# -- artifacts ---------------------------------------------------------------------------


def build_artifacts(cfg: BenchConfig) -> tuple[dict[str, Path], list[str]]:
    """Our artifacts by label: given ones, cached ones, or built now by ``pruneserve optimize``."""
    if cfg.artifacts:
        return dict(cfg.artifacts), []
    assert cfg.artifact_cache is not None
    out: dict[str, Path] = {}
    notes: list[str] = []
    fingerprint = optimizer_fingerprint()
    for preset in cfg.presets:
        dest = cfg.artifact_cache / preset
        record_file = cfg.artifact_cache / f"{preset}.build.json"
        # No build record means nobody knows which optimizer code built it: rebuild as well.
        stale = (dest / "manifest.json").is_file() and (
            not record_file.is_file() or json.loads(record_file.read_text()).get("optimizer") != fingerprint
        )
        if stale:
            logger.info("cached %s was built by other (or unknown) optimizer code; rebuilding", dest)
        if stale or not (dest / "manifest.json").is_file():
            try:
                # `optimize --overwrite` replaces the cached artifact atomically and refuses any
                # other folder, so nothing the harness did not build is ever deleted.
                check_output_dir(dest, overwrite=True, kind="artifact")
                record = run_optimize(preset, dest, timeout=3600, extra=["--overwrite"] if dest.exists() else None)
            except OutputError as exc:
                notes.append(f"cannot rebuild the cached {preset} artifact: {exc}; its rows are skipped.")
                continue
            except BenchmarkError as exc:
                notes.append(f"{exc}; its rows are skipped.")
                continue
            # Kept beside the artifact so a quick run can report the build's cost without rebuilding.
            record["optimizer"] = fingerprint
            record_file.write_text(json.dumps(record, indent=2) + "\n")
            logger.info("built %s in %.0f s", dest, record["wall_s"])
        out[f"pruneserve-{preset}"] = dest
    return out, notes


def optimizer_fingerprint() -> str:
    """Git's tree hash of the committed ``optimizer/`` (cached artifacts are rebuilt when it changes)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD:optimizer"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def artifact_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


def artifact_runtime(label: str, path: Path, threads: int) -> Runtime:
    """An artifact on the engine its manifest recommends (what ``serve --engine auto`` runs).

    ``runtime.engine == "openvino"`` compiles the artifact's ONNX with OpenVINO at the recorded
    precision (:func:`pruneserve.engines.openvino.openvino_runner`, the same settings as the
    server's engine); anything else runs on ONNX Runtime's CPU provider.
    """
    man = artifact_manifest(path)
    onnx_path = path / man.get("model_file", "model.onnx")
    runtime = man.get("runtime") or {}
    note = _artifact_note(man)
    if runtime.get("engine") == OPENVINO:
        from pruneserve.engines.openvino import openvino_runner

        runner = openvino_runner(onnx_path, threads, str(runtime.get("precision", "f32")))

        def run(b: TokenBatch) -> np.ndarray:
            return runner(b.feeds(["input_ids", "attention_mask", "token_type_ids"]))

        return Runtime(label, "pruneserve", run, onnx_path=onnx_path, note=f"{note}, on OpenVINO")
    return ort_runtime(label, onnx_path, threads, kind="pruneserve", note=f"{note}, on ONNX Runtime")


def quality_data(tokenizer: Any, quick: bool) -> tuple[list[str], list[TokenBatch]]:
    """(held-out texts, calibration feeds) from the optimizer's own default split.

    The held-out part is what ``pruneserve optimize`` reports its quality on. The calibration
    feeds are exactly those its static INT8 calibrates on (the scoring split batched as
    ``prepare_data`` batches it, then :func:`~pruneserve.optimizer.pipeline.calibration_feeds`),
    so the OpenVINO + NNCF peer is built from the same texts.
    """
    from pruneserve.optimizer.config import DataConfig
    from pruneserve.optimizer.data import load_data, make_batches
    from pruneserve.optimizer.pipeline import calibration_feeds
    from pruneserve.optimizer.quantize import QuantizeConfig

    data = DataConfig()
    split = load_data(data)
    batches = make_batches(
        split.score, tokenizer, batch_size=data.batch_size, max_length=data.max_length,
        uses_token_type_ids=True, by_length=True, seed=data.seed,
    )  # fmt: skip
    feeds = calibration_feeds(batches, QuantizeConfig().calibration_size)
    calibration = [
        TokenBatch(f["input_ids"], f["attention_mask"], f.get("token_type_ids", np.zeros_like(f["input_ids"])), ())
        for f in feeds
    ]
    # Full runs measure on the whole held-out split, the same texts the optimizer reports on.
    return split.eval.texts[:64] if quick else split.eval.texts, calibration


# -- measurements ------------------------------------------------------------------------


def fidelity(
    runtimes: list[Runtime], batches: list[TokenBatch], reference: str = REFERENCE
) -> dict[str, tuple[float, float]]:
    """Mean and min cosine of each runtime's embeddings to the reference's, over ``batches``."""
    outs: dict[str, list[np.ndarray]] = {rt.name: [rt.run(b) for b in batches] for rt in runtimes}
    result = {}
    for name, chunks in outs.items():
        cos = cosines(chunks, outs[reference])
        result[name] = (float(cos.mean()), float(cos.min()))
    return result


def batch_invariance(rt: Runtime, batch: TokenBatch, rows: int) -> float:
    """Max |embedding alone - embedding in ``batch``| over its first ``rows`` texts."""
    together = rt.run(batch)
    return alone_vs_batched(together, [rt.run(batch.row(i))[0] for i in range(min(rows, batch.shape[0]))])


def run_model_bench(
    cfg: BenchConfig, ceilings: Ceilings | None = None, artifacts: dict[str, Path] | None = None
) -> ModelBenchResult:
    """Build every runtime, time both shapes interleaved, measure quality; write model.csv/json.

    ``artifacts`` (label -> folder) defaults to :func:`build_artifacts`.
    """
    from tokenizers import Tokenizer

    model_dir = cfg.model_dir or default_model_dir()
    notes: list[str] = []
    corpus = load_corpus()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    baselines = baseline_models(model_dir, baseline_cache(cfg, model_dir))

    runtimes: list[Runtime] = [torch_runtime(model_dir, cfg.threads)]
    runtimes.append(ort_runtime("ort-fp32", baselines["ort-fp32"], cfg.threads, note="plain export, no fusion"))
    runtimes.append(
        ort_runtime("ort-fp32-fused", baselines["ort-fp32-fused"], cfg.threads, note="ORT transformer optimizer")
    )
    runtimes.append(
        ort_runtime(
            "ort-int8-dynamic",
            baselines["ort-int8-dynamic"],
            cfg.threads,
            note="unpruned, fused + quantize_dynamic per-channel int8 (Optimum O2 + dynamic INT8 recipe)",
        )
    )
    if artifacts is None:
        artifacts, art_notes = build_artifacts(cfg)
        notes += art_notes
    for label, path in artifacts.items():
        runtimes.append(artifact_runtime(label, path, cfg.threads))

    held_out, calib_batches = quality_data(tok, cfg.quick)
    notes.append(
        f"Fidelity and batch invariance on {len(held_out)} texts of the optimizer's held-out split of its "
        f"default corpus (never used for scoring, recovery or calibration); the NNCF peer and the static INT8 "
        f"baseline are calibrated on the same {len(calib_batches)} scoring texts as our static INT8."
    )
    fid_batches = [tokenize(tok, held_out[i : i + 16], 128) for i in range(0, len(held_out), 16)]
    ov, ov_notes = openvino_runtimes(baselines["ort-fp32"], cfg.threads, calib_batches)
    runtimes += ov
    notes += ov_notes
    static = static_int8_original(baselines["ort-fp32"], calib_batches, fid_batches[:4], cfg.threads)
    if static is not None:
        runtimes.append(
            ort_runtime(
                "ort-int8-static", static, cfg.threads,
                note="unpruned, pruneserve's batch-invariant static INT8 (NNCF QDQ, same calibration texts)",
            )
        )  # fmt: skip
    else:
        notes.append("NNCF not installed: the unpruned batch-invariant static INT8 row is skipped.")

    ceilings = ceilings or measure_ceilings(cfg.threads, cfg.quick)
    fid = fidelity(runtimes, fid_batches)
    inv_batch = tokenize(tok, held_out[:16], 128)
    inv = {rt.name: batch_invariance(rt, inv_batch, 4 if cfg.quick else 16) for rt in runtimes}

    rows: list[dict[str, Any]] = []
    for label, b, s in SHAPES:
        batch = shaped_batch(tok, corpus, b, s, start=200)
        repeats = {"b1x32": 15 if cfg.quick else 200, "b32x128": 3 if cfg.quick else 20}[label]
        calls = {rt.name: (lambda rt=rt, batch=batch: rt.run(batch)) for rt in runtimes}
        samples = interleaved_medians(calls, repeats, warmup=2)
        ref_ms = median(samples[REFERENCE])
        int8_ms = median(samples.get("ort-int8-dynamic", [float("nan")]))
        for rt in runtimes:
            ms = median(samples[rt.name])
            flops = model_flops(rt.onnx_path or baselines["ort-fp32"], b, s)
            achieved = flops / (ms * 1e-3) / 1e9
            rows.append(
                {
                    "runtime": rt.name,
                    "kind": rt.kind,
                    "shape": label,
                    "batch": b,
                    "seq": s,
                    "median_ms": ms,
                    "p10_ms": percentile(samples[rt.name], 10),
                    "p90_ms": percentile(samples[rt.name], 90),
                    "repeats": len(samples[rt.name]),
                    "texts_per_s": b / (ms * 1e-3),
                    "speedup_vs_pytorch": ref_ms / ms,
                    "speedup_vs_ort_int8": int8_ms / ms,
                    "fidelity_mean": fid[rt.name][0],
                    "fidelity_min": fid[rt.name][1],
                    "batch_invariance_max_abs": inv[rt.name],
                    "gflop": flops / 1e9,
                    "achieved_gops": achieved,
                    "share_int8_ceiling": achieved / ceilings.int8_gops,
                    "share_fp32_ceiling": achieved / ceilings.fp32_gflops,
                    "threads": cfg.threads,
                    "note": rt.note,
                }
            )
    write_rows(cfg.out_dir, "model", rows)
    (cfg.out_dir / "ceilings.json").write_text(json.dumps(ceilings.to_dict(), indent=2) + "\n")
    return ModelBenchResult(rows, notes, ceilings)


def _artifact_note(man: dict[str, Any]) -> str:
    """A short description from the manifest: heads and FFN kept, quantization mode."""
    parts = []
    p = man.get("pruning") or {}
    heads = p.get("kept_heads_per_layer")
    if heads:
        total = int(p.get("heads_original_per_layer", 0)) * len(heads)
        parts.append(f"heads {sum(heads)}/{total}" if total else f"heads {heads}")
    ffn = p.get("ffn_sizes_per_layer")
    if ffn and p.get("ffn_size_original"):
        parts.append(f"FFN {sum(ffn)}/{int(p['ffn_size_original']) * len(ffn)}")
    q = man.get("quantization") or {}
    if q.get("mode"):
        parts.append(f"{q['mode']}{' per-channel' if q.get('per_channel') else ''}")
    parts.append("batch-invariant" if man.get("batch_invariant", True) else "not batch-invariant")
    return ", ".join(parts)
