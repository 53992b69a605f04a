"""The tiny-artifact fixtures, shared by ``tests/server`` and ``tests/reliability``.

Each folder's conftest imports them, so both suites build the same artifacts from
``tiny_artifacts.make_artifact`` without a second copy of the fixtures.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny_artifacts import make_artifact


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
