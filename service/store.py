"""Codebook versions in Redis: publish, verify, activate (and roll back), list, delete.

Layout under the namespace ``ns`` (default ``"esans"``); versions are content digests
(:attr:`CodebookArtifact.version`), so a version's bytes never change:

``{ns}:active``                       the active version (a string)
``{ns}:versions``                     sorted set: version -> created_at (unix seconds)
``{ns}:v:{version}:meta``             hash: created_at, complete ("0"/"1"), num_items,
                                      size_bytes, summary (JSON), layout (JSON)
``{ns}:v:{version}:file:{name}``      the bytes of one artifact file, or, for a file larger
``{ns}:v:{version}:file:{name}:{i}``  than ``chunk_bytes``, its parts 0, 1, ...
``{ns}:events``                       pub/sub channel: JSON ``{"event", "version"}``
``{ns}:lock:{version}``               held while one client writes that version
``{ns}:lease:{version}``              a training run pins it (TTL; see esans_service.leases)

Publishing writes the files, reads them back and verifies them with
:func:`artifact_from_files` before the version is marked complete; only then is the active
pointer flipped, by a Lua script that re-checks completeness and the presence of every
file key, sets the pointer and publishes the event in one atomic step. Redis caps a value
at 512 MB, so large files (embedding snapshots) are split into ``chunk_bytes`` parts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from esans_sampler.artifact import MANIFEST, artifact_from_files, check_files, manifest_of
from esans_sampler.errors import (
    ArtifactError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
)
from esans_service.leases import lease_key, lease_remaining_s

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "esans"
FULL_VERSION_CHARS = 64  # a version is the sha256 of the artifact's files, in hex
MIN_VERSION_PREFIX = 8
DEFAULT_KEEP_VERSIONS = 5
# Well below Redis' 512 MB value limit; a 64 MiB SET also keeps the server responsive.
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
REDIS_MAX_VALUE_BYTES = 512 * 1024 * 1024
# An incomplete version older than this is a crashed publish and may be cleaned up.
DEFAULT_INCOMPLETE_GRACE_S = 3600.0
# A publish holds a per-version lock at most this long (it expires if the publisher dies).
DEFAULT_LOCK_TIMEOUT_S = 600.0

EVENT_ACTIVATED = "activated"
EVENT_PUBLISHED = "published"
EVENT_DELETED = "deleted"

# KEYS: meta, active, file keys...; ARGV: version, channel, event payload.
# Returns 1 (activated), 0 (unknown version), -1 (incomplete), -2 (a file key is missing).
_ACTIVATE_LUA = """
local complete = redis.call('HGET', KEYS[1], 'complete')
if not complete then return 0 end
if complete ~= '1' then return -1 end
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return -2 end
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

# KEYS: meta, active, versions, file keys...; ARGV: version, channel, event payload.
# Returns 1 (deleted), 0 (unknown version), -1 (it is the active version).
_DELETE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return 0
end
if redis.call('GET', KEYS[2]) == ARGV[1] then return -1 end
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[4]) == 1 then return -2 end
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class VersionInfo:
    """One stored codebook version, as listed by :meth:`CodebookStore.versions`.

    created_at: unix seconds of the first publish. size_bytes: all files together.
    summary: the manifest's summary (num_items, modality_names, num_primary, ...).
    """

    version: str
    created_at: float
    complete: bool
    active: bool
    num_items: int
    size_bytes: int
    summary: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Layout:
    """Which Redis keys hold each file: name -> list of keys (one, or its parts in order)."""

    parts: dict[str, list[str]]

    @property
    def keys(self) -> list[str]:
        return [key for name in sorted(self.parts) for key in self.parts[name]]

    def to_json(self) -> str:
        return json.dumps(self.parts, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str | None, version: str) -> _Layout:
        if raw is None:
            raise ArtifactError(f"codebook {version}: its metadata has no file layout")
        try:
            parts = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ArtifactError(f"codebook {version}: unreadable file layout ({exc})") from exc
        if not isinstance(parts, dict) or not all(
            isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            for keys in parts.values()
        ):
            raise ArtifactError(f"codebook {version}: malformed file layout")
        return cls(cast(dict[str, list[str]], parts))


