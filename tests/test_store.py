"""CodebookStore against a real redis-server: publish, verify, activate, roll back, retain."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from esans_sampler.artifact import (
    CLUSTER_CHOICE_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    MANIFEST,
    CodebookArtifact,
    artifact_from_files,
    artifact_to_files,
)
from esans_sampler.errors import (
    ArtifactError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
)
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.store import CodebookStore, parse_event

ArtifactFactory = Callable[..., CodebookArtifact]


@pytest.fixture
def store(redis_client: redis.Redis) -> CodebookStore:
    return CodebookStore(redis_client)


def _files(make_artifact: ArtifactFactory, seed: int, **kwargs: object) -> dict[str, bytes]:
    return artifact_to_files(make_artifact(seed=seed, **kwargs))


def _bytes_received(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


def _corrupt(client: redis.Redis, key: str) -> None:
    """Flip one byte in the middle of a value, keeping its length."""
    data = bytearray(client.get(key) or b"")
    data[len(data) // 2] ^= 0xFF
    client.set(key, bytes(data))


@pytest.fixture
def events(redis_server: EmbeddedRedis, store: CodebookStore) -> Iterator[list[tuple[str, str]]]:
    """Events received on the store's channel while the test runs."""
    received: list[tuple[str, str]] = []
    client = redis_server.client()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.events_channel)
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.05)
            if message is not None:
                event = parse_event(message["data"])
                if event is not None:
                    received.append(event)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        stop.set()
        thread.join()
        pubsub.close()
        client.close()


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_publish_round_trip(store: CodebookStore, make_artifact: ArtifactFactory) -> None:
    artifact = make_artifact(seed=1)
    files = artifact_to_files(artifact)
    version = store.publish(files)
    assert version == artifact.version
    assert store.active_version() == version
    assert store.get_files(version) == files
    assert artifact_from_files(store.verify(version)).version == version
    [info] = store.versions()
    assert info.version == version
    assert info.complete and info.active
    assert info.num_items == artifact.num_items
    assert info.size_bytes == sum(len(data) for data in files.values())
    assert info.summary["num_primary"] == artifact.codebook.num_primary
    assert abs(info.created_at - time.time()) < 60


def test_empty_store(store: CodebookStore) -> None:
    assert store.active_version() is None
    assert store.versions() == []
    with pytest.raises(NotFoundError, match="not in the store"):
        store.get_files("0" * 64)
    with pytest.raises(NotFoundError):
        store.activate("0" * 64)
    with pytest.raises(NotFoundError):
        store.delete("0" * 64)


