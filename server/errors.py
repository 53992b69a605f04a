"""The server's exception hierarchy.

Every error the data plane raises on purpose is a :class:`ServerError`. Each class carries a
transport-neutral ``code`` (the name of the gRPC status code it maps to; the transport's one
interceptor does the mapping, so this module never imports grpc) and a ``reason``, the
``outcome`` label of ``pruneserve_requests_total``.

Messages are written for the caller: they say which value was wrong, the limit, and the fix.
They never carry stack traces, file-system paths of the server, or other internals; anything
that is not a :class:`ServerError` is a bug and is reported to the caller as a bare INTERNAL.
"""

from __future__ import annotations

#: Every ``reason`` a request can end with, i.e. the values of the ``outcome`` metric label.
OUTCOMES: tuple[str, ...] = (
    "success",
    "invalid_argument",
    "not_found",
    "resource_exhausted",
    "deadline_exceeded",
    "unavailable",
    "internal",
    "cancelled",
)


class ServerError(Exception):
    """Base class of every error the data plane reports to a caller.

    Attributes:
        code: name of the gRPC status code the transport answers with.
        reason: the ``outcome`` label recorded in ``pruneserve_requests_total``.
    """

    code: str = "INTERNAL"
    reason: str = "internal"

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(ServerError):
    """The request is malformed: unknown input/output, wrong shape or type, text too long, bad ids."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class NotFoundError(ServerError):
    """The named model or version is not in the repository."""

    code = "NOT_FOUND"
    reason = "not_found"


class ResourceExhaustedError(ServerError):
    """The model's queue is full; the caller should back off and retry."""

    code = "RESOURCE_EXHAUSTED"
    reason = "resource_exhausted"


class UnavailableError(ServerError):
    """The server is shutting down or the model is not ready; retry elsewhere or later."""

    code = "UNAVAILABLE"
    reason = "unavailable"


class DeadlineExceededError(ServerError):
    """The request's deadline passed before an answer was computed."""

    code = "DEADLINE_EXCEEDED"
    reason = "deadline_exceeded"


class CancelledError(ServerError):
    """The caller went away before an answer was computed (not a server fault)."""

    code = "CANCELLED"
    reason = "cancelled"


class ModelLoadError(ServerError):
    """An artifact was refused at load time (bad manifest, wrong sha256, unloadable graph).

    Raised by the repository; the data plane logs it and keeps serving the other models,
    so a caller only ever sees it as the model being absent (``NOT_FOUND``) or not ready.
    """

    code = "INTERNAL"
    reason = "internal"


class ConfigError(ServerError, ValueError):
    """A :class:`~pruneserve.server.config.ServeConfig` value is invalid (names the value and fix)."""

    code = "INVALID_ARGUMENT"
    reason = "invalid_argument"


__all__ = [
    "OUTCOMES",
    "CancelledError",
    "ConfigError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ModelLoadError",
    "NotFoundError",
    "ResourceExhaustedError",
    "ServerError",
    "UnavailableError",
]
