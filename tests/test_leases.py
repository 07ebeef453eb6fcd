"""Leases: a version a training run pins is kept from retention and from the admin delete
(unless forced), and a delete reaches every replica."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
from conftest import build_random_artifact

from esans_sampler.artifact import artifact_to_files
from esans_sampler.client import SamplerClient
from esans_sampler.errors import FailedPreconditionError, NotFoundError
from esans_service.app import ServiceRuntime
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import local_settings
from esans_service.leases import LeaseKeeper, lease_remaining_s
from esans_service.store import CodebookStore

TOKEN = "lease-admin-token-0123456789"


def _wait(predicate: object, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_leased_version_survives_retention_and_delete_until_forced_or_expired(
    redis_server: EmbeddedRedis,
) -> None:
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="lease-store", keep_versions=1)
        old = store.publish(artifact_to_files(build_random_artifact(seed=41)))
        keeper = LeaseKeeper(client, "lease-store", ttl_s=2)
        keeper.used(old)
        assert keeper.renew_due() == [old]
        assert keeper.renew_due() == []  # not due again before a quarter of the TTL
        remaining = lease_remaining_s(client, "lease-store", old)
        assert remaining is not None and 0 < remaining <= 2
        store.publish(artifact_to_files(build_random_artifact(seed=42)))  # retention runs
        assert old in [v.version for v in store.versions()], "retention deleted a leased one"
        with pytest.raises(FailedPreconditionError, match="pinned by a training run"):
            store.delete(old)
        # The run stops pinning it: the lease expires and retention takes it.
        _wait(lambda: lease_remaining_s(client, "lease-store", old) is None, "expiry", 10)
        assert store.enforce_retention() == [old]
        # Forced delete goes past a live lease.
        third = store.publish(artifact_to_files(build_random_artifact(seed=43)), activate=False)
        keeper.used(third)
        keeper.renew_due()
        assert store.delete(third, force=True) == third


@pytest.fixture
def replicas(redis_server: EmbeddedRedis) -> Iterator[list[ServiceRuntime]]:
    with ExitStack() as stack:
        runtimes = []
        for i in range(3):
            settings = local_settings(
                redis_server.url, "lease-replicas", poll_interval_s=0.5, lease_ttl_s=30,
                admin_token=TOKEN if i == 0 else None,
            )  # fmt: skip
            runtime = ServiceRuntime(settings).start()
            stack.callback(runtime.stop, 0)
            runtimes.append(runtime)
        yield runtimes


def test_a_pinned_version_is_kept_and_a_forced_delete_reaches_every_replica(
    redis_server: EmbeddedRedis, replicas: list[ServiceRuntime]
) -> None:
    admin = f"http://127.0.0.1:{replicas[0].http_port}"
    headers = {"authorization": f"Bearer {TOKEN}"}
    pinned_artifact = build_random_artifact(seed=44)
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="lease-replicas")
        pinned = store.publish(artifact_to_files(pinned_artifact))
        store.publish(artifact_to_files(build_random_artifact(seed=45)))  # now active
    ids = pinned_artifact.index.item_ids[:4]
    clients = [SamplerClient(f"127.0.0.1:{r.grpc_port}", retries=0) for r in replicas]
    try:
        # A training run pinned to the older version, served by every replica.
        for client in clients:
            assert client.sample(ids, codebook_version=pinned).codebook_version == pinned
        with redis_server.client() as redis_client:
            _wait(
                lambda: lease_remaining_s(redis_client, "lease-replicas", pinned) is not None,
                "the lease",
            )
        refused = httpx.delete(f"{admin}/admin/versions/{pinned}", headers=headers)
        assert refused.status_code >= 400
        assert refused.json()["error"]["code"] == "FAILED_PRECONDITION"
        assert "pinned by a training run" in refused.json()["error"]["message"]
        for client in clients:  # still served everywhere
            assert client.sample(ids, codebook_version=pinned).codebook_version == pinned

        forced = httpx.delete(f"{admin}/admin/versions/{pinned}?force=true", headers=headers)
        assert forced.status_code == 200, forced.text

        def refused_everywhere() -> bool:
            for client in clients:
                try:
                    client.sample(ids, codebook_version=pinned)
                    return False
                except NotFoundError:
                    continue
            return True

        _wait(refused_everywhere, "every replica to drop the deleted version")
        for runtime in replicas:
            assert pinned not in runtime.registry.loaded_versions()
    finally:
        for client in clients:
            client.close()
