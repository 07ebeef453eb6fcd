"""The codebooks a replica serves: the active one plus a few pinned ones, swapped atomically.

The registry keeps an immutable snapshot (active codebook + version -> codebook) and
replaces it with one reference assignment, so a request that takes the snapshot sees
exactly one version for its whole life and the request path never touches Redis or a lock.
A daemon watcher thread (:mod:`esans_service.codebook_watcher`) follows the store: it
subscribes to ``{ns}:events`` and also polls the active pointer every ``poll_interval_s``
(events can be lost across reconnects). When Redis is unreachable, or no longer names an
active version (restarted empty), the replica keeps serving its last good codebook and
reports ``stale``; a version that fails verification is never swapped in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType

import redis

from esans_sampler.artifact import EMBEDDINGS_FILE, artifact_from_files
from esans_sampler.errors import (
    ArtifactError,
    EsansError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from esans_service.codebook_watcher import CodebookWatcher
from esans_service.loaded_codebook import LoadedCodebook, load_codebook, shared_snapshot
from esans_service.store import FULL_VERSION_CHARS, MIN_VERSION_PREFIX, CodebookStore

logger = logging.getLogger(__name__)

# A poll skips an active version that failed to load this recently (an event retries it).
_FAILED_RETRY_S = 60.0


@dataclass(frozen=True)
class _Snapshot:
    """What readers see: replaced whole, never mutated."""

    active: LoadedCodebook | None = None
    loaded: Mapping[str, LoadedCodebook] = field(default_factory=lambda: MappingProxyType({}))


def _in_memory(snapshot: _Snapshot, version: str) -> LoadedCodebook | None:
    """The loaded codebook ``version`` names without asking the store: the version itself, or
    a prefix (e.g. the 16 characters `esans build` prints) of exactly one loaded version."""
    loaded = snapshot.loaded.get(version)
    if loaded is None and MIN_VERSION_PREFIX <= len(version) < FULL_VERSION_CHARS:
        named = [v for v in snapshot.loaded if v.startswith(version)]
        if len(named) == 1:
            loaded = snapshot.loaded[named[0]]
    return loaded


class CodebookRegistry:
    """In-memory codebooks of one replica, kept in step with a :class:`CodebookStore`.

    max_loaded: codebooks kept in memory (the active one is never evicted).
    on_swap(version): called after a new active version is swapped in.
    on_store_error(exc): called when Redis fails or the active version cannot be loaded.
    Callbacks run on the thread that noticed the change; their exceptions are logged.
    """

    def __init__(
        self,
        store: CodebookStore,
        max_loaded: int = 3,
        poll_interval_s: float = 5.0,
        on_swap: Callable[[str], None] | None = None,
        on_store_error: Callable[[Exception], None] | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        if max_loaded < 1:
            raise InvalidInputError(f"max_loaded must be >= 1, got {max_loaded}")
        if poll_interval_s <= 0:
            raise InvalidInputError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self._store = store
        self._max_loaded = max_loaded
        self._poll_interval_s = poll_interval_s
        self._on_swap = on_swap
        self._on_store_error = on_store_error
        # Worker processes of one replica map each version's embedding snapshot from one file
        # here, so the largest array is in memory once, not once per worker.
        self._snapshot_dir = snapshot_dir
        self._snapshot = _Snapshot()
        # version -> time.monotonic() of its last use, for LRU eviction (plain dict item
        # assignment, so the request path takes no lock).
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()  # guards snapshot replacement and _inflight
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._inflight: dict[str, Future[LoadedCodebook]] = {}
        self._failed: dict[str, float] = {}
        self._stale_reason: str | None = None
        self._watcher: CodebookWatcher | None = None

    # -- read side (the request path) -------------------------------------------------

    def get(self, version: str | None = None) -> LoadedCodebook:
        """The codebook to serve: the active one for None/"", else the pinned ``version``.

        A loaded version costs no Redis call and no lock. A pinned version not in memory is
        loaded (and verified) from the store first.

        Raises:
            UnavailableError: nothing is loaded yet, or the store is unreachable for a
                pinned version that is not in memory.
            NotFoundError: the store does not have ``version``.
            FailedPreconditionError: ``version`` is incomplete or corrupted in the store.
        """
        snapshot = self._snapshot
        if not version:
            if snapshot.active is None:
                raise UnavailableError(
                    "no codebook is loaded yet: publish one (esans publish) or wait for the "
                    f"store; {self._stale_reason or 'no active version in the store'}"
                )
            self._last_used[snapshot.active.version] = time.monotonic()
            return snapshot.active
        loaded = _in_memory(snapshot, version)
        if loaded is None and len(version) < FULL_VERSION_CHARS:
            # A prefix that names no single loaded version: the store resolves it.
            try:
                version = self._store.resolve(version)
            except redis.RedisError as exc:
                raise UnavailableError(
                    f"cannot resolve version prefix {version!r}: the store is unreachable "
                    f"({exc}); give the full version to use a loaded one"
                ) from exc
            loaded = snapshot.loaded.get(version)
        if loaded is not None:
            self._last_used[loaded.version] = time.monotonic()
            return loaded
        return self._load_pinned(version)

    def in_memory(self, version: str | None) -> bool:
        """Whether :meth:`get` of ``version`` is served from memory, without the store (the
        active one, a loaded version, or a prefix naming exactly one loaded version)."""
        return not version or _in_memory(self._snapshot, version) is not None

    @property
    def active_version(self) -> str | None:
        """The version served to requests that pin none, or None before the first load."""
        active = self._snapshot.active
        return None if active is None else active.version

    @property
    def ready(self) -> bool:
        """Whether a codebook is loaded (requests that pin no version can be served)."""
        return self._snapshot.active is not None

    @property
    def stale(self) -> bool:
        """Whether the served active version may lag the store: Redis is unreachable, names
        no active version, or names one that cannot be loaded."""
        return self._stale_reason is not None

    @property
    def stale_reason(self) -> str | None:
        """Why :attr:`stale` is set, for logs and readiness messages."""
        return self._stale_reason

    def loaded_versions(self) -> list[str]:
        """Versions in memory, most recently used first."""
        loaded = list(self._snapshot.loaded)
        return sorted(loaded, key=lambda v: self._last_used.get(v, 0.0), reverse=True)

    # -- pinned versions --------------------------------------------------------------

    def _load_pinned(self, version: str) -> LoadedCodebook:
        with self._lock:
            loaded = self._snapshot.loaded.get(version)
            if loaded is not None:
                return loaded
            future = self._inflight.get(version)
            owner = future is None
            if future is None:
                future = Future[LoadedCodebook]()
                self._inflight[version] = future
        if not owner:
            return future.result()
        try:
            loaded = self._load_from_store(version)
            self._install(loaded, make_active=False)
            future.set_result(loaded)
            return loaded
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(version, None)

    def _load_from_store(self, version: str) -> LoadedCodebook:
        try:
            files = self._store.get_files(version)
        except NotFoundError as exc:
            raise NotFoundError(
                f"codebook version {version!r} does not exist; loaded versions: "
                f"{self.loaded_versions() or 'none'} ({exc})"
            ) from exc
        except redis.RedisError as exc:
            self.note_store_error(exc)
            raise UnavailableError(
                f"codebook version {version!r} is not in memory and the store is "
                f"unreachable ({exc}); loaded versions: {self.loaded_versions() or 'none'}"
            ) from exc
        artifact = artifact_from_files(files, verify=True)
        if artifact.version != version:
            raise ArtifactError(f"the store's files for {version} hold version {artifact.version}")
        if self._snapshot_dir is not None and artifact.embeddings is not None:
            artifact = shared_snapshot(artifact, files[EMBEDDINGS_FILE], self._snapshot_dir)
        return load_codebook(artifact)

    # -- write side -------------------------------------------------------------------

    def _install(self, loaded: LoadedCodebook, make_active: bool) -> None:
        """Add ``loaded`` (and make it active) in one snapshot replacement; evict LRU."""
        with self._lock:
            current = self._snapshot
            active = loaded if make_active else current.active
            now = time.monotonic()
            self._last_used[loaded.version] = now
            versions = dict(current.loaded)
            versions[loaded.version] = loaded
            while len(versions) > self._max_loaded:
                evictable = [v for v in versions if active is None or v != active.version]
                victim = min(evictable, key=lambda v: self._last_used.get(v, 0.0))
                del versions[victim]
                logger.info("evicted codebook %s from memory", victim)
            for version in list(self._last_used):  # list(dict) copies atomically
                if version not in versions:
                    self._last_used.pop(version, None)
            self._snapshot = _Snapshot(active=active, loaded=MappingProxyType(versions))

    def refresh(self) -> bool:
        """Follow the store's active pointer once; return whether the active one changed.

        Never raises for store trouble: on Redis errors, a missing pointer or a version
        that fails to load, the current codebook stays and :attr:`stale` is set.
        """
        return self._refresh(skip_recent_failures=False)

    def _refresh(self, skip_recent_failures: bool) -> bool:
        with self._refresh_lock:
            try:
                version = self._store.active_version()
            except redis.RedisError as exc:
                self.note_store_error(exc)
                return False
            current = self._snapshot.active
            if version is None:
                if current is not None:
                    self._set_stale(
                        f"the store names no active codebook (was Redis wiped?); serving "
                        f"last good {current.version}"
                    )
                else:
                    self._set_stale(None)
                return False
            if current is not None and current.version == version:
                self._set_stale(None)
                return False
            failed_at = self._failed.get(version)
            if (
                skip_recent_failures
                and failed_at is not None
                and time.monotonic() - failed_at < _FAILED_RETRY_S
            ):
                return False
            loaded = self._snapshot.loaded.get(version)
            if loaded is None:
                try:
                    loaded = self._load_from_store(version)
                except UnavailableError:
                    return False  # already noted as a store error
                except EsansError as exc:
                    self._failed[version] = time.monotonic()
                    served = current.version if current is not None else "nothing"
                    logger.error(
                        "active codebook %s cannot be loaded, still serving %s: %s",
                        version,
                        served,
                        exc,
                    )
                    self._set_stale(f"active codebook {version} cannot be loaded: {exc}")
                    self._notify_error(exc)
                    return False
            self._failed.pop(version, None)
            self._install(loaded, make_active=True)
            self._set_stale(None)
        logger.info("now serving codebook %s", version)
        if self._on_swap is not None:
            try:
                self._on_swap(version)
            except Exception:
                logger.exception("on_swap callback failed")
        return True

    def _set_stale(self, reason: str | None) -> None:
        if reason != self._stale_reason:
            if reason is None:
                logger.info("codebook store reachable again; no longer stale")
            else:
                logger.warning("codebook registry is stale: %s", reason)
        self._stale_reason = reason

    def note_store_error(self, exc: Exception) -> None:
        """Redis failed: keep serving the last good codebook, report stale and tell the
        ``on_store_error`` callback."""
        served = self.active_version
        self._set_stale(
            f"codebook store unreachable ({type(exc).__name__}: {exc}); serving last good "
            f"{served or 'nothing'}"
        )
        self._notify_error(exc)

    def _notify_error(self, exc: Exception) -> None:
        if self._on_store_error is not None:
            try:
                self._on_store_error(exc)
            except Exception:
                logger.exception("on_store_error callback failed")

    # -- following the store ------------------------------------------------------------

    def start(self) -> CodebookRegistry:
        """Refresh once, then follow the store from a daemon thread
        (:class:`~esans_service.codebook_watcher.CodebookWatcher`); no-op if running."""
        if self._watcher is not None and self._watcher.running:
            return self
        self.refresh()
        self._watcher = CodebookWatcher(self, self._store, self._poll_interval_s).start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the watcher thread and wait for it; idempotent."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop(timeout_s)

    def __enter__(self) -> CodebookRegistry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def forget(self, version: str) -> None:
        """Drop a loaded, non-active ``version`` from memory (it was deleted from the store),
        so requests pinned to it get NOT_FOUND here as on every other replica."""
        with self._lock:
            snapshot = self._snapshot
            active = snapshot.active
            if version not in snapshot.loaded or (active and active.version == version):
                return
            versions = {v: c for v, c in snapshot.loaded.items() if v != version}
            self._snapshot = _Snapshot(active=active, loaded=MappingProxyType(versions))
        self._last_used.pop(version, None)
        logger.info("codebook %s was deleted from the store; dropped from memory", version)

    def refresh_quietly(self, skip_recent_failures: bool) -> None:
        """:meth:`refresh` for the watcher: a poll skips an active version that failed to
        load in the last minute (an event retries it), and nothing escapes."""
        try:
            self._refresh(skip_recent_failures=skip_recent_failures)
        except Exception:  # the watcher must survive anything
            logger.exception("codebook refresh failed")