def test_publish_is_idempotent(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    files = _files(make_artifact, 2)
    version = store.publish(files)
    created = store.versions()[0].created_at
    received_before = _bytes_received(redis_client)
    assert store.publish(files, activate=False) == version
    # Nothing rewritten: Redis received far fewer bytes than the files hold.
    assert _bytes_received(redis_client) - received_before < 4096 < len(files[INDEX_FILE])
    assert store.publish(files) == version
    [info] = store.versions()
    assert info.created_at == created
    assert info.active


def test_publish_without_activation_then_activate(
    store: CodebookStore, make_artifact: ArtifactFactory, events: list[tuple[str, str]]
) -> None:
    first = store.publish(_files(make_artifact, 1))
    second = store.publish(_files(make_artifact, 2), activate=False)
    assert store.active_version() == first
    assert [(i.version, i.active, i.complete) for i in store.versions()] == [
        (second, False, True),
        (first, True, True),
    ]
    store.activate(second)
    assert store.active_version() == second
    assert _wait_for(lambda: ("activated", second) in events)
    assert events.index(("published", second)) < events.index(("activated", second))


def test_rollback(store: CodebookStore, make_artifact: ArtifactFactory) -> None:
    old = store.publish(_files(make_artifact, 1))
    new = store.publish(_files(make_artifact, 2))
    assert store.active_version() == new
    store.activate(old)
    assert store.active_version() == old
    assert {i.version: i.active for i in store.versions()} == {old: True, new: False}


def test_corrupted_input_is_never_stored_or_activated(
    store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    good = store.publish(_files(make_artifact, 1))
    files = _files(make_artifact, 2)
    tampered = bytearray(files[INDEX_FILE])
    tampered[len(tampered) // 2] ^= 0xFF
    files[INDEX_FILE] = bytes(tampered)
    with pytest.raises(ArtifactError, match="checksum"):
        store.publish(files)
    assert store.active_version() == good
    assert [i.version for i in store.versions()] == [good]


@pytest.mark.parametrize("missing", [MANIFEST, INDEX_FILE])
def test_incomplete_input_is_refused(
    store: CodebookStore, make_artifact: ArtifactFactory, missing: str
) -> None:
    files = _files(make_artifact, 1)
    del files[missing]
    with pytest.raises(ArtifactError):
        store.publish(files)
    assert store.versions() == []
    assert store.active_version() is None


def test_corrupted_in_redis_is_never_activated(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    good = store.publish(_files(make_artifact, 1))
    bad = store.publish(_files(make_artifact, 2), activate=False)
    _corrupt(redis_client, store.file_key(bad, CLUSTER_CHOICE_FILE))
    with pytest.raises(ArtifactError, match="checksum"):
        store.activate(bad)
    assert store.active_version() == good
    # Publishing the same content again repairs the stored copy.
    store.publish(_files(make_artifact, 2))
    assert store.active_version() == bad
    store.verify(bad)


def test_partial_version_is_never_activated(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    good = store.publish(_files(make_artifact, 1))
    partial = store.publish(_files(make_artifact, 2), activate=False)
    redis_client.delete(store.file_key(partial, INDEX_FILE))
    with pytest.raises(ArtifactError, match="partial"):
        store.activate(partial)
    with pytest.raises(ArtifactError, match="partial"):
        store.get_files(partial)
    assert store.active_version() == good


def test_incomplete_version_is_never_activated(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    good = store.publish(_files(make_artifact, 1))
    pending = store.publish(_files(make_artifact, 2), activate=False)
    redis_client.hset(store.meta_key(pending), "complete", "0")  # as mid-publish
    with pytest.raises(FailedPreconditionError, match="incomplete"):
        store.activate(pending)
    with pytest.raises(FailedPreconditionError, match="incomplete"):
        store.get_files(pending)
    assert store.active_version() == good
    assert {i.version: i.complete for i in store.versions()} == {good: True, pending: False}


def test_delete(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    old = store.publish(_files(make_artifact, 1))
    active = store.publish(_files(make_artifact, 2))
    with pytest.raises(FailedPreconditionError, match="active"):
        store.delete(active)
    store.delete(old)
    assert [i.version for i in store.versions()] == [active]
    assert redis_client.keys(f"{store.namespace}:v:{old}:*") == []
    with pytest.raises(NotFoundError):
        store.delete(old)
    with pytest.raises(NotFoundError):
        store.activate(old)


def test_retention_keeps_newest_and_active(
    redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    store = CodebookStore(redis_client, keep_versions=2)
    published = [store.publish(_files(make_artifact, seed)) for seed in range(4)]
    assert [i.version for i in store.versions()] == published[:1:-1]
    store.activate(published[2])  # roll back to the older of the two kept
    newer = [store.publish(_files(make_artifact, seed), activate=False) for seed in (10, 11)]
    # newest two complete versions plus the active one
    assert [i.version for i in store.versions()] == [newer[1], newer[0], published[2]]
    assert store.active_version() == published[2]
    stored = {key.decode() for key in redis_client.keys(f"{store.namespace}:v:*:meta")}
    assert stored == {store.meta_key(v) for v in (*newer, published[2])}


def test_retention_removes_abandoned_incomplete_versions(
    redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    store = CodebookStore(redis_client, incomplete_grace_s=3600)
    abandoned = store.publish(_files(make_artifact, 1), activate=False)
    redis_client.hset(store.meta_key(abandoned), "complete", "0")
    store.publish(_files(make_artifact, 2))
    assert abandoned in [i.version for i in store.versions()]  # may still be in flight
    impatient = CodebookStore(redis_client, incomplete_grace_s=0)
    assert impatient.enforce_retention() == [abandoned]


def test_large_files_are_chunked(redis_client: redis.Redis, make_artifact: ArtifactFactory) -> None:
    store = CodebookStore(redis_client, chunk_bytes=64 * 1024)
    artifact = make_artifact(seed=3, num_items=20_000, dim=16)
    files = artifact_to_files(artifact)
    assert len(files[EMBEDDINGS_FILE]) > 16 * 64 * 1024
    version = store.publish(files)
    parts = redis_client.keys(store.file_key(version, EMBEDDINGS_FILE) + ":*")
    assert len(parts) == -(-len(files[EMBEDDINGS_FILE]) // (64 * 1024))
    assert redis_client.exists(store.file_key(version, EMBEDDINGS_FILE)) == 0
    assert store.get_files(version) == files
    redis_client.delete(store.file_key(version, EMBEDDINGS_FILE, 3))
    with pytest.raises(ArtifactError, match="partial"):
        store.activate(version)


def test_namespaces_are_isolated(redis_client: redis.Redis, make_artifact: ArtifactFactory) -> None:
    blue = CodebookStore(redis_client, namespace="blue")
    green = CodebookStore(redis_client, namespace="green")
    version = blue.publish(_files(make_artifact, 1))
    assert green.active_version() is None
    assert green.versions() == []
    assert blue.active_version() == version


def test_concurrent_publishes_of_same_content(
    store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    files = _files(make_artifact, 5)
    results: list[str] = []
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            results.append(store.publish(files))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert set(results) == {store.active_version()}
    assert len(store.versions()) == 1
    store.verify(results[0])


def test_parse_event() -> None:
    assert parse_event(json.dumps({"event": "activated", "version": "v"})) == ("activated", "v")
    assert parse_event(b"not json") is None
    assert parse_event(b"[1]") is None


def test_bad_arguments(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> None:
    with pytest.raises(InvalidInputError):
        CodebookStore(redis_client, keep_versions=0)
    with pytest.raises(InvalidInputError):
        CodebookStore(redis_client, chunk_bytes=1024**3)
    with pytest.raises(InvalidInputError):
        CodebookStore(redis_client, namespace="")
    with pytest.raises(InvalidInputError):
        CodebookStore(redis_client, lock_timeout_s=0)
    with (
        redis_server.client(decode_responses=True) as text_client,
        pytest.raises(InvalidInputError, match="decode_responses"),
    ):
        CodebookStore(text_client)
