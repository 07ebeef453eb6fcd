"""One mapping from errors to gRPC codes and HTTP statuses; unknown errors leak nothing."""

from __future__ import annotations

import logging

import grpc
import pytest

from esans_sampler.errors import (
    ERRORS_BY_CODE,
    ArtifactError,
    DeadlineExceededError,
    EsansError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnknownItemError,
    error_for,
)
from esans_service.errors import INTERNAL_MESSAGE, describe, status_name


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (InvalidInputError("bad m_c"), grpc.StatusCode.INVALID_ARGUMENT, 422),
        (UnknownItemError([7], 1), grpc.StatusCode.INVALID_ARGUMENT, 422),
        (NotFoundError("no such version"), grpc.StatusCode.NOT_FOUND, 404),
        (FailedPreconditionError("no snapshot"), grpc.StatusCode.FAILED_PRECONDITION, 409),
        (ArtifactError("corrupted"), grpc.StatusCode.FAILED_PRECONDITION, 409),
        (UnavailableError("nothing loaded"), grpc.StatusCode.UNAVAILABLE, 503),
        (ResourceExhaustedError("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (UnauthenticatedError("token"), grpc.StatusCode.UNAUTHENTICATED, 401),
        (PermissionDeniedError("disabled"), grpc.StatusCode.PERMISSION_DENIED, 403),
        (PayloadTooLargeError("big"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
        (EsansError("base"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_known_errors_keep_their_message(
    exc: EsansError, code: grpc.StatusCode, status: int
) -> None:
    report = describe(exc)
    assert (report.grpc_code, report.http_status, report.code) == (code, status, code.name)
    assert report.message == str(exc)
    assert report.envelope() == {"error": {"code": code.name, "message": str(exc)}}
    assert status_name(exc) == code.name


def test_unknown_errors_are_logged_and_hidden(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="esans_service.errors"):
        report = describe(KeyError("secret internal detail"))
    assert (report.grpc_code, report.http_status) == (grpc.StatusCode.INTERNAL, 500)
    assert report.message == INTERNAL_MESSAGE and "secret" not in report.message
    (record,) = caplog.records
    assert record.exc_info is not None and "KeyError" in record.getMessage()
    assert status_name(KeyError()) == "INTERNAL"


def test_one_table_maps_errors_to_codes_and_back() -> None:
    """A server's class -> (gRPC code, HTTP status) and a client's code -> class are one
    table: every code a server sends comes back as the class it raised (the HTTP-only 413
    shares RESOURCE_EXHAUSTED with 429 and comes back as its parent's)."""
    for code, cls in ERRORS_BY_CODE.items():
        assert cls.grpc_code == code
        again = error_for(code, "m")
        assert type(again) is cls and str(again) == "m"
    assert isinstance(error_for("DEADLINE_EXCEEDED", "late"), DeadlineExceededError)
    assert isinstance(error_for("CANCELLED", "draining"), UnavailableError)
    assert type(error_for("DATA_LOSS", "?")).__name__ == "EsansError"
    assert isinstance(error_for("RESOURCE_EXHAUSTED", "big"), ResourceExhaustedError)
    assert PayloadTooLargeError.grpc_code == "RESOURCE_EXHAUSTED"
