"""Fixtures for the reliability tests: the server tests' tiny artifacts and harness, reused.

The builders live in ``tests/server/tiny_artifacts.py`` and ``tests/server/grpc_harness.py``
(plain modules, not fixtures); this folder puts ``tests/server`` on ``sys.path`` so the
reliability tests run alone (``pytest tests/reliability``) as well as with the whole suite.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

_SERVER_TESTS = Path(__file__).resolve().parent.parent / "server"
if str(_SERVER_TESTS) not in sys.path:
    sys.path.insert(0, str(_SERVER_TESTS))

from tiny_artifacts import make_artifact  # noqa: E402 - needs the path above


@pytest.fixture(scope="session")
def artifact_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``artifact_factory(**ArtifactSpec fields) -> Path``: a fresh tiny artifact per call."""
    counter = iter(range(1_000_000))

    def factory(**overrides: Any) -> Path:
        root = tmp_path_factory.mktemp("reliability-artifacts")
        return make_artifact(root / f"artifact-{next(counter)}", **overrides)

    return factory


@pytest.fixture(scope="session")
def embedding_artifact(artifact_factory: Callable[..., Path]) -> Path:
    """A tiny embedding artifact ``tiny-embed`` v1. Do not modify."""
    return artifact_factory(task="embedding", name="tiny-embed")


@pytest.fixture(scope="session")
def classifier_artifact(artifact_factory: Callable[..., Path]) -> Path:
    """A tiny classifier artifact ``tiny-cls`` v1 (negative/neutral/positive). Do not modify."""
    return artifact_factory(task="classification", name="tiny-cls", seed=1)
