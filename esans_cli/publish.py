"""``esans publish``: store an artifact in Redis as a new version and activate it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from esans_cli.serve import serve_settings
from esans_sampler.errors import FailedPreconditionError, UnavailableError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="store a codebook artifact in Redis as a new version and activate it",
        description="Verify an artifact, write it to Redis under a new version and flip the "
        "active pointer atomically; running replicas swap to it without a restart.",
    )
    p.add_argument(
        "artifact",
        help="artifact directory written by `esans build`, or a delta written by `esans assign` "
        "(its base version must be in the store)",
    )
    p.add_argument("--redis-url", help="default: ESANS_REDIS_URL, else the embedded Redis")
    p.add_argument("--data-dir", help="embedded Redis data directory (default var/redis)")
    p.add_argument("--namespace", help="Redis key namespace (default esans)")
    p.add_argument("--keep-versions", type=int, help="complete versions kept (default 5)")
    p.add_argument("--no-activate", action="store_true", help="store without activating")
    p.add_argument(
        "--allow-stale-base",
        action="store_true",
        help="publish a delta whose base is no longer the active version (drops what changed "
        "since)",
    )


def run(args: argparse.Namespace) -> int:
    import redis

    from esans_sampler.artifact import read_artifact_files
    from esans_sampler.catalogue_delta import DELTA_MANIFEST, is_delta
    from esans_service.app import connect_redis
    from esans_service.deltas import publish_delta
    from esans_service.embedded_redis import running_embedded_url
    from esans_service.store import CodebookStore

    settings = serve_settings(args)
    delta_manifest = Path(args.artifact) / DELTA_MANIFEST
    if delta_manifest.is_file():  # a catalogue delta from `esans assign`
        files = {p.name: p.read_bytes() for p in Path(args.artifact).iterdir() if p.is_file()}
    else:
        files = read_artifact_files(args.artifact)
    # A publish must reach the Redis the servers read. Starting a throwaway embedded Redis
    # here (as `serve` does) would report success while every server stays on its version.
    if not settings.redis_url and running_embedded_url(settings.data_dir) is None:
        raise FailedPreconditionError(
            "no Redis to publish to: ESANS_REDIS_URL (or --redis-url) is not set and no "
            f"embedded Redis is serving {Path(settings.data_dir).resolve()}; start `esans "
            "serve` first, or pass --data-dir with the data directory of the running one"
        )
    client, embedded = connect_redis(settings)
    target = _redacted(client)
    try:
        store = CodebookStore(client, settings.redis_namespace, settings.keep_versions)
        drift = None
        if is_delta(files):
            version, drift = publish_delta(
                store, files, not args.no_activate, allow_stale_base=args.allow_stale_base
            )
        else:
            version = store.publish(files, activate=not args.no_activate)
    except redis.RedisError as exc:
        raise UnavailableError(
            f"cannot publish to {target}: Redis does not answer ({exc})"
        ) from exc
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
    state = "stored" if args.no_activate else "published and activated"
    if drift is not None:
        state += (
            f" (delta on {str(drift.get('base_version', ''))[:16]}: +{drift.get('added', 0)} "
            f"-{drift.get('retired', 0)} items)"
        )
    print(f"{state} version {version} in {target} (namespace {settings.redis_namespace!r})")
    return 0


def _redacted(client: Any) -> str:
    """Where a Redis client points, without credentials: redis://host:port/db."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
