"""Builds and runs the gRPC server: transport, health, reflection, TLS and graceful shutdown.

``create_server(config)`` returns a started :class:`InferenceServer` and the port it bound
(``grpc_port=0`` picks a free one, as tests do; so does ``metrics_port=0``). ``serve(config)``
is what ``pruneserve serve`` runs: it loads the artifacts, exits with an error when none loads
(unless ``exit_on_error`` is off), waits for SIGTERM/SIGINT and then shuts down gracefully:

1. health turns NOT_SERVING for every service (probes and watchers move away first);
2. new RPCs are refused with UNAVAILABLE ("shutting down"), health checks excepted;
3. RPCs already accepted run to completion, for up to ``grace_seconds``; refusals go on
   for a short linger after that (``REFUSAL_LINGER_S``, within the grace), because grpc
   itself answers calls that race its own stop with CANCELLED, which clients do not retry;
4. the gRPC server stops (cancelling anything still running), then the data plane,
   then the metrics endpoint; the process exits 0.

The HTTP transport (:mod:`pruneserve.server.http_transport`, on ``http_port`` unless ``http``
is off) starts and stops with the gRPC server over the same data plane and loop: in step 1
its readiness turns 503, in step 2 new requests get 503, in step 3 its requests in flight
finish too, and in step 4 it closes its listener and connections. TLS (and mutual TLS) from
the same PEM files applies to both.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from pruneserve.server._proto import POOL
from pruneserve.server._proto import grpc_service_pb2 as pb
from pruneserve.server._proto import grpc_service_pb2_grpc as pb_grpc
from pruneserve.server.config import ServeConfig
from pruneserve.server.errors import ConfigError, ModelLoadError
from pruneserve.server.health import HealthReporter
from pruneserve.server.http_transport import HttpTransport
from pruneserve.server.interceptors import DrainInterceptor, ErrorInterceptor
from pruneserve.server.servicer import InferenceServicer

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from pruneserve.server.dataplane import DataPlane

logger = logging.getLogger(__name__)

INFERENCE_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: After the RPCs in flight finish, how long shutdown keeps refusing new ones with UNAVAILABLE
#: before the gRPC server itself stops (within the grace period).
REFUSAL_LINGER_S = 0.5


class InferenceServer:
    """A running server: the gRPC server, its data plane, health and shutdown state.

    Built by :func:`create_server`; call :meth:`stop` (idempotent) to shut down gracefully.
    """

    def __init__(
        self,
        config: ServeConfig,
        dataplane: DataPlane,
        grpc_server: grpc.aio.Server,
        port: int,
        health: HealthReporter,
        drain: DrainInterceptor,
        shutdown: asyncio.Event,
        http: HttpTransport | None = None,
    ) -> None:
        self.config = config
        self.dataplane = dataplane
        self.grpc_server = grpc_server
        self.port = port
        self.health = health
        self._drain = drain
        self._shutdown = shutdown
        #: The HTTP/REST transport, or None with ``http`` off.
        self.http = http
        self._metrics_http: tuple[WSGIServer, threading.Thread] | None = None
        self._stopping: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return join_host_port(self.config.host, self.port)

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port, or None when HTTP is off."""
        return self.http.port if self.http is not None else None

    @property
    def metrics_port(self) -> int | None:
        """The bound Prometheus port, or None when the endpoint is off or not started."""
        return self._metrics_http[0].server_port if self._metrics_http else None

    def start_metrics_endpoint(self) -> None:
        """Serve ``/metrics`` on ``metrics_host:metrics_port`` (0 = a free port; a no-op when ``metrics`` is off)."""
        if self._metrics_http is not None:
            return
        if not self.config.metrics:
            logger.info("metrics endpoint off (--no-metrics)")
            return
        from pruneserve.server.metrics import start_http_server

        try:
            self._metrics_http = start_http_server(
                self.config.metrics_host, self.config.metrics_port, self.dataplane.metrics.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {join_host_port(self.config.metrics_host, self.config.metrics_port)}: {exc.strerror}; "
                "choose another --metrics-port (0 = any free one), or --no-metrics"
            ) from None
        # The bound port, not the configured one: with --metrics-port 0 this line is how to find it.
        logger.info("metrics at http://%s/metrics", join_host_port(self.config.metrics_host, self.metrics_port or 0))

    async def stop(self, grace: float | None = None) -> None:
        """Shut down gracefully (see the module docstring); concurrent calls share one shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(self.config.grace_seconds if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        await self.health.shutdown()
        self._drain.start_draining()
        if self.http is not None:
            self.http.start_draining()
        self._shutdown.set()  # open streams stop reading and end
        in_flight = self._drain.in_flight
        http_in_flight = self.http.in_flight if self.http is not None else 0
        logger.info(
            "shutting down: refusing new requests, %d RPCs and %d HTTP requests in flight, grace %.1f s",
            in_flight, http_in_flight, grace,
        )  # fmt: skip
        if not await self._drain.wait_idle(grace):
            logger.warning(
                "grace of %.1f s ran out with %d RPCs still running; cancelling them", grace, self._drain.in_flight
            )
        if self.http is not None and not await self.http.wait_idle(deadline - time.monotonic()):
            logger.warning("grace of %.1f s ran out with %d HTTP requests still running", grace, self.http.in_flight)
        # grpc cancels (CANCELLED, not retryable) calls that arrive once its own stop begins.
        # Clients whose last request was just answered send the next one right away, so keep
        # refusing them with UNAVAILABLE for a moment first: they learn to go elsewhere.
        await asyncio.sleep(min(REFUSAL_LINGER_S, max(0.0, deadline - time.monotonic())))
        await self.grpc_server.stop(max(0.0, deadline - time.monotonic()))
        if self.http is not None:
            await self.http.stop()
        await self.dataplane.stop(max(0.0, deadline - time.monotonic()))
        if self._metrics_http is not None:
            http, thread = self._metrics_http
            http.shutdown()
            http.server_close()
            thread.join(timeout=1.0)
            self._metrics_http = None
        logger.info("server stopped")

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server has stopped."""
        await self.grpc_server.wait_for_termination()


