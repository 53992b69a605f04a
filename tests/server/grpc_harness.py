"""Run a real pruneserve gRPC server in a background thread for synchronous clients.

tritonclient's gRPC client is synchronous, so the server (a ``grpc.aio`` server) gets its own
event loop in a daemon thread; tests talk to it over localhost exactly as a remote client
would. Used by the ``test_grpc_*``, TLS, shutdown and bad-input tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server.app import InferenceServer, create_server
from pruneserve.server.config import ServeConfig
from pruneserve.server.dataplane import DataPlane
from pruneserve.server.servicer import serialize_bytes_tensor

T = TypeVar("T")


def make_config(artifacts: list[Path], **overrides: Any) -> ServeConfig:
    """A config serving ``artifacts`` on a free localhost port, one thread.

    The metrics endpoint only starts when a test calls ``start_metrics_endpoint()``, and then on
    a free port (``metrics_port=0``).
    """
    values: dict[str, Any] = {
        "artifacts": [str(a) for a in artifacts],
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "threads": 1,
        "workers": 1,
        "max_queue_delay_ms": 2.0,
        "grace_seconds": 5.0,
    }
    values.update(overrides)
    return ServeConfig(**values)


class ServerThread:
    """A started server on its own event loop; ``url`` is ``127.0.0.1:<port>``."""

    def __init__(self, config: ServeConfig, dataplane: DataPlane | None = None) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self._thread.start()
        self.server: InferenceServer
        try:
            self.server, self.port = self.call(create_server(config, dataplane))
        except BaseException:
            self._end_loop()
            raise

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Shut the server down gracefully and end its loop (idempotent)."""
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop(grace), timeout=grace + 30)
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def serving(config: ServeConfig, dataplane: DataPlane | None = None) -> Iterator[ServerThread]:
    """Run a server (over ``dataplane`` if given) for the duration of a ``with`` block."""
    srv = ServerThread(config, dataplane)
    try:
        yield srv
    finally:
        srv.stop()


def texts_request(
    texts: list[bytes], *, model: str = "tiny-embed", shape: list[int] | None = None
) -> pb.ModelInferRequest:
    """A ``text`` request in raw contents (``shape`` defaults to ``[len(texts), 1]``)."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="text", datatype="BYTES", shape=shape if shape is not None else [len(texts), 1])
    request.raw_input_contents.append(serialize_bytes_tensor(texts))
    return request


def ids_request(ids: np.ndarray, *, raw: bytes | None = None) -> pb.ModelInferRequest:
    """An ``input_ids`` request in raw contents (``raw`` replaces the encoded buffer)."""
    request = pb.ModelInferRequest(model_name="tiny-embed")
    request.inputs.add(name="input_ids", datatype="INT64", shape=list(ids.shape))
    request.raw_input_contents.append(ids.astype("<i8").tobytes() if raw is None else raw)
    return request
