"""How a replica follows the codebook store: a daemon thread that subscribes to the store's
``{ns}:events`` and also polls the active pointer every ``poll_interval_s`` (events can be lost
across reconnects), and tells the :class:`~esans_service.registry.CodebookRegistry` what
changed: a new active version (refresh), a deleted one (forget), an unreachable Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import redis

from esans_service.store import EVENT_DELETED, CodebookStore, parse_event

if TYPE_CHECKING:
    from esans_service.registry import CodebookRegistry

logger = logging.getLogger(__name__)

# Upper bound on one wait of the watcher, so stop() is prompt.
_WATCH_TICK_S = 0.2


class CodebookWatcher:
    """Keeps ``registry`` in step with ``store`` from a daemon thread, until :meth:`stop`."""

    def __init__(
        self, registry: CodebookRegistry, store: CodebookStore, poll_interval_s: float
    ) -> None:
        self._registry = registry
        self._store = store
        self._poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> CodebookWatcher:
        self._thread = threading.Thread(
            target=self._watch, name="esans-codebook-watcher", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait for it; idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("codebook watcher did not stop within %.1f s", timeout_s)

    def _watch(self) -> None:
        registry = self._registry
        pubsub: redis.client.PubSub | None = None
        next_poll = time.monotonic() + self._poll_interval_s
        retry_subscribe_at = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if pubsub is None and now >= retry_subscribe_at:
                    pubsub = self._subscribe()
                    if pubsub is None:
                        retry_subscribe_at = now + min(1.0, self._poll_interval_s)
                    else:
                        registry.refresh_quietly(skip_recent_failures=False)  # missed events
                wait = max(0.0, min(_WATCH_TICK_S, next_poll - time.monotonic()))
                if pubsub is None:
                    self._stop.wait(wait)
                else:
                    try:
                        message = pubsub.get_message(timeout=wait)
                    except (redis.RedisError, OSError, ValueError) as exc:
                        logger.warning("codebook event subscription lost: %s", exc)
                        _close(pubsub)
                        pubsub = None
                        registry.note_store_error(exc)
                        continue
                    if message is not None and message.get("type") == "message":
                        event = parse_event(message["data"])
                        logger.debug("codebook event %s", event)
                        if event is not None and event[0] == EVENT_DELETED:
                            registry.forget(event[1])
                        registry.refresh_quietly(skip_recent_failures=False)
                if time.monotonic() >= next_poll:
                    registry.refresh_quietly(skip_recent_failures=True)
                    self._forget_deleted()  # events may have been missed
                    next_poll = time.monotonic() + self._poll_interval_s
        finally:
            _close(pubsub)

    def _subscribe(self) -> redis.client.PubSub | None:
        # redis-py leaves pubsub() unannotated.
        pubsub: redis.client.PubSub = self._store.client.pubsub(  # type: ignore[no-untyped-call]
            ignore_subscribe_messages=True
        )
        try:
            pubsub.subscribe(self._store.events_channel)
        except (redis.RedisError, OSError) as exc:
            _close(pubsub)
            self._registry.note_store_error(exc)
            return None
        logger.info("subscribed to %s", self._store.events_channel)
        return pubsub

    def _forget_deleted(self) -> None:
        active = self._registry.active_version
        for version in self._registry.loaded_versions():
            if version == active:
                continue
            try:
                # HGET, not EXISTS: the read-only serving ACL user may run it.
                gone = self._store.client.hget(self._store.meta_key(version), "created_at") is None
            except redis.RedisError:
                return  # unreachable: keep serving what is loaded
            if gone:
                self._registry.forget(version)


def _close(pubsub: redis.client.PubSub | None) -> None:
    if pubsub is None:
        return
    try:
        pubsub.close()
    except (redis.RedisError, OSError) as exc:  # best effort
        logger.debug("closing the subscription failed: %s", exc)