def _read_pem(field: str, path: str | None, marker: bytes) -> bytes | None:
    """Read a PEM file named by config ``field``; refuse one that holds no ``marker`` block."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field} {path!r} cannot be read ({exc.strerror}); give the path of a PEM file") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise ConfigError(
            f"{field} {path!r} is not a PEM {marker.decode().strip('-').lower()}; TLS needs PEM files "
            "(-----BEGIN ...-----)"
        )
    return data


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files, or None for plaintext.

    With ``tls_client_ca`` the server requires and verifies a client certificate signed by
    that CA (mutual TLS); without it any client may connect over TLS.
    """
    if not config.tls_cert:
        return None
    cert = _read_pem("tls_cert", config.tls_cert, b"CERTIFICATE-----")
    key = _read_pem("tls_key", config.tls_key, b"PRIVATE KEY-----")
    client_ca = _read_pem("tls_client_ca", config.tls_client_ca, b"CERTIFICATE-----")
    assert key is not None and cert is not None  # ServeConfig requires cert and key together
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def http_ssl_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The HTTP transport's TLS context from the same PEM files as gRPC's, or None for plaintext.

    With ``tls_client_ca`` a client certificate signed by that CA is required (mutual TLS).
    """
    if not config.tls_cert:
        return None
    # Read through _read_pem first: its errors name the config field and the fix.
    _read_pem("tls_cert", config.tls_cert, b"CERTIFICATE-----")
    _read_pem("tls_key", config.tls_key, b"PRIVATE KEY-----")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca:
            _read_pem("tls_client_ca", config.tls_client_ca, b"CERTIFICATE-----")
            context.load_verify_locations(cafile=config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert/tls_key/tls_client_ca cannot be used for HTTP TLS ({exc.reason or exc}); check that the key "
            "matches the certificate"
        ) from None
    return context


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with a bare IPv6 literal bracketed (``::1`` -> ``[::1]:8001``).

    gRPC parses the text after the last ``:`` as the port, so ``::1:8001`` is not the IPv6
    loopback; an already-bracketed literal or a name is left as it is.
    """
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _grpc_options(config: ServeConfig) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Without this Linux lets a second server bind the same port and steal half the traffic.
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age_s is not None:
        # A long-lived HTTP/2 connection pins a client-side round-robin client to the pods it
        # saw first; ageing connections out (GOAWAY, then the grace for calls in flight) makes
        # it re-resolve and spread over pods added since.
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
        ]
    return options


def _enable_reflection(server: grpc.aio.Server) -> None:
    # Our stubs live in a private descriptor pool (see protogen); reflection serves from that
    # pool, so the health and reflection protos must be registered there too.
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        try:
            POOL.FindFileByName(file.name)
        except KeyError:
            POOL.AddSerializedFile(file.serialized_pb)
    names = (
        INFERENCE_SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server, pool=POOL)


