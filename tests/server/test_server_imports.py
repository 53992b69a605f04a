"""The server wing never imports torch or transformers (a server image does not ship them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SERVER_MODULES = (
    "pruneserve.server",
    "pruneserve.server.app",
    "pruneserve.server.cli",
    "pruneserve.server.client",
    "pruneserve.server.servicer",
    "pruneserve.server.interceptors",
    "pruneserve.server.health",
    "pruneserve.server.dataplane",
    "pruneserve.server.protogen",
    # The engine layer the server runs on (and the optimizer measures with).
    "pruneserve.engines",
    "pruneserve.engines.base",
    "pruneserve.engines.keys",
    "pruneserve.engines.measure",
    "pruneserve.engines.facts",
    "pruneserve.engines.ort",
    "pruneserve.engines.ort_settings",
    "pruneserve.engines.openvino",
)
FORBIDDEN = ("torch", "transformers")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", SERVER_MODULES)
def test_server_module_imports_no_torch(module: str) -> None:
    assert _loaded_after(f"import {module}") == []


def test_serving_a_model_imports_no_torch(embedding_artifact: object) -> None:
    code = f"""
import asyncio
from pruneserve.server.app import create_server
from pruneserve.server.config import ServeConfig
from pruneserve.server.client import InferenceClient

async def main():
    config = ServeConfig(
        artifacts=[{str(embedding_artifact)!r}], host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0, threads=1
    )
    server, port = await create_server(config)
    def call():
        with InferenceClient(f"127.0.0.1:{{port}}") as c:
            return c.infer_text("tiny-embed", ["hello world"])["embedding"].shape
    assert await asyncio.to_thread(call) == (1, 8)
    await server.stop(1)

asyncio.run(main())
"""
    assert _loaded_after(code) == []


def test_the_serve_command_line_imports_no_torch() -> None:
    # `pruneserve serve --help` builds the whole parser, optimizer subcommands included.
    code = "from pruneserve.cli import build_parser\nbuild_parser().parse_args(['serve', 'x'])"
    assert _loaded_after(code) == []
