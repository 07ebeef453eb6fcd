"""The HTTP transport (FastAPI): the sampling API, probes, metrics and the admin API.

``POST /v1/sample`` takes JSON with the field names of ``SampleNegativesRequest`` and
answers with those of ``SampleNegativesResponse``, each tensor as ``{"dtype", "shape",
"data"}`` (see :mod:`esans_sampler.contract`). Routes only convert; :class:`SamplingService`
does the work. One exception handler turns every error into its status and the envelope
``{"error": {"code": "<gRPC code name>", "message": "..."}}``.

Admin routes (``/admin``) need ``Authorization: Bearer <ESANS_ADMIN_TOKEN>``; without a
configured token they answer 403. Every admin call, allowed or refused, is logged.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import redis
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from esans_sampler.artifact import artifact_from_files
from esans_sampler.catalogue_delta import is_delta
from esans_sampler.contract.messages import (
    info_to_json,
    json_request_fields,
    request_from_json,
    response_to_json,
)
from esans_sampler.errors import (
    EsansError,
    InvalidInputError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from esans_service.core import SampleResult, SamplingService
from esans_service.deltas import publish_delta
from esans_service.errors import ErrorReport, describe, status_code
from esans_service.http_limits import BodyLimit
from esans_service.registry import CodebookRegistry
from esans_service.security import SampleTokens
from esans_service.settings import Settings
from esans_service.store import CodebookStore
from esans_service.uploads import unpack_upload
from esans_service.worker_metrics import read_all

logger = logging.getLogger(__name__)
audit = logging.getLogger("esans_service.admin")

T = TypeVar("T")
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


# ----------------------------------------------------------------------------- dependencies


def get_service(request: Request) -> SamplingService:
    service: SamplingService = request.app.state.service
    return service


def get_store(request: Request) -> CodebookStore:
    store: CodebookStore = request.app.state.store
    return store


def get_registry(request: Request) -> CodebookRegistry:
    registry: CodebookRegistry = request.app.state.registry
    return registry


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Let the call through only with the configured bearer token (constant-time compare)."""
    settings: Settings = request.app.state.settings
    action = f"{request.method} {request.url.path}"
    client = request.client.host if request.client is not None else "unknown"
    if settings.admin_token is None:
        audit.warning("admin %s from %s refused: the admin API is disabled", action, client)
        raise PermissionDeniedError(
            "the admin API is disabled on this server; start it with ESANS_ADMIN_TOKEN set "
            "to enable it"
        )
    scheme, _, token = (authorization or "").partition(" ")
    expected = settings.admin_token.get_secret_value().encode("utf-8")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode("utf-8"), expected
    ):
        audit.warning("admin %s from %s refused: missing or wrong bearer token", action, client)
        raise UnauthenticatedError(
            "admin calls need the header 'Authorization: Bearer <admin token>' with the "
            "server's ESANS_ADMIN_TOKEN"
        )
    audit.info("admin %s from %s", action, client)


