"""Fixtures for server tests: tiny, torch-free artifacts and a running data plane.

The builders live in ``tiny_artifacts.py`` (importable from tests in this folder); the
fixtures here are what the data-plane and transport tests share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny_artifacts import make_artifact, running, text_request

from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.metrics import Metrics
from pruneserve.server.types import InferRequest


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``artifact_factory(**ArtifactSpec fields) -> Path``: a fresh tiny artifact per call."""
    counter = iter(range(1_000_000))

    def factory(**overrides: Any) -> Path:
        root = tmp_path_factory.mktemp("artifacts")
        return make_artifact(root / f"artifact-{next(counter)}", **overrides)

    return factory


@pytest.fixture(scope="session")
def embedding_artifact(artifact_factory: Callable[..., Path]) -> Path:
    """A tiny embedding artifact ``tiny-embed`` v1 (normalised, with token types). Do not modify."""
    return artifact_factory(task="embedding", name="tiny-embed")


@pytest.fixture(scope="session")
def classifier_artifact(artifact_factory: Callable[..., Path]) -> Path:
    """A tiny classifier artifact ``tiny-cls`` v1 with labels negative/neutral/positive. Do not modify."""
    return artifact_factory(task="classification", name="tiny-cls", seed=1)


@pytest.fixture
def serve_config(embedding_artifact: Path, classifier_artifact: Path) -> ServeConfig:
    """A config serving both tiny artifacts on free ports, one thread, short queue delay."""
    return ServeConfig(
        artifacts=[str(embedding_artifact), str(classifier_artifact)],
        grpc_port=0,
        metrics_port=0,
        host="127.0.0.1",
        metrics_host="127.0.0.1",
        threads=1,
        workers=1,
        max_queue_delay_ms=5.0,
    )


@pytest.fixture
def run_dataplane() -> Callable[..., Any]:
    """``run_dataplane(config, scenario, metrics=None)``: run ``await scenario(dp)`` on a started data plane."""

    def runner(config: ServeConfig, scenario: Callable[[DataPlane], Any], metrics: Metrics | None = None) -> Any:
        async def main() -> Any:
            async with running(config, metrics) as dp:
                return await scenario(dp)

        return asyncio.run(main())

    return runner


@pytest.fixture
def make_text_request() -> Callable[..., InferRequest]:
    """``make_text_request(model, texts, version="", outputs=None, rid="")``."""
    return text_request

