"""One exception hierarchy for the library and every transport.

Each class names the gRPC status code (as a string, so this module imports nothing from
gRPC) and the HTTP status it maps to; transports translate them once, in one place.
"""

from __future__ import annotations


class EsansError(Exception):
    """Base class of every error the library raises on purpose."""

    grpc_code: str = "INTERNAL"
    http_status: int = 500


class InvalidInputError(EsansError, ValueError):
    """The caller sent something malformed: fix the request or the input file."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 422


class CatalogueError(InvalidInputError):
    """A catalogue file is missing, malformed or inconsistent with the others."""


class UnknownItemError(InvalidInputError):
    """Positive item ids that the active codebook does not contain."""

    def __init__(self, unknown_ids: list[int], total_unknown: int) -> None:
        shown = ", ".join(str(i) for i in unknown_ids)
        more = (
            f" (and {total_unknown - len(unknown_ids)} more)"
            if total_unknown > len(unknown_ids)
            else ""
        )
        super().__init__(
            f"{total_unknown} positive id(s) are not in the codebook: {shown}{more}; "
            "publish a codebook that contains them or drop them from the batch"
        )
        self.unknown_ids = unknown_ids
        self.total_unknown = total_unknown


class NotFoundError(EsansError, LookupError):
    """A named thing (codebook version, artifact) does not exist."""

    grpc_code = "NOT_FOUND"
    http_status = 404


class FailedPreconditionError(EsansError):
    """The request is well-formed but the current state cannot serve it."""

    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


class ArtifactError(FailedPreconditionError):
    """A codebook artifact is corrupted, truncated or of an unknown format."""


class UnavailableError(EsansError):
    """Nothing to serve yet (no codebook) or a dependency is down; retrying may help."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class ResourceExhaustedError(EsansError):
    """Too much concurrent work; back off and retry."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class DeadlineExceededError(EsansError):
    """The caller's deadline passed: the server skipped the work, or the call timed out."""

    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504


class UnauthenticatedError(EsansError):
    """No or a wrong bearer token."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDeniedError(EsansError):
    """The caller may not do this here (for example: the admin API is disabled)."""

    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class PayloadTooLargeError(EsansError):
    """An upload over the server's size limit."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 413


ERRORS_BY_CODE: dict[str, type[EsansError]] = {
    cls.grpc_code: cls
    for cls in (
        InvalidInputError,
        NotFoundError,
        FailedPreconditionError,
        UnavailableError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
    )
}
"""The other direction of the table: a status code name back to its class (clients)."""


def error_for(code: str, message: str) -> EsansError:
    """The exception for a status ``code`` name (``"INVALID_ARGUMENT"``, ...) a server sent."""
    if code == "CANCELLED":
        # A replica that starts draining cancels calls that reach it in that instant. Both RPCs
        # are read-only, so the call is retried like UNAVAILABLE.
        return UnavailableError(f"the server cancelled the call (draining?): {message}")
    return ERRORS_BY_CODE.get(code, EsansError)(message)
