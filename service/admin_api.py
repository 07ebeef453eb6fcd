"""The admin API (``/admin``): list, upload, activate, refresh and delete codebook versions,
behind the admin token (:func:`esans_service.http_access.require_admin`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import redis
from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from esans_sampler.artifact import artifact_from_files
from esans_sampler.catalogue_delta import is_delta
from esans_sampler.errors import PayloadTooLargeError, PermissionDeniedError, UnavailableError
from esans_service.deltas import publish_delta
from esans_service.http_access import Registry, Store, audit, require_admin
from esans_service.registry import CodebookRegistry
from esans_service.settings import Settings
from esans_service.store import CodebookStore
from esans_service.uploads import unpack_upload

T = TypeVar("T")


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
