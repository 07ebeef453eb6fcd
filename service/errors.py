"""Errors as the transports report them: one mapping, used once by each transport.

Every :class:`EsansError` names its gRPC code and HTTP status; :func:`describe` turns any
exception into that pair plus the message for the caller. Anything else is a bug: it is
logged with its traceback and reported as INTERNAL / 500 with a generic message, so no
internal detail leaks to callers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from esans_sampler.errors import EsansError, FailedPreconditionError

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server logged the details"


class PortUnavailableError(FailedPreconditionError):
    """A port the service must listen on is taken or not allowed; names the setting."""


@dataclass(frozen=True)
class ErrorReport:
    """What a transport tells the caller about a failed call."""

    grpc_code: grpc.StatusCode
    http_status: int
    code: str  # the gRPC code name, e.g. "INVALID_ARGUMENT" (also in the HTTP envelope)
    message: str

    def envelope(self) -> dict[str, dict[str, str]]:
        """The HTTP error body: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}


def status_code(name: str) -> grpc.StatusCode:
    """The :class:`grpc.StatusCode` called ``name`` (INTERNAL for an unknown name)."""
    code = getattr(grpc.StatusCode, name, None)
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.INTERNAL


def describe(exc: BaseException) -> ErrorReport:
    """The report for ``exc``; unknown exceptions are logged with their traceback."""
    if isinstance(exc, EsansError):
        code = status_code(exc.grpc_code)
        return ErrorReport(code, exc.http_status, code.name, str(exc) or type(exc).__name__)
    logger.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return ErrorReport(grpc.StatusCode.INTERNAL, 500, "INTERNAL", INTERNAL_MESSAGE)


def status_name(exc: BaseException) -> str:
    """The gRPC code name of ``exc`` without logging (for metrics labels)."""
    return exc.grpc_code if isinstance(exc, EsansError) else "INTERNAL"
