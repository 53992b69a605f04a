"""The server serves batch invariance as the optimizer measured it for the engine and precision it runs.

Issue 18: on a bf16 CPU the optimizer chose static INT8 on OpenVINO bf16, measured its batch
invariance as 0 and wrote ``batch_invariant: true``, while ``serve`` declared the same
artifact batch-variant because it assumed bf16 breaks invariance. These tests inject the
engine's precision (a stub reporting ``openvino``/``bf16`` around an exact ONNX Runtime
session), so they hold on AVX2-only CPUs without bf16 units as well.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_artifacts import make_artifact

from pruneserve import engines
from pruneserve.artifact import load_artifact
from pruneserve.engines import Engine, EngineOptions
from pruneserve.engines.facts import InvarianceFact, batch_invariance_fact, recorded_invariance
from pruneserve.engines.keys import OPENVINO_BF16, engine_key
from pruneserve.engines.ort import OnnxRuntimeEngine
from pruneserve.server.config import ServeConfig
from pruneserve.server.runtime import ModelRuntime

BF16_RUNTIME = {"engine": "openvino", "precision": "bf16"}


class PrecisionEngine(Engine):
    """An exact ONNX Runtime session that reports another engine name and precision.

    ``noise`` > 0 makes answers depend on the batch (each row shifted by noise x batch size),
    as a lowered precision can.
    """

    def __init__(self, inner: Engine, name: str, precision: str, noise: float = 0.0) -> None:
        self.inner, self.name, self._precision, self.noise = inner, name, precision, noise

    @property
    def providers(self) -> list[str]:
        return ["CPU"]

    @property
    def requested_providers(self) -> list[str]:
        return ["CPU"]

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def input_names(self) -> list[str]:
        return self.inner.input_names  # type: ignore[attr-defined, no-any-return]

    @property
    def output_names(self) -> list[str]:
        return self.inner.output_names  # type: ignore[attr-defined, no-any-return]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        out = self.inner.run(feeds, outputs)
        rows = len(next(iter(feeds.values())))
        return {k: v + self.noise * rows for k, v in out.items()}


@dataclass
class Bf16Engines:
    """The stub ``openvino`` engines built so far, and the batch dependence the next one gets."""

    built: list[PrecisionEngine] = field(default_factory=list)
    noise: float = 0.0


@pytest.fixture()
def as_openvino_bf16(monkeypatch: pytest.MonkeyPatch) -> Bf16Engines:
    """Register an ``openvino`` engine that runs like OpenVINO bf16 on any CPU."""
    handle = Bf16Engines()

    def factory(path: Any, options: EngineOptions, inputs: Sequence[str], manifest: Any = None) -> Engine:
        engine = PrecisionEngine(OnnxRuntimeEngine(path, options, inputs), "openvino", "bf16", handle.noise)
        handle.built.append(engine)
        return engine

    monkeypatch.setitem(engines.ENGINES, "openvino", factory)
    return handle


def _load(path: Path, **config: Any) -> ModelRuntime:
    return ModelRuntime.load(load_artifact(path), ServeConfig(artifacts=[str(path)], threads=1, **config))


def test_engine_key_names_engine_and_precision() -> None:
    assert engine_key("openvino", "bf16") == OPENVINO_BF16 == "openvino-bf16"
    assert engine_key("onnxruntime", "f32") == engine_key("onnxruntime", "fp32-graph") == "onnxruntime"
    # TensorRT fp16 is its own key: no CPU optimizer run measures it.
    assert engine_key("onnxruntime", "fp16") == "onnxruntime-fp16"


def test_bf16_measured_invariant_is_served_as_invariant(tmp_path: Path, as_openvino_bf16: Bf16Engines) -> None:
    """The issue's case: static INT8 on OpenVINO bf16 measured 0 -> served batch-invariant."""
    path = make_artifact(tmp_path / "bf16", runtime=BF16_RUNTIME,
                         engines={OPENVINO_BF16: {"engine": "openvino", "precision": "bf16", "batch_invariance": 0.0}})
    rt = _load(path, engine="auto")
    assert rt.engine is as_openvino_bf16.built[0] and not rt.engine.exact
    assert rt.invariance == InvarianceFact(OPENVINO_BF16, True, "manifest", 0.0)
    assert rt.batch_invariant is True
    assert rt.info["batch_invariant"] == "true"  # pruneserve_model_info's label


