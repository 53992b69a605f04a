"""gRPC server interceptors: the one place domain errors become status codes.

:class:`ErrorInterceptor` wraps every RPC. A :class:`~pruneserve.server.errors.ServerError`
becomes its ``code`` with the error's own message (written for the caller). Anything else
is a bug: the caller gets a bare INTERNAL naming only the request id, while the traceback
goes to the server log under that id. Each RPC runs with its request id (the ModelInfer
``id``, else the ``x-request-id`` metadata, else a fresh one) bound in a context variable,
so every log line its task emits can carry it via :class:`RequestIdLogFilter`.

:class:`DrainInterceptor` implements the refusal half of graceful shutdown: once
:meth:`~DrainInterceptor.start_draining` is called, new RPCs (other than health checks)
fail with UNAVAILABLE while the RPCs already running are counted until they finish.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from pruneserve.server.errors import ServerError, UnavailableError

logger = logging.getLogger(__name__)

#: The request id of the RPC being served in this task ("" outside one).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("pruneserve_request_id", default="")
#: Metadata key a client may set to choose the request id (a ModelInfer ``id`` takes precedence).
REQUEST_ID_METADATA = "x-request-id"
#: Health checks must keep answering (NOT_SERVING) while the server drains.
_ALWAYS_ALLOWED_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)

_Behavior = Callable[..., Any]


#: Longest request id kept for logs (ids come from clients: bound their size in log lines).
MAX_REQUEST_ID_CHARS = 64


def bind_request_id(request_id: str) -> str:
    """Bind ``request_id`` (or a fresh one when empty) to the current task; returns it.

    The id is client-supplied, so only its first printable characters are kept: a client
    cannot forge log lines with newlines or flood them with a huge id.
    """
    rid = "".join(c for c in request_id[: 4 * MAX_REQUEST_ID_CHARS] if c.isprintable())[:MAX_REQUEST_ID_CHARS]
    rid = rid or uuid.uuid4().hex[:16]
    REQUEST_ID.set(rid)
    return rid


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` (the current RPC's id, or ``-``) to every log record.

    Install it on the handlers of an entry point's logging configuration and use
    ``%(request_id)s`` in the format, or read the attribute in a JSON formatter.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get() or "-"
        return True


def _status_code(error: ServerError) -> grpc.StatusCode:
    try:
        return grpc.StatusCode[error.code]
    except KeyError:
        return grpc.StatusCode.INTERNAL


def _request_id(request: Any, context: grpc.aio.ServicerContext) -> str:
    rid = getattr(request, "id", "") if request is not None else ""
    if not rid:
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_METADATA:
                rid = value if isinstance(value, str) else value.decode("utf-8", "replace")
                break
    return bind_request_id(rid if isinstance(rid, str) else "")


_Guard = Callable[[Any, grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


class _HandlerCache:
    """Wrapped handlers by method, so an RPC does not rebuild its handler on every call.

    grpc.aio runs every interceptor for every call; wrapping is the same each time for a
    method, and only registered methods reach here (unknown ones have no handler), so the
    cache is bounded by the services the server exposes.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler, wrap: Callable[[], grpc.RpcMethodHandler]) -> grpc.RpcMethodHandler:
        """The wrapped ``handler`` of ``method``, built by ``wrap()`` the first time it is seen."""
        hit = self._wrapped.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = wrap()
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _guarded(handler: grpc.RpcMethodHandler, guard: _Guard) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behaviour runs inside ``guard(request, context)``.

    Streaming-response behaviours come in two shapes: async generators (yielding messages)
    and coroutines that call ``context.write`` (e.g. the health service's Watch); each is
    wrapped in its own shape, since grpc.aio drives the two differently.
    """

    def wrap(behavior: _Behavior) -> _Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async with guard(request, context):
                    async for response in behavior(request, context):
                        yield response

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(request, context):
                return await behavior(request, context)

        return call

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **kw)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **kw)


class _ErrorGuard:
    """One RPC's request-id binding and exception mapping (a plain class: cheaper per call than
    a generator-based context manager)."""

    __slots__ = ("_context", "_message", "_method", "_rid")

    def __init__(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self._method, self._context = method, context
        self._message = None if _is_iterator(request) else request
        self._rid = ""

    async def __aenter__(self) -> None:
        self._rid = _request_id(self._message, self._context)

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, Exception):  # not CancelledError/GeneratorExit: those must propagate
            await ErrorInterceptor._abort(self._context, exc, self._method, self._rid, self._message)
        return False


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to gRPC status codes and logs each failure with its request id."""

    def __init__(self) -> None:
        self._handlers = _HandlerCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def guard(request: Any, context: grpc.aio.ServicerContext) -> _ErrorGuard:
            return _ErrorGuard(method, request, context)

        return self._handlers.get(method, handler, lambda: _guarded(handler, guard))

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str, rid: str, request: Any) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # a handler already chose its status
        model = getattr(request, "model_name", "") or getattr(request, "name", "")
        extra = {"rpc": method, "request_id": rid, "model": model}
        if isinstance(exc, ServerError):
            code = _status_code(exc)
            extra["code"] = code.name
            # The one log line per refused RPC (the data plane only counts them): caller mistakes
            # are routine, so INFO without a traceback; only INTERNAL is an ERROR.
            level = logging.ERROR if code is grpc.StatusCode.INTERNAL else logging.INFO
            logger.log(level, "%s %s -> %s: %s", method, rid, code.name, exc, extra=extra)
            await context.abort(code, str(exc))
        extra["code"] = "INTERNAL"
        logger.error("%s %s -> INTERNAL (unexpected)", method, rid, exc_info=exc, extra=extra)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {rid}); the server log has the details"
        )


def _is_iterator(request: Any) -> bool:
    return hasattr(request, "__aiter__")


class DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs in flight and, once draining, refuses new ones with UNAVAILABLE."""

    def __init__(self) -> None:
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._handlers = _HandlerCache()

    @property
    def draining(self) -> bool:
        """Whether new RPCs are being refused."""
        return self._draining

    @property
    def in_flight(self) -> int:
        """RPCs accepted and not yet finished."""
        return self._in_flight

    def start_draining(self) -> None:
        """Refuse every RPC that arrives from now on (health checks excepted)."""
        self._draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the RPCs in flight to finish; True if they did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_ALWAYS_ALLOWED_PREFIXES):
            return handler
        return self._handlers.get(method, handler, lambda: _guarded(handler, self._admit))

    def _admit(self, request: Any, context: grpc.aio.ServicerContext) -> _Admission:
        return _Admission(self)

    def _enter(self) -> None:
        if self._draining:
            raise UnavailableError("the server is shutting down; retry on another replica")
        self._in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()


class _Admission:
    """Counts one admitted RPC for :class:`DrainInterceptor` (refused at entry while draining)."""

    __slots__ = ("_drain",)

    def __init__(self, drain: DrainInterceptor) -> None:
        self._drain = drain

    async def __aenter__(self) -> None:
        self._drain._enter()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        self._drain._exit()
        return False


__all__ = [
    "REQUEST_ID",
    "REQUEST_ID_METADATA",
    "DrainInterceptor",
    "ErrorInterceptor",
    "RequestIdLogFilter",
    "bind_request_id",
]