def require_sampler(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    """With ``ESANS_SAMPLE_TOKENS_FILE`` set, let the call through only with one of its tokens
    (constant-time compare); the admin token is not one of them."""
    tokens: SampleTokens | None = request.app.state.tokens
    if tokens is None:
        return
    service: SamplingService = request.app.state.service
    try:
        name = tokens.authenticate(authorization)
    except UnauthenticatedError:
        service.metrics.unauthenticated.labels(transport="http").inc()
        client = request.client.host if request.client is not None else "unknown"
        logger.warning("%s %s from %s refused: no valid sampling token", request.method,
                       request.url.path, client)  # fmt: skip
        raise
    service.metrics.trainer_calls.labels(trainer=name, transport="http").inc()


Service = Annotated[SamplingService, Depends(get_service)]
Store = Annotated[CodebookStore, Depends(get_store)]
Registry = Annotated[CodebookRegistry, Depends(get_registry)]


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


# ----------------------------------------------------------------------------- admin routes

admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@admin.get("/versions")
def list_versions(store: Store, registry: Registry) -> dict[str, Any]:
    """Every stored version, newest first, and what this replica holds in memory."""
    versions = _store_call(store.versions)
    return {
        "active_version": _store_call(store.active_version),
        "serving_version": registry.active_version,
        "loaded_versions": registry.loaded_versions(),
        "versions": [
            {
                "version": v.version,
                # ISO 8601 (UTC), like the codebook's own created_at in GetCodebookInfo
                "created_at": dt.datetime.fromtimestamp(v.created_at, dt.UTC).isoformat(
                    timespec="seconds"
                ),
                "complete": v.complete,
                "active": v.active,
                "num_items": v.num_items,
                "size_bytes": v.size_bytes,
                "summary": dict(v.summary),
            }
            for v in versions
        ],
    }


@admin.post("/artifacts")
async def upload_artifact(
    request: Request,
    store: Store,
    registry: Registry,
    activate: Annotated[bool, Query()] = True,
    allow_stale_base: Annotated[bool, Query()] = False,
) -> dict[str, Any]:
    """Publish an artifact sent as a tar(.gz) or zip of its directory, or as multipart
    files; it is verified before it is stored and, as with ``esans publish``, activated
    unless ``?activate=false`` (then only stored, like ``esans publish --no-activate``). A
    catalogue delta (``esans assign``) is applied to its base version and published whole."""
    settings: Settings = request.app.state.settings
    body = await _read_body(request, settings.max_upload_bytes)
    content_type = request.headers.get("content-type", "")
    files = await run_in_threadpool(unpack_upload, body, content_type, settings.max_upload_bytes)
    version = await run_in_threadpool(_publish, store, registry, files, activate, allow_stale_base)
    audit.info("admin published codebook %s (activate=%s)", version, activate)
    return {
        "version": version,
        "activated": activate,
        "active_version": registry.active_version,
    }


@admin.post("/versions/{version}/activate")
def activate_version(version: str, store: Store, registry: Registry) -> dict[str, Any]:
    """Make a stored version the active one (a rollback when it is older)."""
    version = _store_call(lambda: store.activate(version))
    registry.refresh()
    audit.info("admin activated codebook %s", version)
    return {"active_version": version, "serving_version": registry.active_version}


@admin.post("/refresh")
def refresh(registry: Registry) -> dict[str, Any]:
    """Follow the store's active pointer now instead of at the next poll."""
    changed = registry.refresh()
    return {
        "changed": changed,
        "serving_version": registry.active_version,
        "stale": registry.stale,
        "stale_reason": registry.stale_reason,
    }


@admin.delete("/versions/{version}")
def delete_version(
    version: str, store: Store, force: Annotated[bool, Query()] = False
) -> dict[str, str]:
    """Delete a stored version (never the active one)."""
    version = _store_call(lambda: store.delete(version, force=force))
    audit.info("admin deleted codebook %s%s", version, " (forced past its lease)" if force else "")
    return {"deleted": version}


def _store_call(call: Callable[[], T]) -> T:
    try:
        return call()
    except redis.exceptions.NoPermissionError as exc:
        # Serving replicas normally hold a read-only Redis user (deploy/redis/users.acl).
        raise PermissionDeniedError(
            f"this replica's Redis user may not write ({exc}); publish with `esans publish` "
            "and a read-write user, or point an admin replica's ESANS_REDIS_URL at one"
        ) from exc
    except redis.RedisError as exc:
        raise UnavailableError(f"the codebook store (Redis) is unreachable: {exc}") from exc


def _publish(
    store: CodebookStore,
    registry: CodebookRegistry,
    files: dict[str, bytes],
    activate: bool,
    allow_stale_base: bool = False,
) -> str:
    if is_delta(files):  # a catalogue delta from `esans assign`: base from the store + delta
        version = _store_call(lambda: publish_delta(store, files, activate, allow_stale_base)[0])
    else:
        artifact_from_files(files, verify=True)  # refuse a damaged upload before Redis
        version = _store_call(lambda: store.publish(files, activate=activate))
    if activate:
        registry.refresh()
    return version


# ----------------------------------------------------------------------------- uploads


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"upload of {declared} bytes exceeds max_upload_bytes={limit}")
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        if len(buffer) > limit:
            raise PayloadTooLargeError(f"upload exceeds max_upload_bytes={limit}")
    return bytes(buffer)


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