def test_bf16_measured_variant_is_served_as_variant(tmp_path: Path, as_openvino_bf16: Bf16Engines) -> None:
    path = make_artifact(tmp_path / "bf16v", runtime=BF16_RUNTIME,
                         engines={OPENVINO_BF16: {"engine": "openvino", "precision": "bf16", "batch_invariance": 2e-3}})
    rt = _load(path, engine="openvino")
    assert rt.batch_invariant is False and rt.info["batch_invariant"] == "false"
    assert rt.invariance is not None and rt.invariance.source == "manifest" and rt.invariance.max_abs_diff == 2e-3


def test_top_level_claim_speaks_for_the_recommended_key_only(tmp_path: Path, as_openvino_bf16: Bf16Engines) -> None:
    """No engines block (an older manifest): ``batch_invariant`` is the fact of ``manifest.runtime``'s key."""
    path = make_artifact(tmp_path / "rec", runtime=BF16_RUNTIME)
    rt = _load(path, engine="openvino")
    assert rt.invariance == InvarianceFact(OPENVINO_BF16, True, "manifest")
    assert rt.batch_invariant is True


def test_unmeasured_precision_is_logged_and_assumed_variant(
    tmp_path: Path, as_openvino_bf16: Bf16Engines, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime recommended and measured; the server runs OpenVINO bf16, which nobody measured."""
    path = make_artifact(tmp_path / "unmeasured",
                         engines={"onnxruntime": {"engine": "onnxruntime", "precision": "fp32-graph", "batch_invariance": 0.0}})
    with caplog.at_level(logging.WARNING, logger="pruneserve.engines.facts"):
        rt = _load(path, engine="openvino")
    assert rt.invariance == InvarianceFact(OPENVINO_BF16, False, "assumed")
    assert rt.batch_invariant is False
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "openvino-bf16, which the optimizer did not measure" in message and "--probe-invariance" in message


def test_probe_measures_an_unmeasured_engine_at_load(tmp_path: Path, as_openvino_bf16: Bf16Engines) -> None:
    path = make_artifact(tmp_path / "probe")
    rt = _load(path, engine="openvino", probe_invariance=True)
    assert rt.invariance is not None and rt.invariance.source == "probe"
    assert rt.invariance.max_abs_diff is not None and rt.invariance.max_abs_diff < 1e-5
    assert rt.batch_invariant is True  # an exact session under the bf16 label: measured invariant


def test_probe_detects_batch_dependence(tmp_path: Path, as_openvino_bf16: Bf16Engines) -> None:
    as_openvino_bf16.noise = 1e-3
    path = make_artifact(tmp_path / "noisy")
    rt = _load(path, engine="openvino", probe_invariance=True)
    assert rt.invariance is not None and rt.invariance.source == "probe"
    assert rt.invariance.max_abs_diff is not None and rt.invariance.max_abs_diff >= 1e-3
    assert rt.batch_invariant is False


def test_onnxruntime_reads_its_own_measurement(tmp_path: Path) -> None:
    """The key is per engine: an ONNX Runtime serve reads ``engines["onnxruntime"]``, not the bf16 entry."""
    path = make_artifact(tmp_path / "ort", batch_invariant=True, runtime=BF16_RUNTIME, engines={
        OPENVINO_BF16: {"batch_invariance": 0.0},
        "onnxruntime": {"batch_invariance": 3e-2},  # e.g. a dynamic INT8 graph on ONNX Runtime
    })
    rt = _load(path, engine="onnxruntime")
    assert rt.invariance == InvarianceFact("onnxruntime", False, "manifest", 3e-2)
    assert rt.batch_invariant is False


def test_recorded_invariance_ignores_non_numbers(tmp_path: Path) -> None:
    manifest = load_artifact(make_artifact(tmp_path / "nan", engines={OPENVINO_BF16: {"batch_invariance": "n/a"}})).manifest
    assert recorded_invariance(manifest, OPENVINO_BF16) is None
    assert recorded_invariance(manifest, "onnxruntime") == InvarianceFact("onnxruntime", True, "manifest")


def test_fact_without_probe_keeps_the_claim_at_exact_precision(tmp_path: Path) -> None:
    manifest = load_artifact(make_artifact(tmp_path / "exact", runtime=BF16_RUNTIME)).manifest
    inner = OnnxRuntimeEngine(load_artifact(tmp_path / "exact").model_path, EngineOptions(), manifest.inputs)
    # ONNX Runtime (exact) is not the recommended key and not measured: assumed from the claim.
    assert batch_invariance_fact(manifest, inner) == InvarianceFact("onnxruntime", True, "assumed")
