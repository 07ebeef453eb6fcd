"""The trainer-side clients against a real in-process server, and the torch loss on top."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import build_random_artifact

from esans_sampler.artifact import artifact_to_files
from esans_sampler.client import HttpSamplerClient, SamplerClient, SampleResponse
from esans_sampler.errors import InvalidInputError, NotFoundError, UnavailableError
from esans_sampler.trainer import esans_loss, esans_negatives
from esans_service.app import ServiceRuntime
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import local_settings
from esans_service.settings import Settings
from esans_service.store import CodebookStore

ARTIFACT = build_random_artifact(seed=4, num_items=300, dim=8)
IDS = ARTIFACT.index.item_ids


def _settings(redis_url: str, namespace: str) -> Settings:
    return local_settings(redis_url, namespace, shutdown_grace_s=0.5)


@pytest.fixture(scope="module")
def runtime(redis_server: EmbeddedRedis) -> Iterator[ServiceRuntime]:
    with redis_server.client() as client:
        CodebookStore(client, namespace="client").publish(artifact_to_files(ARTIFACT))
    runtime = ServiceRuntime(_settings(redis_server.url, "client")).start()
    try:
        yield runtime
    finally:
        runtime.stop(grace=0)


@pytest.fixture(scope="module")
def clients(runtime: ServiceRuntime) -> Iterator[tuple[SamplerClient, HttpSamplerClient]]:
    with (
        SamplerClient(f"127.0.0.1:{runtime.grpc_port}") as grpc_client,
        HttpSamplerClient(f"http://127.0.0.1:{runtime.http_port}") as http_client,
    ):
        yield grpc_client, http_client


def _assert_same(a: SampleResponse, b: SampleResponse) -> None:
    assert a.codebook_version == b.codebook_version and a.sampler == b.sampler
    for name in ("simple_ids", "simple_clusters", "simple_log_q", "hard_ids", "hard_counts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.hard_log_q, b.hard_log_q)  # -inf padding survives JSON
    assert (a.embeddings is None) == (b.embeddings is None)
    if a.embeddings is not None and b.embeddings is not None:
        np.testing.assert_allclose(a.embeddings.virtual_simple, b.embeddings.virtual_simple)
        np.testing.assert_allclose(a.embeddings.simple_weights, b.embeddings.simple_weights)


@pytest.mark.parametrize("sampler", ["esans", "uniform", "mixed"])
@pytest.mark.parametrize("return_embeddings", [False, True])
def test_grpc_and_http_clients_return_identical_arrays(
    clients: tuple[SamplerClient, HttpSamplerClient], sampler: str, return_embeddings: bool
) -> None:
    grpc_client, http_client = clients
    kwargs = {"seed": 11, "sampler": sampler, "return_embeddings": return_embeddings}
    a = grpc_client.sample(IDS[:16], **kwargs)  # type: ignore[arg-type]
    b = http_client.sample(IDS[:16], **kwargs)  # type: ignore[arg-type]
    _assert_same(a, b)
    assert a.codebook_version == ARTIFACT.version
    assert a.simple_ids.shape == (16, 2, 5) and a.hard_ids.shape == (16, 5)


@pytest.mark.parametrize("which", [0, 1])
def test_server_errors_arrive_as_library_exceptions(
    clients: tuple[SamplerClient, HttpSamplerClient], which: int
) -> None:
    client = clients[which]
    with pytest.raises(InvalidInputError, match="not in the codebook"):
        client.sample([-12345])
    with pytest.raises(InvalidInputError, match="hard_lambda"):
        client.sample(IDS[:2], hard_lambda=1.0)
    with pytest.raises(NotFoundError):
        client.sample(IDS[:2], codebook_version="0" * 64)
    with pytest.raises(InvalidInputError, match="sampler"):
        client.sample(IDS[:2], sampler="bogus")
    info = client.codebook_info()
    assert info["version"] == ARTIFACT.version


def test_unavailable_is_retried_then_raised_within_the_deadline(
    redis_server: EmbeddedRedis,
) -> None:
    """A server with no codebook answers UNAVAILABLE: the client retries, then gives up."""
    runtime = ServiceRuntime(_settings(redis_server.url, "client-empty")).start()
    try:
        with SamplerClient(f"127.0.0.1:{runtime.grpc_port}", retries=2, backoff_s=0.05) as client:
            started = time.monotonic()
            with pytest.raises(UnavailableError):  # not DeadlineExceededError: it gave up in time
                client.sample(IDS[:2], timeout_s=30.0)
            elapsed = time.monotonic() - started
        assert elapsed >= 0.05 + 0.1  # it slept both backoffs (a lower bound cannot flake)
        attempts = runtime.metrics.registry.get_sample_value(
            "esans_requests_total",
            {"transport": "grpc", "method": "SampleNegatives", "status": "UNAVAILABLE"},
        )
        assert attempts == 3  # the call and its two retries, as the server counted them
    finally:
        runtime.stop(grace=0)


def test_esans_loss_trains_both_towers_from_a_live_response(
    clients: tuple[SamplerClient, HttpSamplerClient],
) -> None:
    grpc_client, _ = clients
    order = np.argsort(IDS)
    sorted_ids = IDS[order]
    table = torch.nn.Embedding(IDS.shape[0], 8)
    user_tower = torch.nn.Linear(8, 8)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        rows = np.searchsorted(sorted_ids, ids.numpy())
        return table(torch.as_tensor(order[rows]))

    positives = torch.as_tensor(IDS[:32])
    response = grpc_client.sample(positives.numpy(), seed=3)
    negatives = esans_negatives(response, embed(positives), embed)
    # 10 simple + 5 hard + 2 x 14 virtual simple + 5 virtual hard per row.
    assert negatives.embeddings.shape == (32, 10 + 5 + 28 + 5, 8)
    assert torch.equal(negatives.mask[:, 10:15], ~torch.as_tensor(response.hard_valid))
    loss = esans_loss(user_tower(torch.randn(32, 8)), embed(positives), response, embed)
    loss.backward()
    assert torch.isfinite(loss)
    assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0
    assert user_tower.weight.grad is not None and user_tower.weight.grad.abs().sum() > 0


def test_cancelled_is_retryable_like_unavailable() -> None:
    from esans_sampler.errors import DeadlineExceededError, error_for

    assert isinstance(error_for("CANCELLED", "x"), UnavailableError)
    assert isinstance(error_for("UNAVAILABLE", "x"), UnavailableError)
    assert isinstance(error_for("DEADLINE_EXCEEDED", "x"), DeadlineExceededError)
    assert isinstance(error_for("INVALID_ARGUMENT", "x"), InvalidInputError)


def test_client_refuses_what_the_server_refuses_before_sending(
    clients: tuple[SamplerClient, HttpSamplerClient],
) -> None:
    """A float id is not truncated, an unsigned id past int64 does not wrap, a bad size is an
    InvalidInputError with the core's message, not a raw ValueError from protobuf."""
    grpc_client, http_client = clients
    for client in (grpc_client, http_client):
        with pytest.raises(InvalidInputError, match="must be integers, got float64"):
            client.sample([float(IDS[0]) + 0.9])
        with pytest.raises(InvalidInputError, match="must fit in int64"):
            client.sample(np.array([2**64 - 1], dtype=np.uint64))
        with pytest.raises(InvalidInputError, match="m_c must be an integer >= 1, got -1"):
            client.sample(IDS[:2], m_c=-1)
        with pytest.raises(InvalidInputError, match="m_h must be an integer >= 0"):
            client.sample(IDS[:2], m_h=1.5)  # type: ignore[arg-type]
    # A uint64 id that fits is sent as the same id.
    got = grpc_client.sample(IDS[:3].astype(np.uint64), seed=1)
    _assert_same(got, grpc_client.sample(IDS[:3], seed=1))


