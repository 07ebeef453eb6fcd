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
from service.app import ServiceRuntime
from service.embedded_redis import EmbeddedRedis
from service.settings import Settings
from service.store import CodebookStore

ARTIFACT = build_random_artifact(seed=4, num_items=300, dim=8)
IDS = ARTIFACT.index.item_ids


def _settings(redis_url: str, namespace: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        redis_namespace=namespace,
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        shutdown_grace_s=0.5,
    )


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
    from esans_sampler.client import DeadlineExceededError, error_for

    assert isinstance(error_for("CANCELLED", "x"), UnavailableError)
    assert isinstance(error_for("UNAVAILABLE", "x"), UnavailableError)
    assert isinstance(error_for("DEADLINE_EXCEEDED", "x"), DeadlineExceededError)
    assert isinstance(error_for("INVALID_ARGUMENT", "x"), InvalidInputError)
