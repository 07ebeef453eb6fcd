"""CodebookRegistry against a real redis-server: swaps, pinning, outages, consistency."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esans_sampler.artifact import INDEX_FILE, CodebookArtifact, artifact_to_files
from esans_sampler.baselines import PopularitySampler
from esans_sampler.errors import (
    ArtifactError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.loaded_codebook import load_codebook
from esans_service.registry import CodebookRegistry
from esans_service.store import CodebookStore

ArtifactFactory = Callable[..., CodebookArtifact]


def _fast_failing_client(server: EmbeddedRedis) -> redis.Redis:
    """A client that gives up quickly when Redis is down, so outages show in milliseconds."""
    return server.client(
        retry=Retry(NoBackoff(), 1), socket_timeout=1.0, socket_connect_timeout=1.0
    )


@pytest.fixture
def store(redis_client: redis.Redis) -> CodebookStore:
    return CodebookStore(redis_client)


@pytest.fixture
def outage_store(fresh_redis: EmbeddedRedis) -> Iterator[CodebookStore]:
    """A store on a private server that the test may kill, restart or wipe."""
    client = _fast_failing_client(fresh_redis)
    try:
        yield CodebookStore(client)
    finally:
        client.close()


def _publish(store: CodebookStore, make: ArtifactFactory, seed: int, activate: bool = True) -> str:
    return store.publish(artifact_to_files(make(seed=seed)), activate=activate)


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _commands_processed(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def test_nothing_to_serve_yet(store: CodebookStore) -> None:
    registry = CodebookRegistry(store)
    assert not registry.ready
    assert registry.active_version is None
    with pytest.raises(UnavailableError, match="no codebook"):
        registry.get()
    assert registry.refresh() is False
    assert not registry.stale
    assert registry.loaded_versions() == []


def test_refresh_loads_the_active_codebook(
    store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    swaps: list[str] = []
    registry = CodebookRegistry(store, on_swap=swaps.append)
    version = _publish(store, make_artifact, 1)
    assert registry.refresh() is True
    assert registry.refresh() is False  # unchanged
    loaded = registry.get()
    assert registry.get("") is loaded
    assert registry.get(version) is loaded
    assert loaded.version == loaded.artifact.version == version
    assert registry.ready and registry.active_version == version
    assert swaps == [version]
    assert loaded.popularity is None
    sample = loaded.esans.sample(
        loaded.artifact.index.item_ids[:4], np.random.default_rng(0), m_c=2, m_o=3, m_h=2
    )
    assert np.isin(sample.simple_ids, loaded.artifact.index.item_ids).all()
    assert loaded.uniform.index is loaded.artifact.index
    assert loaded.mixed.index is loaded.artifact.index


def test_popularity_sampler_from_metadata(make_artifact: ArtifactFactory) -> None:
    counts = list(range(200))
    loaded = load_codebook(make_artifact(seed=1, metadata={"popularity": counts}))
    assert isinstance(loaded.popularity, PopularitySampler)
    with pytest.raises(ArtifactError, match="popularity"):
        load_codebook(make_artifact(seed=1, metadata={"popularity": [1, 2, 3]}))


def test_pinned_versions_load_on_demand_with_lru_eviction(
    store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    old, middle, active = (_publish(store, make_artifact, seed) for seed in (1, 2, 3))
    registry = CodebookRegistry(store, max_loaded=2)
    registry.refresh()
    assert registry.loaded_versions() == [active]
    assert registry.get(old).version == old  # loaded from the store
    assert registry.get(old).artifact.version == old
    assert set(registry.loaded_versions()) == {old, active}
    registry.get()  # the active one is now the most recently used
    assert registry.get(middle).version == middle  # evicts old, never the active one
    assert set(registry.loaded_versions()) == {middle, active}
    assert registry.get().version == active


def test_unknown_pinned_version_names_loaded_ones(
    store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    active = _publish(store, make_artifact, 1)
    registry = CodebookRegistry(store)
    registry.refresh()
    with pytest.raises(NotFoundError) as info:
        registry.get("f" * 64)
    assert "f" * 64 in str(info.value) and active in str(info.value)


def test_concurrent_loads_of_one_pinned_version_share_the_work(
    store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    old = _publish(store, make_artifact, 1)
    _publish(store, make_artifact, 2)
    registry = CodebookRegistry(store)
    registry.refresh()
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(registry.get(old))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len({id(r) for r in results}) == 1


def test_warm_get_makes_no_redis_calls(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    old = _publish(store, make_artifact, 1)
    _publish(store, make_artifact, 2)
    registry = CodebookRegistry(store)
    registry.refresh()
    registry.get(old)
    before = _commands_processed(redis_client)
    for _ in range(1000):
        registry.get()
        registry.get(old)
    # The only command between the two readings is the first INFO itself.
    assert _commands_processed(redis_client) - before == 1


def test_swaps_on_publish_via_pubsub(store: CodebookStore, make_artifact: ArtifactFactory) -> None:
    _publish(store, make_artifact, 1)
    swapped = threading.Event()
    with CodebookRegistry(store, poll_interval_s=60.0, on_swap=lambda _: swapped.set()) as reg:
        swapped.clear()
        new = _publish(store, make_artifact, 2)
        # Polling runs once a minute, so a swap within 20 s can only come from the event.
        assert swapped.wait(20.0)
        assert reg.active_version == new
        # a rollback is an event too
        swapped.clear()
        store.activate(reg.loaded_versions()[-1])
        assert swapped.wait(20.0)


def test_swaps_by_polling_when_events_are_lost(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    _publish(store, make_artifact, 1)
    with CodebookRegistry(store, poll_interval_s=0.2) as registry:
        new = _publish(store, make_artifact, 2, activate=False)
        redis_client.set(store.active_key, new)  # pointer moved without any event
        assert _wait_for(lambda: registry.active_version == new, 2.0)


def test_event_subscription_reconnects(
    store: CodebookStore, redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    _publish(store, make_artifact, 1)
    with CodebookRegistry(store, poll_interval_s=60.0) as registry:
        assert _wait_for(lambda: redis_client.pubsub_numsub(store.events_channel)[0][1] == 1)
        redis_client.client_kill_filter(_type="pubsub")
        # Reconnected within about a second, and serving the next publish.
        assert _wait_for(lambda: redis_client.pubsub_numsub(store.events_channel)[0][1] == 1)
        new = _publish(store, make_artifact, 2)
        assert _wait_for(lambda: registry.active_version == new, 3.0)


def test_readers_see_one_consistent_version_during_many_publishes(
    store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    artifacts = [make_artifact(seed=seed, num_items=100) for seed in range(12)]
    order = {artifact.version: i for i, artifact in enumerate(artifacts)}
    store.publish(artifact_to_files(artifacts[0]))
    stop = threading.Event()
    problems: list[str] = []
    seen: list[list[int]] = []

    def read() -> None:
        rng = np.random.default_rng()
        mine: list[int] = []
        seen.append(mine)
        while not stop.is_set():
            loaded = registry.get()
            if loaded.version != loaded.artifact.version or loaded.esans.index is not (
                loaded.artifact.index
            ):
                problems.append(f"inconsistent codebook {loaded.version}")
            ids = loaded.artifact.index.item_ids
            sample = loaded.esans.sample(ids[:8], rng, m_c=2, m_o=2, m_h=2)
            if not np.isin(sample.simple_ids, ids).all():
                problems.append(f"{loaded.version}: negatives from another codebook")
            if not mine or mine[-1] != order[loaded.version]:
                mine.append(order[loaded.version])

    with CodebookRegistry(store, poll_interval_s=0.1) as registry:
        readers = [threading.Thread(target=read) for _ in range(4)]
        for reader in readers:
            reader.start()
        for artifact in artifacts[1:]:
            store.publish(artifact_to_files(artifact))
            time.sleep(0.02)
        assert _wait_for(lambda: registry.active_version == artifacts[-1].version)
        stop.set()
        for reader in readers:
            reader.join()
    assert not problems
    for versions in seen:
        assert versions == sorted(versions)  # never back to an older version
    assert any(len(versions) > 2 for versions in seen)


def test_store_outage_keeps_serving_then_recovers(
    fresh_redis: EmbeddedRedis, outage_store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    version = _publish(outage_store, make_artifact, 1)
    errors: list[Exception] = []
    registry = CodebookRegistry(outage_store, poll_interval_s=0.2, on_store_error=errors.append)
    with registry:
        assert registry.active_version == version and not registry.stale
        fresh_redis.kill()
        assert _wait_for(lambda: registry.stale, 2.0)
        assert "unreachable" in (registry.stale_reason or "")
        assert errors and isinstance(errors[0], redis.ConnectionError)
        assert registry.get().version == version  # still serving the last good one
        with pytest.raises(UnavailableError, match="unreachable"):
            registry.get("e" * 64)
        fresh_redis.start()  # the AOF brings the published codebook back
        assert _wait_for(lambda: not registry.stale, 3.0)
        new = _publish(outage_store, make_artifact, 2)
        assert _wait_for(lambda: registry.active_version == new, 2.0)


def test_redis_restarted_empty_never_replaces_the_good_codebook(
    fresh_redis: EmbeddedRedis, outage_store: CodebookStore, make_artifact: ArtifactFactory
) -> None:
    version = _publish(outage_store, make_artifact, 1)
    with CodebookRegistry(outage_store, poll_interval_s=0.2) as registry:
        fresh_redis.restart(wipe=True)
        assert _wait_for(lambda: "no active" in (registry.stale_reason or ""), 3.0)
        assert registry.get().version == version
        assert registry.ready
        new = _publish(outage_store, make_artifact, 2)
        assert _wait_for(lambda: registry.active_version == new and not registry.stale, 3.0)


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_damaged_active_version_is_never_swapped_in(
    store: CodebookStore,
    redis_client: redis.Redis,
    make_artifact: ArtifactFactory,
    damage: str,
) -> None:
    good = _publish(store, make_artifact, 1)
    errors: list[Exception] = []
    registry = CodebookRegistry(store, on_store_error=errors.append)
    registry.refresh()
    bad = _publish(store, make_artifact, 2, activate=False)
    key = store.file_key(bad, INDEX_FILE)
    if damage == "corrupt":
        data = bytearray(redis_client.get(key) or b"")
        data[len(data) // 2] ^= 0xFF
        redis_client.set(key, bytes(data))
    else:
        redis_client.delete(key)
    redis_client.set(store.active_key, bad)  # as if forced past the store's checks
    assert registry.refresh() is False
    assert registry.get().version == good
    assert registry.stale and bad in (registry.stale_reason or "")
    assert errors and isinstance(errors[-1], ArtifactError)
    store.publish(artifact_to_files(make_artifact(seed=2)))  # repairs and re-activates
    assert registry.refresh() is True
    assert registry.get().version == bad and not registry.stale


def test_bad_arguments(store: CodebookStore) -> None:
    with pytest.raises(ValueError, match="max_loaded"):
        CodebookRegistry(store, max_loaded=0)
    with pytest.raises(ValueError, match="poll_interval_s"):
        CodebookRegistry(store, poll_interval_s=0)


def test_popularity_sampler_from_artifact_array(make_artifact: ArtifactFactory) -> None:
    base = make_artifact(seed=2)
    counts = np.linspace(1.0, 50.0, base.num_items)
    loaded = load_codebook(dataclasses.replace(base, popularity=counts))
    assert isinstance(loaded.popularity, PopularitySampler)


def test_a_unique_version_prefix_is_accepted_wherever_a_version_is(
    redis_client: redis.Redis, make_artifact: ArtifactFactory
) -> None:
    """The 16 characters build / publish / demo print name a version; a prefix shorter than
    8 characters or shared by two versions is a clear InvalidInputError."""
    store = CodebookStore(redis_client, namespace="prefix")
    first = store.publish(artifact_to_files(make_artifact(seed=11)), activate=True)
    second = store.publish(artifact_to_files(make_artifact(seed=12)), activate=False)
    registry = CodebookRegistry(store)
    registry.refresh()
    assert registry.in_memory(None) and registry.in_memory(first[:16])
    assert not registry.in_memory(second[:8]) and not registry.in_memory(first[:7])
    assert registry.get(first[:16]).version == first  # loaded: no store call needed
    assert registry.get(second[:8]).version == second  # loaded from the store
    assert registry.in_memory(second) and registry.in_memory(second[:8])
    store.activate(second[:12])
    assert store.active_version() == second
    with pytest.raises(InvalidInputError, match="too short"):
        registry.get(first[:7])
    unknown = next(
        c * 9 for c in "0123456789abcdef" if not (first + second).count(c * 9)
    )  # a prefix of neither version
    with pytest.raises(NotFoundError):
        registry.get(unknown)
    store.delete(first[:10])
    assert [v.version for v in store.versions()] == [second]
    # Two stored versions sharing a prefix (entries of the version index, no files needed).
    twins = ["abcdef01" + "0" * 56, "abcdef01" + "1" * 56]
    redis_client.zadd(store.versions_key, {t: 0 for t in twins})
    with pytest.raises(InvalidInputError, match="ambiguous: it starts 2 stored versions"):
        store.resolve("abcdef01")
    assert store.resolve("abcdef011") == twins[1]
