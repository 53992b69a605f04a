"""Compare INT8 modes for CPU serving on the default model: dynamic vs NNCF static vs ORT static,
each on ONNX Runtime and OpenVINO (fidelity, batch invariance, b1x32 and b32x128 latency).

Usage (writes JSON next to the markdown report in benchmarks/results/)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.int8_modes --work /tmp/int8 --threads 2

Every (graph, engine) pair is timed interleaved, one run of each per round, medians over
rounds, because the build machine is shared: absolute numbers move with other load, ratios
measured in the same rounds stay fair.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def _load_texts() -> list[str]:
    from importlib.resources import files

    raw = (files("pruneserve.optimizer") / "data" / "pydoc_sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _feeds(tokenizer: Any, texts: list[str], max_length: int = 128) -> dict[str, np.ndarray]:
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    enc = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _filled(tokenizer: Any, texts: list[str], batch: int, length: int) -> dict[str, np.ndarray]:
    """``[batch, length]`` feeds of real text with no padding (joined sentences, cut to length)."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    rows, pool = [], iter(texts)
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < length:
            ids.extend(tokenizer.encode(next(pool), add_special_tokens=False).ids)
        rows.append([101, *ids[: length - 2], 102])  # [CLS] ... [SEP] of BERT's WordPiece vocabulary
    ids_arr = np.array(rows, np.int64)
    return {"input_ids": ids_arr, "attention_mask": np.ones_like(ids_arr), "token_type_ids": np.zeros_like(ids_arr)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8-modes"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=300, help="calibration texts")
    parser.add_argument("--eval", type=int, default=256, help="held-out texts for fidelity")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--ort-floor", type=float, default=None,
        help="also run quantize_static_int8(method='ort') to this floor (calibration choices, sensitivity exclusions)",
    )
    parser.add_argument("--graphs", default="", help="comma-separated substrings: time only graphs whose name has one")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_modes.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from pruneserve.optimizer.adapters import load_model
    from pruneserve.optimizer.errors import QuantizationError
    from pruneserve.engines.keys import ONNXRUNTIME, OPENVINO_F32
    from pruneserve.engines.measure import batch_invariance, interleaved_samples, mean_cosine
    from pruneserve.engines.openvino import bf16_supported, openvino_runner
    from pruneserve.engines.ort import ort_runner
    from pruneserve.optimizer.engines import available_engines
    from pruneserve.optimizer.export import export_onnx
    from pruneserve.optimizer.fusion import fuse
    from pruneserve.optimizer.quantize import quantize_dynamic_int8
    from pruneserve.optimizer.static_int8 import (
        StaticInt8Config,
        quantize_nncf,
        quantize_ort,
        quantize_static_int8,
    )

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(None)
    tok = loaded.tokenizer
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        export_onnx(loaded.encoder, fp32)
    texts = _load_texts()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    calib_texts = [texts[i] for i in order[: args.calibration]]
    eval_texts = [texts[i] for i in order[args.calibration : args.calibration + args.eval]]
    calib = [_feeds(tok, [t]) for t in calib_texts]
    evals = [_feeds(tok, eval_texts[i : i + 32]) for i in range(0, len(eval_texts), 32)]
    b1 = _filled(tok, texts[::7], 1, 32)
    b32 = _filled(tok, texts[1::3], 32, 128)

    build: dict[str, float] = {}
    graphs: dict[str, Path] = {"fp32 (unfused)": fp32}
    fused = work / "fused.onnx"
    if not fused.exists():
        fuse(fp32, fused, loaded.encoder.spec)
    graphs["fp32 fused"] = fused
    dyn = work / "dynamic_int8_fused.onnx"
    if not dyn.exists():
        t = time.perf_counter()
        quantize_dynamic_int8(fused, dyn, per_channel=True)
        build["dynamic INT8 (fused)"] = time.perf_counter() - t
    graphs["dynamic INT8 per-channel (fused)"] = dyn
    settings: dict[str, Any] = {}
    nncf_path = work / "nncf_static.onnx"
    if not nncf_path.exists():
        t = time.perf_counter()
        settings["nncf"] = quantize_nncf(fp32, nncf_path, calib, preset="performance", smooth_quant_alpha=0.95)
        build["NNCF static"] = time.perf_counter() - t
    graphs["NNCF static INT8 (S8S8 QDQ)"] = nncf_path
    ort_path = work / "ort_static_minmax.onnx"
    if not ort_path.exists():
        t = time.perf_counter()
        settings["ort"] = quantize_ort(fp32, ort_path, calib, calibration="minmax")
        build["ORT static minmax"] = time.perf_counter() - t
    graphs["ORT static INT8 minmax (S8S8 QDQ)"] = ort_path

    reference = [ort_runner(fp32, args.threads)(f) for f in evals]
    reference_b32 = ort_runner(fp32, args.threads)(b32)
    if args.ort_floor is not None:
        searched = work / f"ort_static_floor{args.ort_floor}.onnx"
        meta = work / f"ort_static_floor{args.ort_floor}.json"
        if not searched.exists():
            t = time.perf_counter()
            try:
                result = quantize_static_int8(
                    fp32, searched, calib, evals, reference, args.ort_floor, method="ort",
                    config=StaticInt8Config(ort_calibrations=("minmax", "percentile"), max_excluded=16, threads=args.threads),
                )
                record: dict[str, Any] = {"settings": result.settings, "tried": result.tried}
            except QuantizationError as exc:
                record = {"error": str(exc)}
            build[f"ORT static search to {args.ort_floor}"] = time.perf_counter() - t
            meta.write_text(json.dumps(record, default=str), encoding="utf-8")
        settings["ort_search"] = json.loads(meta.read_text(encoding="utf-8"))
        if searched.exists():
            excluded = settings["ort_search"]["settings"].get("excluded", 0)
            graphs[f"ORT static INT8 searched ({excluded} MatMul kept fp32)"] = searched
    engines = available_engines()
    runners: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    wanted = [w.strip() for w in args.graphs.split(",") if w.strip()]
    for gname, path in graphs.items():
        if wanted and not any(w in gname for w in wanted):
            continue
        for ekey in engines:
            if ekey not in (ONNXRUNTIME, OPENVINO_F32) and "fused" in gname:
                continue
            key = f"{gname} | {ekey}"
            try:
                run = ort_runner(path, args.threads) if ekey == ONNXRUNTIME else openvino_runner(
                    path, args.threads, engines[ekey][1]
                )
                rows[key] = {
                    "fidelity": mean_cosine([run(f) for f in evals], reference),
                    "fidelity_b32x128": mean_cosine([run(b32)], [reference_b32]),
                    "batch_invariance": batch_invariance(run, evals, probes=6),
                }
                runners[key] = run
            except Exception as exc:  # OpenVINO cannot read ORT contrib ops (fused graphs)
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                rows[key] = {"error": " ".join(ln for ln in lines if not ln.startswith(("Exception from", "Check")))[:300]}
            logger.info("%s: %s", key, rows[key])
    # Median and best of the interleaved rounds: on a loaded machine the minimum is the
    # closer estimate of a run's own cost, the median of what a served request sees.
    for key, (s1, s32) in interleaved_samples(runners, b1, b32, rounds=args.rounds).items():
        rows[key].update(
            latency_b1x32_ms=round(float(np.median(s1)) * 1e3, 2),
            latency_b32x128_ms=round(float(np.median(s32)) * 1e3, 1),
            best_b1x32_ms=round(min(s1) * 1e3, 2),
            best_b32x128_ms=round(min(s32) * 1e3, 1),
        )
    report = {
        "threads": args.threads,
        "rounds": args.rounds,
        "calibration_texts": len(calib),
        "eval_texts": len(eval_texts),
        "build_seconds": build,
        "settings": settings,
        "results": rows,
        "load_average_at_end": os.getloadavg(),
        "openvino_bf16": bf16_supported(),
    }
    args.out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    for key, row in rows.items():
        print(key, row)


if __name__ == "__main__":
    main()
