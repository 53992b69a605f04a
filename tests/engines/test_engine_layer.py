"""One engine layer: only ``pruneserve/engines/`` opens ONNX Runtime sessions and compiles OpenVINO models.

A source scan, so a new module that builds its own session (with its own threads, spinning
or precision) fails here instead of measuring something ``serve`` does not run.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pruneserve.engines.measure import batch_invariance, cosine_rows, mean_cosine, probe_feeds

ROOT = Path(__file__).resolve().parents[2]
#: Where production code lives (the pruneserve namespace's folders and the benchmarks).
SCANNED = ("pruneserve", "optimizer", "server", "benchmarks")
LAYER = ROOT / "pruneserve" / "engines"
#: Runs in Triton's own virtual environment, which has no pruneserve to import.
OWN_COPY = {ROOT / "benchmarks" / "triton_peer.py"}
BUILDERS = re.compile(r"InferenceSession\(|SessionOptions\(|ov\.Core\(\)|compile_model\(")


def _hits(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if BUILDERS.search(line)]


def test_only_the_engine_layer_builds_sessions_and_compiles_models() -> None:
    outside = [hit for folder in SCANNED for path in sorted((ROOT / folder).rglob("*.py"))
               if LAYER not in path.parents and path not in OWN_COPY for hit in _hits(path)]
    assert outside == [], "build sessions and compile models through pruneserve.engines (ort / openvino):\n" + "\n".join(outside)


def test_the_scan_sees_the_builders_it_forbids() -> None:
    """Not vacuous: the patterns match the layer's own builders."""
    found = "\n".join(hit for path in sorted(LAYER.glob("*.py")) for hit in _hits(path))
    for pattern in ("InferenceSession(", "SessionOptions(", "ov.Core()", "compile_model("):
        assert pattern in found


def test_cosine_rows_keeps_nan_and_zero_rows() -> None:
    a = np.array([[1.0, 0.0], [0.0, 0.0], [np.nan, 1.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    cos = cosine_rows(a, b)
    assert cos[0] == 1.0 and cos[1] == 0.0 and np.isnan(cos[2]) and cos[3] == pytest.approx(-1.0)
    assert mean_cosine([a[[0, 3]]], [b[[0, 3]]]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="outputs vs"):
        mean_cosine([a], [])


def test_batch_invariance_measures_alone_vs_batched() -> None:
    feeds = probe_feeds(["input_ids", "attention_mask"], vocab_size=50)
    assert set(feeds[0]) == {"input_ids", "attention_mask"}
    lengths = feeds[0]["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # different lengths, so batching pads

    def per_row(f: dict[str, np.ndarray]) -> np.ndarray:  # answer from the row's own real tokens only
        ids, mask = f["input_ids"].astype(np.float64), f["attention_mask"]
        return ((ids * mask).sum(1) / mask.sum(1))[:, None]

    def batch_dependent(f: dict[str, np.ndarray]) -> np.ndarray:
        return per_row(f) + 1e-3 * len(f["input_ids"])

    assert batch_invariance(per_row, feeds) == 0.0
    assert batch_invariance(batch_dependent, feeds) >= 1e-3
