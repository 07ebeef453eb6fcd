"""The gRPC transport against a real server (port 0) and a real Redis."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import build_random_artifact
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from esans_sampler.artifact import artifact_to_files
from esans_sampler.contract._proto.esans.v1 import sampler_pb2, sampler_pb2_grpc
from esans_sampler.contract.tensors import from_tensor
from esans_sampler.errors import DeadlineExceededError
from esans_service.app import ServiceRuntime
from esans_service.core import SamplingService
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.grpc_server import SERVICE_NAME, NegativeSamplerServicer, create_grpc_server
from esans_service.harness import local_settings
from esans_service.registry import CodebookRegistry
from esans_service.settings import Settings
from esans_service.store import CodebookStore

Stub = sampler_pb2_grpc.NegativeSamplerStub


def _settings(redis_url: str, namespace: str, **overrides: Any) -> Settings:
    return local_settings(redis_url, namespace, **({"max_concurrency": 1} | overrides))


@pytest.fixture(scope="module")
def runtime(redis_server: EmbeddedRedis) -> Iterator[ServiceRuntime]:
    with redis_server.client() as client:
        store = CodebookStore(client, namespace="grpc")
        counts = list(range(1, 201))
        store.publish(artifact_to_files(build_random_artifact(seed=2, embeddings=False)), False)
        store.publish(
            artifact_to_files(build_random_artifact(seed=1, metadata={"popularity": counts}))
        )
    runtime = ServiceRuntime(_settings(redis_server.url, "grpc")).start()
    try:
        yield runtime
    finally:
        runtime.stop(grace=0)


@pytest.fixture(scope="module")
def channel(runtime: ServiceRuntime) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> Stub:
    return sampler_pb2_grpc.NegativeSamplerStub(channel)


@pytest.fixture(scope="module")
def ids(runtime: ServiceRuntime) -> list[int]:
    return [int(i) for i in runtime.registry.get(None).artifact.index.item_ids[:8]]


@pytest.fixture(scope="module")
def plain_version(runtime: ServiceRuntime) -> str:
    return next(v.version for v in runtime.store.versions() if not v.active)


def _code(call: Any, request: Any, **kwargs: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(request, **kwargs)
    details = info.value.details()
    assert details and "Traceback" not in details
    code: grpc.StatusCode = info.value.code()
    return code


def test_sample_round_trip(stub: Stub, ids: list[int], runtime: ServiceRuntime) -> None:
    request = sampler_pb2.SampleNegativesRequest(positive_ids=ids, m_c=3, m_o=4, m_h=2, seed=7)
    response = stub.SampleNegatives(request, timeout=10)
    assert response.codebook_version == runtime.registry.active_version
    assert response.sampler == sampler_pb2.SAMPLER_KIND_ESANS
    shapes = {
        "positive_primary": ((8,), np.int32),
        "simple_ids": ((8, 3, 4), np.int64),
        "simple_clusters": ((8, 3), np.int32),
        "simple_log_q": ((8, 3, 4), np.float32),
        "hard_ids": ((8, 2), np.int64),
        "hard_counts": ((8,), np.int32),
        "hard_log_q": ((8, 2), np.float32),
    }
    for name, (shape, dtype) in shapes.items():
        array = from_tensor(getattr(response, name))
        assert array.shape == shape and array.dtype == dtype, name
    assert not response.HasField("embeddings")
    again = stub.SampleNegatives(request, timeout=10)
    assert again.SerializeToString(deterministic=True) == response.SerializeToString(
        deterministic=True
    )


def test_embeddings(stub: Stub, ids: list[int]) -> None:
    request = sampler_pb2.SampleNegativesRequest(
        positive_ids=ids, return_embeddings=True, eta=0.5, hard_lambda=-0.1, seed=1
    )
    e = stub.SampleNegatives(request, timeout=10).embeddings
    assert (e.eta, e.hard_lambda) == (0.5, -0.1)
    assert from_tensor(e.virtual_simple).shape == (8, 2, 14, 8)
    assert from_tensor(e.simple_weights).shape == (8, 2, 14, 5)
    assert from_tensor(e.virtual_hard).shape == (8, 5, 8)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (sampler_pb2.SAMPLER_KIND_UNSPECIFIED, sampler_pb2.SAMPLER_KIND_ESANS),
        (sampler_pb2.SAMPLER_KIND_UNIFORM, sampler_pb2.SAMPLER_KIND_UNIFORM),
        (sampler_pb2.SAMPLER_KIND_POPULARITY, sampler_pb2.SAMPLER_KIND_POPULARITY),
        (sampler_pb2.SAMPLER_KIND_MIXED, sampler_pb2.SAMPLER_KIND_MIXED),
    ],
)
def test_samplers(stub: Stub, ids: list[int], kind: int, name: int) -> None:
    request = sampler_pb2.SampleNegativesRequest(positive_ids=ids, sampler=kind)  # type: ignore[arg-type]
    assert stub.SampleNegatives(request, timeout=10).sampler == name


@pytest.mark.parametrize(
    "fields",
    [
        {"positive_ids": []},
        {"m_c": 0},
        {"m_c": 17},
        {"m_o": 33},
        {"m_h": 65},
        {"gamma": -1.0},
        {"gamma": float("nan")},
        {"gamma": 2.6e307},  # found by the fuzz test: -gamma * log d overflowed
        {"eta": float("inf")},
        {"hard_lambda": 1.0},
        {"sampler": 9},
        {"positive_ids": [1, 2, 3]},  # not in the codebook
    ],
)
def test_invalid_argument(stub: Stub, ids: list[int], fields: dict[str, Any]) -> None:
    request = sampler_pb2.SampleNegativesRequest(**{"positive_ids": ids, **fields})
    assert _code(stub.SampleNegatives, request, timeout=10) == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_version_not_found(stub: Stub, ids: list[int]) -> None:
    request = sampler_pb2.SampleNegativesRequest(positive_ids=ids, codebook_version="0" * 64)
    assert _code(stub.SampleNegatives, request, timeout=10) == grpc.StatusCode.NOT_FOUND
    info = sampler_pb2.GetCodebookInfoRequest(codebook_version="0" * 64)
    assert _code(stub.GetCodebookInfo, info, timeout=10) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "fields",
    [{"return_embeddings": True}, {"sampler": sampler_pb2.SAMPLER_KIND_POPULARITY}],
)
def test_failed_precondition(
    stub: Stub, runtime: ServiceRuntime, plain_version: str, fields: dict[str, Any]
) -> None:
    plain_ids = runtime.registry.get(plain_version).artifact.index.item_ids[:4].tolist()
    request = sampler_pb2.SampleNegativesRequest(
        positive_ids=plain_ids, codebook_version=plain_version, **fields
    )
    assert _code(stub.SampleNegatives, request, timeout=10) == grpc.StatusCode.FAILED_PRECONDITION


def test_resource_exhausted(stub: Stub, ids: list[int], runtime: ServiceRuntime) -> None:
    request = sampler_pb2.SampleNegativesRequest(positive_ids=ids)
    with runtime.service.admitted():
        code = _code(stub.SampleNegatives, request, timeout=10)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.SampleNegatives(request, timeout=10)


def test_deadline_exceeded(stub: Stub, ids: list[int], runtime: ServiceRuntime) -> None:
    # ~50 ms of work (4096 positives with EDIS) against a 5 ms deadline.
    request = sampler_pb2.SampleNegativesRequest(positive_ids=ids * 512, return_embeddings=True)
    with pytest.raises(grpc.RpcError) as info:
        stub.SampleNegatives(request, timeout=0.005)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server may still be working on it; let it finish before the next test.
    in_flight = {"transport": "grpc"}
    deadline = time.monotonic() + 10
    while runtime.metrics.registry.get_sample_value("esans_in_flight_requests", in_flight):
        assert time.monotonic() < deadline
        time.sleep(0.01)


class _ExpiredContext:
    """The one ``grpc.ServicerContext`` method the servicer reads, for a call whose
    deadline passed while it was queued."""

    def time_remaining(self) -> float:
        return 0.0


def test_expired_calls_are_skipped_without_work(runtime: ServiceRuntime, ids: list[int]) -> None:
    servicer = NegativeSamplerServicer(runtime.service)
    served = runtime.metrics.registry.get_sample_value(
        "esans_negatives_served_total", {"sampler": "esans", "kind": "simple"}
    )
    request = sampler_pb2.SampleNegativesRequest(positive_ids=ids)
    with pytest.raises(DeadlineExceededError):
        asyncio.run(servicer.SampleNegatives(request, _ExpiredContext()))  # type: ignore[arg-type]
    after = runtime.metrics.registry.get_sample_value(
        "esans_negatives_served_total", {"sampler": "esans", "kind": "simple"}
    )
    assert after == served


def test_codebook_info(stub: Stub, runtime: ServiceRuntime) -> None:
    info = stub.GetCodebookInfo(sampler_pb2.GetCodebookInfoRequest(), timeout=10)
    assert info.version == runtime.registry.active_version and info.active and not info.stale
    assert (info.num_items, info.num_primary, info.num_secondary) == (200, 8, 4)
    assert info.embedding_dim == 8 and list(info.modalities) == ["image", "text"]
    assert json.loads(info.metadata_json)["seed"] == 1
    assert info.secondary_quantisation == "global" and info.hard_candidate_m_h == 5
    assert 0 < info.hard_candidate_share <= 1
    assert info.version in info.loaded_versions


def test_versions_loaded_from_the_store_are_loaded_off_the_event_loop(
    stub: Stub, runtime: ServiceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pinned version not in memory takes seconds to load at scale: not on the event loop,
    which keeps serving every other call meanwhile."""
    stored = [build_random_artifact(seed=seed, num_items=200, first_id=10**7) for seed in (8, 9)]
    versions = [runtime.store.publish(artifact_to_files(a), activate=False) for a in stored]
    loading: list[str] = []
    load = runtime.registry._load_from_store

    def recording(version: str) -> Any:
        loading.append(threading.current_thread().name)
        return load(version)

    monkeypatch.setattr(runtime.registry, "_load_from_store", recording)
    ids = stored[0].index.item_ids[:4].tolist()
    pinned = sampler_pb2.SampleNegativesRequest(positive_ids=ids, codebook_version=versions[0])
    assert stub.SampleNegatives(pinned, timeout=10).codebook_version == versions[0]
    info = sampler_pb2.GetCodebookInfoRequest(codebook_version=versions[1])
    assert stub.GetCodebookInfo(info, timeout=10).version == versions[1]
    stub.SampleNegatives(pinned, timeout=10)  # in memory now: no second load
    assert len(loading) == 2 and not any(n.startswith("esans-grpc") for n in loading), loading


