"""``grpc.health.v1`` health checking, driven by the data plane's readiness.

Services reported (what a load balancer or Kubernetes ``grpc`` probe asks for):
    * ``""``: the whole server; SERVING once every model loaded and the server is ready;
    * ``inference.GRPCInferenceService``: the same, under the service's own name;
    * each model name: SERVING while that model is ready.

On shutdown every service turns NOT_SERVING for good, before any RPC is refused, so
probes and clients that watch health move away first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from grpc_health.v1 import health, health_pb2

if TYPE_CHECKING:
    from pruneserve.server.dataplane import DataPlane

logger = logging.getLogger(__name__)

OVERALL = ""
INFERENCE_SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Keeps a :class:`grpc_health.v1.health.aio.HealthServicer` in step with a data plane.

    Args:
        dataplane: whose ``ready()`` / ``model_ready(name)`` are reported.
        interval_s: how often readiness is re-read while serving (a model can turn unready
            at run time, e.g. when its engine fails).
    """

    def __init__(self, dataplane: DataPlane, interval_s: float = 5.0) -> None:
        self.servicer = health.aio.HealthServicer()
        self._dataplane = dataplane
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._shutting_down = False

    async def refresh(self) -> None:
        """Publish the data plane's current readiness (no-op once shutting down)."""
        if self._shutting_down:
            return
        overall = SERVING if self._dataplane.ready() else NOT_SERVING
        await self.servicer.set(OVERALL, overall)
        await self.servicer.set(INFERENCE_SERVICE, overall)
        for name in self._dataplane.model_names():
            await self.servicer.set(name, SERVING if self._dataplane.model_ready(name) else NOT_SERVING)

    async def start(self) -> None:
        """Publish readiness now and then every ``interval_s`` seconds until :meth:`shutdown`."""
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="health-poll")

    async def shutdown(self) -> None:
        """Turn every service NOT_SERVING, permanently."""
        self._shutting_down = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.servicer.enter_graceful_shutdown()
        logger.info("health: every service is NOT_SERVING")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except Exception:  # a readiness probe must never kill the poller
                logger.exception("health refresh failed")


__all__ = ["INFERENCE_SERVICE", "NOT_SERVING", "OVERALL", "SERVING", "HealthReporter"]