class CodebookStore:
    """Codebook versions kept in Redis under a key namespace (see the module docstring).

    client: a ``redis.Redis`` with ``decode_responses=False`` (files are binary).
    keep_versions: the newest complete versions kept after a publish; the active version is
    always kept on top of them.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = DEFAULT_NAMESPACE,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        incomplete_grace_s: float = DEFAULT_INCOMPLETE_GRACE_S,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ) -> None:
        if not namespace or any(c.isspace() for c in namespace):
            raise InvalidInputError(f"namespace must be a non-empty word, got {namespace!r}")
        if keep_versions < 1:
            raise InvalidInputError(f"keep_versions must be >= 1, got {keep_versions}")
        if not 1 <= chunk_bytes <= REDIS_MAX_VALUE_BYTES:
            raise InvalidInputError(
                f"chunk_bytes must be in [1, {REDIS_MAX_VALUE_BYTES}] (Redis' value limit), "
                f"got {chunk_bytes}"
            )
        if incomplete_grace_s < 0:
            raise InvalidInputError("incomplete_grace_s must be >= 0")
        if lock_timeout_s <= 0:
            raise InvalidInputError("lock_timeout_s must be > 0")
        if client.get_connection_kwargs().get("decode_responses"):
            raise InvalidInputError("CodebookStore needs a client with decode_responses=False")
        self._client = client
        self._ns = namespace
        self._keep = keep_versions
        self._chunk = chunk_bytes
        self._grace = incomplete_grace_s
        self._lock_timeout_s = lock_timeout_s
        self._activate_script = client.register_script(_ACTIVATE_LUA)
        self._delete_script = client.register_script(_DELETE_LUA)

    # -- keys ------------------------------------------------------------------------

    @property
    def client(self) -> redis.Redis:
        """The Redis client (shared; the store does not close it)."""
        return self._client

    @property
    def namespace(self) -> str:
        return self._ns

    @property
    def active_key(self) -> str:
        return f"{self._ns}:active"

    @property
    def versions_key(self) -> str:
        return f"{self._ns}:versions"

    @property
    def events_channel(self) -> str:
        """The pub/sub channel on which activations, publishes and deletes are announced."""
        return f"{self._ns}:events"

    def meta_key(self, version: str) -> str:
        return f"{self._ns}:v:{version}:meta"

    def file_key(self, version: str, name: str, part: int | None = None) -> str:
        """Key of file ``name`` of ``version``, or of its ``part``-th chunk."""
        base = f"{self._ns}:v:{version}:file:{name}"
        return base if part is None else f"{base}:{part}"

    # -- publishing -------------------------------------------------------------------

    def publish(self, files: Mapping[str, bytes], activate: bool = True) -> str:
        """Store the artifact ``files`` (from ``artifact_to_files``) as a version; return it.

        The files are written, read back and verified (checksums and array consistency)
        before the version is marked complete; with ``activate`` the active pointer is then
        flipped atomically and an event published. Publishing an already complete version
        writes nothing (unless its stored copy fails verification, which is then
        repaired). Old versions beyond ``keep_versions`` are deleted afterwards.

        Raises:
            ArtifactError: the files are not a valid artifact (nothing is left activated).
            FailedPreconditionError: another publish of this version held its lock for
                ``lock_timeout_s``.
            redis.RedisError: Redis failed; a half-written version stays incomplete and is
                never activated.
        """
        manifest = manifest_of(files)
        version = str(manifest["version"])
        names = [MANIFEST, *sorted(manifest["files"])]
        missing = [name for name in names if name not in files]
        if missing:
            raise ArtifactError(f"codebook {version}: file(s) {missing} are missing")
        # The incoming copy is checked before anything else: a damaged directory whose
        # version is already stored must fail, not report success.
        try:
            check_files(files, verify=True)
        except ArtifactError as exc:
            raise ArtifactError(f"codebook {version[:16]}: {exc}") from exc
        # One writer per version: concurrent publishes of the same content wait, then find
        # it complete and write nothing.
        lock = self._client.lock(
            f"{self._ns}:lock:{version}",
            timeout=self._lock_timeout_s,
            sleep=0.05,
            blocking_timeout=self._lock_timeout_s,
            thread_local=False,
            raise_on_release_error=False,
        )
        if not lock.acquire():
            raise FailedPreconditionError(
                f"another publish of codebook {version} has held its lock for "
                f"{self._lock_timeout_s:.0f} s; retry later"
            )
        try:
            if self._stored_copy_is_good(version):
                logger.info("codebook %s is already stored and complete", version)
            else:
                self._write(version, {name: bytes(files[name]) for name in names}, manifest)
        finally:
            lock.release()
        if activate:
            self._activate_verified(version)
        self.enforce_retention()
        return version

    def _stored_copy_is_good(self, version: str) -> bool:
        meta = self._meta(version)
        if meta is None or meta.get("complete") != "1":
            return False
        try:
            self.verify(version)
        except ArtifactError as exc:
            logger.warning("stored codebook %s is damaged (%s); writing it again", version, exc)
            return False
        return True

    def _write(self, version: str, files: dict[str, bytes], manifest: Mapping[str, Any]) -> None:
        layout = _Layout(
            {name: self._part_keys(version, name, len(data)) for name, data in files.items()}
        )
        summary = manifest.get("summary", {})
        num_items = summary.get("num_items", 0) if isinstance(summary, dict) else 0
        meta_key = self.meta_key(version)
        existing = cast(bytes | None, self._client.hget(meta_key, "created_at"))
        created_at = float(existing) if existing is not None else time.time()
        # Incomplete first, so a crash mid-write leaves a version that is never served.
        with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(meta_key)
            pipe.hset(
                meta_key,
                mapping={
                    "created_at": repr(created_at),
                    "complete": "0",
                    "num_items": str(int(num_items)),
                    "size_bytes": str(sum(len(data) for data in files.values())),
                    "summary": json.dumps(summary, sort_keys=True),
                    "layout": layout.to_json(),
                },
            )
            pipe.zadd(self.versions_key, {version: created_at})
            pipe.execute()
        for name, data in files.items():
            keys = layout.parts[name]
            with self._client.pipeline(transaction=False) as pipe:
                for i, key in enumerate(keys):
                    pipe.set(key, data[i * self._chunk : (i + 1) * self._chunk])
                pipe.execute()
        try:
            self._verify(version, allow_incomplete=True)
        except ArtifactError:
            logger.error("codebook %s failed verification after writing; removing it", version)
            self._delete_keys(version, layout, force=True)  # broken bytes: nothing to keep
            raise
        self._client.hset(meta_key, "complete", "1")
        self._client.publish(self.events_channel, self._event(EVENT_PUBLISHED, version))
        logger.info("published codebook %s (%d files)", version, len(files))

    def _part_keys(self, version: str, name: str, size: int) -> list[str]:
        if size <= self._chunk:
            return [self.file_key(version, name)]
        count = -(-size // self._chunk)
        return [self.file_key(version, name, i) for i in range(count)]

    # -- activation -------------------------------------------------------------------

    def resolve(self, version: str) -> str:
        """The full version a prefix names (the 16-character form build, publish and demo
        print, or any unique prefix of at least :data:`MIN_VERSION_PREFIX` characters).

        Raises:
            InvalidInputError: the prefix is too short or matches several versions.
            NotFoundError: no stored version starts with it.
        """
        if len(version) >= FULL_VERSION_CHARS:
            return version
        if len(version) < MIN_VERSION_PREFIX:
            raise InvalidInputError(
                f"version {version!r} is too short: give at least {MIN_VERSION_PREFIX} "
                "characters of it (or all 64)"
            )
        raw = cast(list[bytes], self._client.zrange(self.versions_key, 0, -1))
        stored = [v.decode("utf-8") for v in raw]
        matches = sorted(v for v in stored if v.startswith(version))
        if not matches:
            raise NotFoundError(self._unknown_message(version))
        if len(matches) > 1:
            shown = ", ".join(m[:16] for m in matches[:5])
            raise InvalidInputError(
                f"version prefix {version!r} is ambiguous: it starts {len(matches)} stored "
                f"versions ({shown}); give more characters"
            )
        return matches[0]

    def activate(self, version: str) -> str:
        """Make ``version`` (or a unique prefix of it) the active one (a rollback when it is
        older); return the full version.

        Its files are read back and verified first; the pointer flip itself is atomic and
        re-checks that the version is complete and every file key exists.

        Raises:
            NotFoundError: no such version.
            FailedPreconditionError: the version is incomplete, partial or corrupted
                (:class:`ArtifactError` for the latter two).
        """
        version = self.resolve(version)
        self.verify(version)
        self._activate_verified(version)
        return version

    def _activate_verified(self, version: str) -> None:
        layout = self._layout(version)
        result = self._activate_script(
            keys=[self.meta_key(version), self.active_key, *layout.keys],
            args=[version, self.events_channel, self._event(EVENT_ACTIVATED, version)],
        )
        code = int(result)
        if code == 0:
            raise NotFoundError(f"codebook {version} is not in the store")
        if code == -1:
            raise FailedPreconditionError(
                f"codebook {version} is incomplete (its publish has not finished)"
            )
        if code == -2:
            raise ArtifactError(f"codebook {version} is partial: a file is missing from Redis")
        logger.info("activated codebook %s", version)

    def active_version(self) -> str | None:
        """The active version, or None when nothing was activated (or Redis was wiped)."""
        value = self._client.get(self.active_key)
        return None if value is None else cast(bytes, value).decode("utf-8")

    # -- reading ----------------------------------------------------------------------

    def get_files(self, version: str) -> dict[str, bytes]:
        """All files of a complete ``version`` (not verified; see :meth:`verify`).

        Raises:
            NotFoundError: no such version.
            FailedPreconditionError: the version is incomplete.
            ArtifactError: a file is missing from Redis.
        """
        return self._read(version, allow_incomplete=False)

    def verify(self, version: str) -> dict[str, bytes]:
        """Read a complete ``version`` and check it fully (checksums, arrays); return its files.

        Raises:
            NotFoundError: no such version.
            FailedPreconditionError: the version is incomplete.
            ArtifactError: a file is missing or corrupted.
        """
        return self._verify(version, allow_incomplete=False)

    def _verify(self, version: str, allow_incomplete: bool) -> dict[str, bytes]:
        files = self._read(version, allow_incomplete=allow_incomplete)
        artifact = artifact_from_files(files, verify=True)
        if artifact.version != version:
            raise ArtifactError(
                f"codebook {version}: stored manifest names version {artifact.version}"
            )
        return files

    def _read(self, version: str, allow_incomplete: bool) -> dict[str, bytes]:
        meta = self._meta(version)
        if meta is None:
            raise NotFoundError(self._unknown_message(version))
        if meta.get("complete") != "1" and not allow_incomplete:
            raise FailedPreconditionError(
                f"codebook {version} is incomplete (its publish has not finished)"
            )
        layout = _Layout.from_json(meta.get("layout"), version)
        with self._client.pipeline(transaction=False) as pipe:
            for key in layout.keys:
                pipe.get(key)
            values = pipe.execute()
        by_key = dict(zip(layout.keys, values, strict=True))
        files: dict[str, bytes] = {}
        for name, keys in layout.parts.items():
            chunks = [by_key[key] for key in keys]
            if any(chunk is None for chunk in chunks):
                raise ArtifactError(f"codebook {version} is partial: {name} is missing from Redis")
            files[name] = b"".join(chunks)
        return files

    def _meta(self, version: str) -> dict[str, str] | None:
        raw = cast(dict[bytes, bytes], self._client.hgetall(self.meta_key(version)))
        if not raw:
            return None
        return {key.decode("utf-8"): value.decode("utf-8") for key, value in raw.items()}

    def _layout(self, version: str) -> _Layout:
        raw = self._client.hget(self.meta_key(version), "layout")
        if raw is None:
            raise NotFoundError(self._unknown_message(version))
        return _Layout.from_json(cast(bytes, raw), version)

    def _unknown_message(self, version: str) -> str:
        known = [info.version for info in self.versions()]
        return f"codebook {version!r} is not in the store; stored versions: {known or 'none'}"

    def versions(self) -> list[VersionInfo]:
        """Every stored version, newest first, complete or not."""
        entries = cast(
            list[tuple[bytes, float]],
            self._client.zrevrange(self.versions_key, 0, -1, withscores=True),
        )
        active = self.active_version()
        infos = []
        for raw_version, score in entries:
            version = raw_version.decode("utf-8")
            meta = self._meta(version) or {}
            try:
                summary = json.loads(meta.get("summary", "{}"))
            except ValueError:
                summary = {}
            infos.append(
                VersionInfo(
                    version=version,
                    created_at=float(meta.get("created_at", score)),
                    complete=meta.get("complete") == "1",
                    active=version == active,
                    num_items=int(meta.get("num_items", 0)),
                    size_bytes=int(meta.get("size_bytes", 0)),
                    summary=summary if isinstance(summary, dict) else {},
                )
            )
        return infos

    # -- deletion and retention -------------------------------------------------------

    def delete(self, version: str, force: bool = False) -> str:
        """Delete ``version`` (or a unique prefix of it) and its files; return the full
        version.

        Raises:
            NotFoundError: no such version.
            FailedPreconditionError: it is the active version (activate another first), or a
                training run holds a lease on it (see :mod:`esans_service.leases`) and
                ``force`` is false.
        """
        version = self.resolve(version)
        meta = self._meta(version)
        layout = _Layout({}) if meta is None else _Layout.from_json(meta.get("layout"), version)
        code = self._delete_keys(version, layout, force)
        if code == 0:
            raise NotFoundError(self._unknown_message(version))
        if code == -1:
            raise FailedPreconditionError(
                f"codebook {version} is the active version; activate another one before deleting it"
            )
        if code == -2:  # the lease was checked inside the same script as the delete
            leased = lease_remaining_s(self._client, self._ns, version) or 0.0
            raise FailedPreconditionError(
                f"codebook {version} is pinned by a training run (its lease expires in "
                f"{leased:.0f} s unless renewed); stop the run or wait, or delete with force "
                "(esans versions delete --force, DELETE ...?force=true)"
            )
        logger.info("deleted codebook %s", version)
        return version

    def _delete_keys(self, version: str, layout: _Layout, force: bool = False) -> int:
        lease = lease_key(self._ns, version)
        result = self._delete_script(
            keys=[self.meta_key(version), self.active_key, self.versions_key, lease, *layout.keys],
            args=[
                version,
                self.events_channel,
                self._event(EVENT_DELETED, version),
                "1" if force else "0",
            ],
        )
        return int(result)

    def enforce_retention(self) -> list[str]:
        """Delete complete versions beyond the newest ``keep_versions`` (never the active
        one, nor one a training run holds a lease on) and incomplete ones older than the grace
        period; return the deleted versions.
        """
        now = time.time()
        kept = 0
        deleted: list[str] = []
        for info in self.versions():  # newest first
            if info.complete:
                kept += 1
                if kept <= self._keep or info.active:
                    continue
            elif info.active or now - info.created_at < self._grace:
                continue  # maybe a publish still in flight
            try:
                self.delete(info.version)
            except (NotFoundError, FailedPreconditionError):
                continue  # leased, or deleted or activated concurrently
            deleted.append(info.version)
        if deleted:
            logger.info("retention removed codebook(s) %s", deleted)
        return deleted

    @staticmethod
    def _event(event: str, version: str) -> str:
        return json.dumps({"event": event, "version": version})


def parse_event(payload: bytes | str) -> tuple[str, str] | None:
    """``(event, version)`` of a message on the events channel, or None if malformed."""
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(message, dict):
        return None
    event, version = message.get("event"), message.get("version")
    if not isinstance(event, str) or not isinstance(version, str):
        return None
    return event, version
