"""Fixtures for the reliability tests: the server tests' tiny artifacts and harness, reused.

The builders live in ``tests/server/tiny_artifacts.py`` and ``tests/server/grpc_harness.py``
(plain modules, not fixtures); this folder puts ``tests/server`` on ``sys.path`` so the
reliability tests run alone (``pytest tests/reliability``) as well as with the whole suite.
"""

from __future__ import annotations

import sys
from pathlib import Path


_SERVER_TESTS = Path(__file__).resolve().parent.parent / "server"
if str(_SERVER_TESTS) not in sys.path:
    sys.path.insert(0, str(_SERVER_TESTS))

from artifact_fixtures import (  # noqa: E402,F401 - needs the path above; fixtures
    artifact_factory,
    classifier_artifact,
    embedding_artifact,
)


