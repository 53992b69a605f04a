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
from artifact_fixtures import artifact_factory, classifier_artifact, embedding_artifact  # noqa: F401 - fixtures
from tiny_artifacts import running, text_request

from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.metrics import Metrics
from pruneserve.server.types import InferRequest


@pytest.fixture
def serve_config(embedding_artifact: Path, classifier_artifact: Path) -> ServeConfig:
    """A config serving both tiny artifacts on free ports, one thread, short queue delay."""
    return ServeConfig(
        artifacts=[str(embedding_artifact), str(classifier_artifact)],
        grpc_port=0,
        http_port=0,
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

