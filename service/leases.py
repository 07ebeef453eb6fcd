"""Leases: a training run that pins a codebook version keeps it from being deleted.

Every replica that serves a request pinned to a version renews a lease on it in Redis,
``{ns}:lease:{version}``, with a TTL (``ESANS_LEASE_TTL_S``). The renewal runs on a
background thread, at most every quarter TTL per version, so the request path stays free of
Redis calls. While the lease lives, retention skips the version and the admin delete
refuses it unless forced; when the run stops pinning it, the lease expires by itself.

Writing leases needs a Redis user allowed to ``SET`` the lease keys. The serving user of the
deployment is read-only, so ``ESANS_REDIS_LEASE_URL`` may name a user confined to
``{ns}:lease:*`` (``esans-lease`` in ``deploy/redis/users.acl``); without it, leases are
written through the main connection.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable

import redis

logger = logging.getLogger(__name__)

_TICK_S = 1.0


def lease_key(namespace: str, version: str) -> str:
    return f"{namespace}:lease:{version}"


def lease_remaining_s(client: redis.Redis, namespace: str, version: str) -> float | None:
    """Seconds the lease on ``version`` still lives, or None without one."""
    millis = int(client.pttl(lease_key(namespace, version)))
    return None if millis < 0 else millis / 1000.0


class LeaseKeeper:
    """Renews the leases of the versions this replica serves pinned requests for.

    :meth:`used` is called on the request path (a dict assignment, no lock, no Redis);
    a daemon thread renews each version used within the last TTL at most every TTL / 4.
    Store trouble is logged and counted, never raised: sampling does not depend on it.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        ttl_s: float,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._ttl_s = ttl_s
        self._used: dict[str, float] = {}
        self._renewed: dict[str, float] = {}
        self._holder = json.dumps({"replica": socket.gethostname()})
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esans-leases", daemon=True)
        self._on_error = on_error

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def used(self, version: str) -> None:
        if version not in self._used:
            self._wake.set()  # a run starts pinning it: lease it now, not at the next tick
        self._used[version] = time.monotonic()

    def renew_due(self) -> list[str]:
        """Renew every lease that is due now; return the versions renewed."""
        now = time.monotonic()
        renewed = []
        for version, last_used in list(self._used.items()):  # list() copies atomically
            if now - last_used > self._ttl_s:
                self._used.pop(version, None)  # no longer pinned here: let it expire
                self._renewed.pop(version, None)
                continue
            if now - self._renewed.get(version, -self._ttl_s) < self._ttl_s / 4:
                continue
            try:
                self._client.set(
                    lease_key(self._namespace, version), self._holder, ex=max(1, round(self._ttl_s))
                )
            except (redis.RedisError, OSError) as exc:
                if self._on_error is not None:
                    self._on_error(exc)
                logger.warning("cannot renew the lease on codebook %s: %s", version[:16], exc)
                continue
            self._renewed[version] = now
            renewed.append(version)
        return renewed

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(_TICK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.renew_due()
            except Exception:  # the keeper must outlive anything
                logger.exception("renewing leases failed")