def test_prefetch_keeps_calls_in_flight_and_returns_responses_in_order(
    clients: tuple[SamplerClient, HttpSamplerClient],
) -> None:
    grpc_client, _ = clients
    batches = [IDS[i : i + 16] for i in range(0, 160, 16)]
    got = list(grpc_client.prefetch(batches, depth=3, seed=100, m_h=2))
    assert len(got) == len(batches)
    for i, (ids, response) in enumerate(zip(batches, got, strict=True)):
        _assert_same(response, grpc_client.sample(ids, seed=100 + i, m_h=2))
    # Errors arrive at their batch; closing early cancels what has not started.
    stream = grpc_client.prefetch([IDS[:4], np.array([-12345]), IDS[4:8]], depth=2)
    assert next(stream).simple_ids.shape[0] == 4
    with pytest.raises(InvalidInputError, match="not in the codebook"):
        next(stream)
    stream.close()
    with pytest.raises(InvalidInputError, match="depth must be an integer >= 1"):
        next(grpc_client.prefetch(batches, depth=0))


def test_async_client_matches_the_sync_client(
    runtime: ServiceRuntime, clients: tuple[SamplerClient, HttpSamplerClient]
) -> None:
    import asyncio

    from esans_sampler.async_client import AsyncSamplerClient

    grpc_client, _ = clients

    async def calls() -> tuple[list[SampleResponse], dict[str, object]]:
        async with AsyncSamplerClient(f"127.0.0.1:{runtime.grpc_port}") as client:
            responses = await asyncio.gather(
                *(client.sample(IDS[i : i + 8], seed=i, m_h=2) for i in range(0, 40, 8))
            )
            with pytest.raises(NotFoundError):
                await client.sample(IDS[:2], codebook_version="0" * 16)
            with pytest.raises(InvalidInputError, match="m_o must be an integer >= 1"):
                await client.sample(IDS[:2], m_o=0)
            return list(responses), await client.codebook_info()

    responses, info = asyncio.run(calls())
    for i, response in zip(range(0, 40, 8), responses, strict=True):
        _assert_same(response, grpc_client.sample(IDS[i : i + 8], seed=i, m_h=2))
    assert info == grpc_client.codebook_info()


def test_async_client_retries_unavailable_then_raises() -> None:
    import asyncio

    from esans_sampler.async_client import AsyncSamplerClient

    async def call() -> None:
        # Nothing listens on port 1: every attempt is UNAVAILABLE.
        async with AsyncSamplerClient("127.0.0.1:1", timeout_s=2.0, retries=2) as client:
            await client.sample(IDS[:2])

    with pytest.raises(UnavailableError):
        asyncio.run(call())


def test_codebook_info_has_every_field_in_its_type_on_both_transports(
    clients: tuple[SamplerClient, HttpSamplerClient],
) -> None:
    grpc_client, http_client = clients
    info = grpc_client.codebook_info()
    assert info["num_items"] == ARTIFACT.index.num_items and isinstance(info["num_items"], int)
    assert info["active"] is True and info["stale"] is False  # false fields are present
    assert isinstance(info["hard_candidate_share"], float)
    http = http_client.codebook_info()
    shared = set(info) & set(http)
    assert {"version", "num_items", "num_primary", "active", "stale", "created_at"} <= shared
    assert {k: info[k] for k in shared} == {k: http[k] for k in shared}