async def create_server(config: ServeConfig, dataplane: DataPlane | None = None) -> tuple[InferenceServer, int]:
    """Start a data plane (a new one unless given) and a gRPC server over it.

    Returns the running server and the port it bound (useful with ``grpc_port=0``). The
    Prometheus endpoint is not started here; :func:`serve` starts it, so tests and
    embedding applications can run many servers in one process.

    Raises:
        ConfigError: the address cannot be bound or a TLS file is unreadable or not PEM.
    """
    credentials = server_credentials(config)  # before loading models: fail fast on bad files
    if dataplane is None:
        from pruneserve.server.dataplane import DataPlane

        dataplane = DataPlane(config)
    await dataplane.start()
    health = HealthReporter(dataplane)
    drain = DrainInterceptor()
    shutdown = asyncio.Event()
    # Order matters: ErrorInterceptor is outermost, so it also maps DrainInterceptor's refusals.
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), drain], options=_grpc_options(config))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane, shutdown), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    _enable_reflection(server)

    address = join_host_port(config.host, config.grpc_port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
        await dataplane.stop(0)
        raise ConfigError(
            f"cannot listen on {address} ({exc}); the port is in use or the host is not local: choose another "
            "--grpc-port or --host"
        ) from None
    http: HttpTransport | None = None
    security = "mutual TLS" if config.tls_client_ca else "TLS" if config.tls_cert else "plaintext"
    if config.http:
        http = HttpTransport(dataplane, config)
        try:
            await http.start(config.host, config.http_port, http_ssl_context(config))
        except (OSError, ConfigError) as exc:
            await server.stop(0)  # releases the gRPC port bound above
            await dataplane.stop(0)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"cannot listen for HTTP on {join_host_port(config.host, config.http_port)} ({exc.strerror or exc}); "
                "the port is in use or the host is not local: choose another --http-port (0 = any free one), "
                "or --no-http"
            ) from None
    await server.start()
    await health.start()
    logger.info(
        "gRPC listening on %s (%s), models: %s",
        join_host_port(config.host, port), security, ", ".join(dataplane.model_names()) or "none",
    )  # fmt: skip
    if http is not None:
        # The bound port: with --http-port 0 this line is how to find it.
        logger.info("HTTP listening on %s (%s)", join_host_port(config.host, http.port or 0), security)
    else:
        logger.info("HTTP off (--no-http)")
    return InferenceServer(config, dataplane, server, port, health, drain, shutdown, http), port


async def serve(config: ServeConfig) -> int:
    """Load the artifacts, serve until SIGTERM or SIGINT, then shut down gracefully; returns 0.

    Raises:
        ModelLoadError: no artifact loaded and ``config.exit_on_error`` is on (each refusal is
            already logged); nothing was bound.
        ConfigError: an address cannot be bound or a TLS file is unusable.
    """
    from pruneserve.server.dataplane import DataPlane

    server_credentials(config)  # bad TLS files fail before loading models, which takes seconds
    if config.http:
        http_ssl_context(config)
    dataplane = DataPlane(config)
    await dataplane.start()
    if not dataplane.model_names() and dataplane.expects_models:
        if config.exit_on_error:
            await dataplane.stop()  # nothing was accepted, so this returns at once
            where = f"{len(config.artifacts)} artifact(s) given" + (
                f", model repository {config.model_repository}" if config.model_repository else ""
            )
            raise ModelLoadError(
                f"no model could be loaded ({where}; each refusal logged above); fix or replace them, or pass "
                "--no-exit-on-error to stay up without models (not ready)"
            )
        logger.warning("no model could be loaded; staying up, not ready (--no-exit-on-error)")
    elif not dataplane.model_names():
        logger.info("no model loaded yet (--model-control-mode explicit): load one with a repository load request")
    server, _ = await create_server(config, dataplane)
    try:
        server.start_metrics_endpoint()
    except ConfigError:
        await server.stop(0)
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.info("%s received again; already shutting down", signal.Signals(signum).name)
            return
        logger.info("%s received: shutting down (grace %.1f s)", signal.Signals(signum).name, config.grace_seconds)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stop.wait()
        await server.stop()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


__all__ = [
    "INFERENCE_SERVICE_NAME",
    "InferenceServer",
    "create_server",
    "http_ssl_context",
    "join_host_port",
    "serve",
    "server_credentials",
]
