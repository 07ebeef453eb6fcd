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
