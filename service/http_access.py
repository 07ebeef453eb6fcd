"""Who may call what over HTTP: the request's service, store and registry, and the admin
and sampling token checks, as FastAPI dependencies.

Admin routes need ``Authorization: Bearer <ESANS_ADMIN_TOKEN>``; without a configured token
they answer 403. Every admin call, allowed or refused, is logged (logger
``esans_service.admin``). Sampling routes need one of ``ESANS_SAMPLE_TOKENS_FILE``'s tokens
when that file is set.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Header, Request

from esans_sampler.errors import PermissionDeniedError, UnauthenticatedError
from esans_service.core import SamplingService
from esans_service.registry import CodebookRegistry
from esans_service.security import SampleTokens
from esans_service.settings import Settings
from esans_service.store import CodebookStore

logger = logging.getLogger(__name__)
audit = logging.getLogger("esans_service.admin")


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
