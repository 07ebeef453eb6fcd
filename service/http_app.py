"""The HTTP transport (FastAPI): the sampling API, probes, metrics, and the admin API of
:mod:`esans_service.admin_api`.

``POST /v1/sample`` takes JSON with the field names of ``SampleNegativesRequest`` and
answers with those of ``SampleNegativesResponse``, each tensor as ``{"dtype", "shape",
"data"}`` (see :mod:`esans_sampler.contract`). Routes only convert; :class:`SamplingService`
does the work. One exception handler turns every error into its status and the envelope
``{"error": {"code": "<gRPC code name>", "message": "..."}}``.

Who may call what is :mod:`esans_service.http_access`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from esans_sampler.contract.messages import (
    info_to_json,
    json_request_fields,
    request_from_json,
    response_to_json,
)
from esans_sampler.errors import EsansError, InvalidInputError
from esans_service.admin_api import admin
from esans_service.core import SampleResult, SamplingService
from esans_service.errors import ErrorReport, describe, status_code
from esans_service.http_access import Registry, Service, Store, require_sampler
from esans_service.http_limits import BodyLimit
from esans_service.registry import CodebookRegistry
from esans_service.security import SampleTokens
from esans_service.settings import Settings
from esans_service.store import CodebookStore
from esans_service.worker_metrics import read_all

_HTTP_CODES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED"}


# ----------------------------------------------------------------------------- bodies


# The JSON twin of ``SampleNegativesRequest``, its fields read from the proto; absent fields
# take the server's defaults. ``sampler`` is "esans", "uniform", "popularity", "mixed" or the
# proto enum name ("SAMPLER_KIND_UNIFORM").
SampleBody = create_model(
    "SampleBody",
    __config__=ConfigDict(extra="forbid", strict=True),
    **json_request_fields(),  # type: ignore[call-overload]
)


def sample_to_json(result: SampleResult) -> dict[str, Any]:
    """The JSON twin of ``SampleNegativesResponse`` (``embeddings`` null when not asked)."""
    return response_to_json(
        result.codebook_version, result.sampler, result.sample, result.embeddings
    )


# ----------------------------------------------------------------------------- API routes

api = APIRouter(dependencies=[Depends(require_sampler)])
# Probes and metrics stay open to the kubelet and Prometheus; they tell nothing of the
# catalogue beyond its version.
probes = APIRouter()


@api.post("/v1/sample")
def sample(body: SampleBody, service: Service) -> JSONResponse:  # type: ignore[valid-type]
    """Negatives for a batch (the HTTP twin of ``SampleNegatives``)."""
    request = request_from_json(body.model_dump())  # type: ignore[attr-defined]
    return JSONResponse(sample_to_json(service.sample(request)))


@api.get("/v1/codebook")
def codebook(service: Service, version: Annotated[str, Query()] = "") -> JSONResponse:
    """Facts about the active or a given codebook (the twin of ``GetCodebookInfo``)."""
    return JSONResponse(info_to_json(service.codebook_info(version or None)))


@probes.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "alive"}


@probes.get("/readyz")
def readyz(service: Service, store: Store, registry: Registry) -> JSONResponse:
    """200 when a codebook is served (fresh from Redis, or the last good one while Redis is
    unreachable, reported as stale); 503 before the first codebook and while draining."""
    try:
        redis_ok = bool(store.client.ping())
    except (redis.RedisError, OSError):
        redis_ok = False
    ready = service.ready
    if not ready:
        serving = "nothing"
    elif registry.stale or not redis_ok:
        serving = "last_good_snapshot"
    else:
        serving = "store"
    body = {
        "ready": ready,
        "serving": serving,
        "codebook_version": registry.active_version,
        "redis": "reachable" if redis_ok else "unreachable",
        "stale": registry.stale or (ready and not redis_ok),
        "stale_reason": registry.stale_reason,
        "draining": service.draining,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@probes.get("/metrics")
def metrics(request: Request, service: Service) -> Response:
    """Prometheus text exposition of this replica's metrics (every worker's, merged)."""
    content, content_type = service.metrics.render()
    directory: Path | None = request.app.state.metrics_dir
    if directory is not None:
        content = read_all(directory)
    return Response(content=content, media_type=content_type)


# ----------------------------------------------------------------------------- errors


def _report(exc: Exception) -> ErrorReport:
    if isinstance(exc, RequestValidationError):
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return describe(InvalidInputError(f"invalid request: {details}"))
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "UNKNOWN")
        return ErrorReport(status_code(code), exc.status_code, code, str(exc.detail))
    return describe(exc)


async def _body_format_report(request: Request, exc: RequestValidationError) -> ErrorReport | None:
    """415 for a body that is not declared JSON; for malformed JSON, 422 (as every invalid
    request) with the position; None when the body parsed and only its fields are wrong."""
    body_errors = [e for e in exc.errors() if tuple(e.get("loc", ()))[:1] == ("body",)]
    if not body_errors:
        return None
    content_type = request.headers.get("content-type", "")
    if not content_type.split(";")[0].strip().lower().endswith("json"):
        return ErrorReport(
            status_code("INVALID_ARGUMENT"), 415, "INVALID_ARGUMENT",
            f"the body must be JSON: send Content-Type: application/json "
            f"(got {content_type or 'no content type'})",
        )  # fmt: skip
    broken = next((e for e in body_errors if e.get("type") == "json_invalid"), None)
    if broken is None:
        return None
    loc = tuple(broken.get("loc", ()))
    offset = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
    text = (await request.body())[:offset].decode("utf-8", errors="replace")
    line, column = text.count("\n") + 1, offset - (text.rfind("\n") + 1) + 1
    reason = str(broken.get("ctx", {}).get("error", broken.get("msg", "decode error")))
    return ErrorReport(
        status_code("INVALID_ARGUMENT"), 422, "INVALID_ARGUMENT",
        f"the body is not valid JSON: {reason} at line {line} column {column}",
    )  # fmt: skip


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: status and ``{"error": {"code", "message"}}``."""
    report = None
    if isinstance(exc, RequestValidationError):
        report = await _body_format_report(request, exc)
    report = report or _report(exc)
    headers = {"WWW-Authenticate": "Bearer"} if report.http_status == 401 else None
    return JSONResponse(report.envelope(), status_code=report.http_status, headers=headers)