def test_version_pinning_across_a_publish(
    stub: Stub, ids: list[int], runtime: ServiceRuntime
) -> None:
    old = runtime.registry.active_version
    assert old is not None
    pinned = sampler_pb2.SampleNegativesRequest(positive_ids=ids, codebook_version=old, seed=3)
    before = stub.SampleNegatives(pinned, timeout=10)
    new = runtime.store.publish(artifact_to_files(build_random_artifact(seed=4)))
    try:
        runtime.registry.refresh()
        after = stub.SampleNegatives(pinned, timeout=10)
        assert after.codebook_version == old
        assert after.simple_ids.data == before.simple_ids.data
        info = stub.GetCodebookInfo(sampler_pb2.GetCodebookInfoRequest(), timeout=10)
        assert info.version == new
    finally:
        runtime.store.activate(old)
        runtime.registry.refresh()


def test_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_metrics_count_calls_by_status(stub: Stub, ids: list[int], runtime: ServiceRuntime) -> None:
    def count(status: str) -> float:
        labels = {"transport": "grpc", "method": "SampleNegatives", "status": status}
        value = runtime.metrics.registry.get_sample_value("esans_requests_total", labels)
        return value or 0.0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    stub.SampleNegatives(sampler_pb2.SampleNegativesRequest(positive_ids=ids), timeout=10)
    _code(stub.SampleNegatives, sampler_pb2.SampleNegativesRequest(positive_ids=[]), timeout=10)
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, bad + 1)


def test_nothing_published_unavailable_and_not_serving(redis_server: EmbeddedRedis) -> None:
    with redis_server.client() as client:
        registry = CodebookRegistry(CodebookStore(client, namespace="grpc-empty"))
        registry.refresh()
        settings = _settings(redis_server.url, "grpc-empty")
        service = SamplingService(registry, settings)
        server, port = create_grpc_server(settings, service)
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = sampler_pb2_grpc.NegativeSamplerStub(channel)
                request = sampler_pb2.SampleNegativesRequest(positive_ids=[1])
                assert _code(stub.SampleNegatives, request, timeout=10) == (
                    grpc.StatusCode.UNAVAILABLE
                )
                health = health_pb2_grpc.HealthStub(channel)
                check = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            server.graceful_stop(0).wait(5)


def test_drain_reports_not_serving(redis_server: EmbeddedRedis, runtime: ServiceRuntime) -> None:
    """A second replica on the same store; draining flips its health."""
    runtime = ServiceRuntime(_settings(redis_server.url, "grpc")).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(check, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            runtime.service.begin_drain()
            runtime._grpc.refresh_health()  # type: ignore[union-attr]
            status = health.Check(check, timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        runtime.stop(grace=0)