async def _track_requests(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Metrics for every request; an unhandled exception becomes the 500 envelope here."""
    service: SamplingService = request.app.state.service
    with service.metrics.track("http", "unmatched") as outcome:
        try:
            response = await call_next(request)
        except Exception as exc:
            response = await error_response(request, exc)
        outcome.status = str(response.status_code)
        path = getattr(request.scope.get("route"), "path", None)
        if isinstance(path, str):  # the route template: bounded label values
            outcome.method = path
    return response


# ----------------------------------------------------------------------------- factory


def create_app(
    settings: Settings,
    service: SamplingService,
    store: CodebookStore,
    registry: CodebookRegistry,
    tokens: SampleTokens | None = None,
    metrics_dir: Path | None = None,
) -> FastAPI:
    """The FastAPI app over ``service`` (sampling), ``store`` and ``registry`` (admin); the
    sampling routes need one of ``tokens`` when given; ``/metrics`` merges the worker files
    of ``metrics_dir`` when given."""
    app = FastAPI(
        title="esans-sampler",
        version="1",
        description="ESANS negative sampling (HTTP twin of esans.v1.NegativeSampler)",
    )
    app.state.settings = settings
    app.state.service = service
    app.state.store = store
    app.state.registry = registry
    app.state.tokens = tokens
    app.state.metrics_dir = metrics_dir
    app.include_router(api)
    app.include_router(probes)
    app.include_router(admin)
    for exc_class in (EsansError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_class, error_response)
    app.middleware("http")(_track_requests)
    app.add_middleware(
        BodyLimit,
        limit=settings.max_request_bytes,
        paths=("/v1/sample",),
        setting="ESANS_MAX_REQUEST_BYTES",
    )
    return app
