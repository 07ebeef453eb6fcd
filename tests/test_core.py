"""SamplingService: validation, one snapshot per request, reproducibility, EDIS, admission."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import build_random_artifact

from esans_sampler.artifact import artifact_to_files
from esans_sampler.contract.messages import SampleRequest
from esans_sampler.edis import apply_weights
from esans_sampler.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from esans_sampler.stats import hard_coverage
from esans_service.core import SampleResult, SamplingService
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.registry import CodebookRegistry
from esans_service.settings import Settings
from esans_service.store import CodebookStore

NUM_ITEMS = 200


@dataclass
class Stack:
    store: CodebookStore
    registry: CodebookRegistry
    service: SamplingService
    with_snapshot: str  # active; has embeddings and popularity counts
    without_snapshot: str  # stored, not active; neither
    ids: np.ndarray


def _settings(**overrides: Any) -> Settings:
    return Settings(max_concurrency=1, **overrides)


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    client = redis_server.client()
    client.flushall()
    store = CodebookStore(client, namespace="core")
    rich = build_random_artifact(seed=1, metadata={"popularity": list(range(1, NUM_ITEMS + 1))})
    plain = build_random_artifact(seed=2, embeddings=False)
    without = store.publish(artifact_to_files(plain), activate=False)
    with_snapshot = store.publish(artifact_to_files(rich), activate=True)
    registry = CodebookRegistry(store)
    registry.refresh()
    try:
        yield Stack(
            store,
            registry,
            SamplingService(registry, _settings()),
            with_snapshot,
            without,
            rich.index.item_ids[:16].copy(),
        )
    finally:
        client.close()


def _request(ids: np.ndarray, **fields: Any) -> SampleRequest:
    return SampleRequest(positive_ids=ids, **fields)


def _arrays(result: SampleResult) -> dict[str, np.ndarray]:
    s = result.sample
    names = ["simple_ids", "simple_clusters", "simple_log_q", "hard_ids", "hard_counts"]
    out = {name: getattr(s, name) for name in [*names, "hard_log_q"]}
    if result.embeddings is not None:
        for name in ["positive", "simple", "hard", "virtual_simple", "simple_weights"]:
            out[f"e_{name}"] = getattr(result.embeddings, name)
        out["e_virtual_hard"] = result.embeddings.virtual_hard
    return out


def test_defaults_and_shapes(stack: Stack) -> None:
    result = stack.service.sample(_request(stack.ids))
    s = result.sample
    assert result.codebook_version == stack.with_snapshot
    assert result.sampler == "esans" and result.embeddings is None
    assert s.simple_ids.shape == (16, 2, 5) and s.simple_ids.dtype == np.int64
    assert s.simple_clusters.shape == (16, 2) and s.simple_clusters.dtype == np.int32
    assert s.hard_ids.shape == (16, 5) and s.hard_counts.shape == (16,)
    assert (s.simple_ids != s.positive_ids[:, None, None]).all()


def test_same_seed_same_version_is_identical(stack: Stack) -> None:
    request = _request(stack.ids, seed=42, return_embeddings=True, m_h=3, gamma=2.0)
    first, second = _arrays(stack.service.sample(request)), _arrays(stack.service.sample(request))
    for name, array in first.items():
        np.testing.assert_array_equal(array, second[name], err_msg=name)
    other = stack.service.sample(_request(stack.ids, seed=43))
    assert not np.array_equal(other.sample.simple_ids, first["simple_ids"])


def test_no_seed_draws_fresh_randomness(stack: Stack) -> None:
    draws = [stack.service.sample(_request(stack.ids)).sample.simple_ids for _ in range(3)]
    assert not (np.array_equal(draws[0], draws[1]) and np.array_equal(draws[1], draws[2]))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"positive_ids": np.zeros(0, dtype=np.int64)}, "between 1 and 4096"),
        ({"positive_ids": np.arange(4097, dtype=np.int64)}, "between 1 and 4096"),
        ({"positive_ids": np.ones((2, 2), dtype=np.int64)}, "flat list"),
        ({"positive_ids": np.array([1.5])}, "integer item ids"),
        ({"positive_ids": np.array([2**64 - 1], dtype=np.uint64)}, "int64"),
        ({"m_c": 0}, r"m_c=0 is out of range.*\[1, 16\]"),
        ({"m_c": 17}, r"m_c=17 .*\[1, 16\]"),
        ({"m_o": 0}, r"m_o=0 .*\[1, 32\]"),
        ({"m_o": 33}, r"m_o=33"),
        ({"m_h": -1}, r"m_h=-1 .*\[0, 64\]"),
        ({"m_h": 65}, r"m_h=65"),
        ({"m_c": True}, "m_c must be an integer"),
        ({"gamma": -0.5}, r"gamma must lie in \[0, 1000\]"),
        ({"gamma": 1000.5}, r"gamma must lie in \[0, 1000\], got 1000.5"),
        ({"gamma": 2.6e307}, "gamma must lie in"),
        ({"gamma": math.nan}, "gamma.*NaN"),
        ({"gamma": math.inf}, "gamma"),
        ({"eta": -0.1}, r"eta must be a finite number in \[0, 1000\]"),
        ({"eta": math.nan}, "eta"),
        ({"hard_lambda": 1.0}, r"hard_lambda must be a finite number in \[-1000, 1\)"),
        ({"hard_lambda": math.nan}, "hard_lambda"),
        ({"hard_lambda": -math.inf}, "hard_lambda"),
        ({"sampler": "random"}, "unknown sampler 'random'; choose one of esans, uniform"),
        ({"seed": -1}, "seed must lie in"),
        ({"seed": 2**64}, "seed must lie in"),
        ({"positive_ids": np.array([1, 2], dtype=np.int64)}, "not in the codebook"),
    ],
)
def test_bad_requests_say_what_to_change(stack: Stack, fields: dict[str, Any], match: str) -> None:
    fields.setdefault("positive_ids", stack.ids)
    with pytest.raises(InvalidInputError, match=match):
        stack.service.sample(SampleRequest(**fields))


@pytest.mark.parametrize("sampler", ["esans", "uniform", "popularity", "mixed"])
def test_every_sampler(stack: Stack, sampler: str) -> None:
    result = stack.service.sample(_request(stack.ids, sampler=sampler, seed=0, m_c=3, m_o=4))
    assert result.sampler == sampler
    assert result.sample.simple_ids.shape == (16, 3, 4)
    assert np.isfinite(result.sample.simple_log_q).all()


def test_embeddings_and_edis(stack: Stack) -> None:
    eta, lam = 0.9, 0.25
    request = _request(stack.ids, return_embeddings=True, seed=5, m_o=4, eta=eta, hard_lambda=lam)
    result = stack.service.sample(request)
    e, s = result.embeddings, result.sample
    assert e is not None and (e.eta, e.hard_lambda) == (eta, lam)
    d = stack.registry.get(None).artifact.embeddings.shape[1]  # type: ignore[union-attr]
    t = 2 + 3 + 4
    assert e.positive.shape == (16, d) and e.simple.shape == (16, 2, 4, d)
    assert e.virtual_simple.shape == (16, 2, t, d) and e.simple_weights.shape == (16, 2, t, 4)
    np.testing.assert_allclose(apply_weights(e.simple_weights, e.simple), e.virtual_simple)
    valid = s.hard_ids >= 0
    expected_hard = lam * e.positive[:, None, :] + (1 - lam) * e.hard
    np.testing.assert_allclose(e.virtual_hard[valid], expected_hard[valid], rtol=1e-6)
    assert not e.virtual_hard[~valid].any() and not e.hard[~valid].any()


def test_defaults_for_eta_and_lambda(stack: Stack) -> None:
    e = stack.service.sample(_request(stack.ids, return_embeddings=True)).embeddings
    assert e is not None and (e.eta, e.hard_lambda) == (0.6, 0.1)


def test_embeddings_without_snapshot_fail_precondition(stack: Stack) -> None:
    ids = stack.registry.get(stack.without_snapshot).artifact.index.item_ids[:4]
    request = _request(ids, codebook_version=stack.without_snapshot, return_embeddings=True)
    with pytest.raises(FailedPreconditionError, match="no embedding snapshot"):
        stack.service.sample(request)


def test_popularity_without_counts_fails_precondition(stack: Stack) -> None:
    ids = stack.registry.get(stack.without_snapshot).artifact.index.item_ids[:4]
    request = _request(ids, codebook_version=stack.without_snapshot, sampler="popularity")
    with pytest.raises(FailedPreconditionError, match="popularity"):
        stack.service.sample(request)


def test_pinned_version_is_served(stack: Stack) -> None:
    ids = stack.registry.get(stack.without_snapshot).artifact.index.item_ids[:4]
    result = stack.service.sample(_request(ids, codebook_version=stack.without_snapshot))
    assert result.codebook_version == stack.without_snapshot


def test_unknown_version_is_not_found(stack: Stack) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        stack.service.sample(_request(stack.ids, codebook_version="f" * 64))


def test_nothing_published_is_unavailable(redis_server: EmbeddedRedis) -> None:
    with redis_server.client() as client:
        registry = CodebookRegistry(CodebookStore(client, namespace="core-empty"))
        registry.refresh()
        service = SamplingService(registry, _settings())
        with pytest.raises(UnavailableError, match="no codebook is loaded"):
            service.sample(_request(np.array([1], dtype=np.int64)))
        with pytest.raises(UnavailableError):
            service.codebook_info()


def test_overload_is_refused_at_once(stack: Stack) -> None:
    rejected, served = _rejected(stack.service), _served(stack.service)
    with stack.service.admitted(), pytest.raises(ResourceExhaustedError, match="max_concurrency"):
        stack.service.sample(_request(stack.ids))
    assert _rejected(stack.service) == rejected + 1
    assert _served(stack.service) == served  # refused before any sampling work
    stack.service.sample(_request(stack.ids))  # the slot is free again


def _rejected(service: SamplingService) -> float:
    return service.metrics.registry.get_sample_value("esans_rejected_requests_total") or 0.0


def _served(service: SamplingService) -> float:
    return sum(
        sample.value
        for metric in service.metrics.negatives.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def test_expired_deadline_skips_the_work(stack: Stack) -> None:
    before = _served(stack.service)
    with pytest.raises(DeadlineExceededError, match="deadline"):
        stack.service.sample(_request(stack.ids), deadline=time.monotonic() - 0.001)
    assert _served(stack.service) == before
    stack.service.sample(_request(stack.ids), deadline=time.monotonic() + 30)
    assert _served(stack.service) > before


def test_response_size_is_bounded(stack: Stack) -> None:
    small = SamplingService(stack.registry, _settings(grpc_max_message_bytes=2 * 2**20))
    ids = np.resize(stack.ids, 1000)
    with pytest.raises(InvalidInputError, match=r"MiB of tensors.*smaller batch"):
        small.sample(_request(ids, return_embeddings=True))
    small.sample(_request(ids))  # ids only fit


def test_codebook_info(stack: Stack) -> None:
    info = stack.service.codebook_info()
    assert info.version == stack.with_snapshot and info.active and not info.stale
    assert (info.num_items, info.num_primary, info.num_secondary) == (NUM_ITEMS, 8, 4)
    assert info.embedding_dim == 8 and info.modalities == ["image", "text"]
    assert '"seed": 1' in info.metadata_json
    assert info.secondary_quantisation == "global" and info.hard_candidate_m_h == 5
    coverage = hard_coverage(stack.registry.get().artifact.index.fine_sizes, 5)
    assert info.hard_candidate_share == coverage.share_with_m_h > 0
    pinned = stack.service.codebook_info(stack.without_snapshot)
    assert not pinned.active and pinned.embedding_dim == 0
    assert stack.without_snapshot in pinned.loaded_versions


def test_requests_see_one_snapshot(stack: Stack) -> None:
    """A publish between requests changes the default version, never a pinned one."""
    pinned = _request(stack.ids, seed=9, codebook_version=stack.with_snapshot)
    before = stack.service.sample(pinned)
    newer = build_random_artifact(seed=3)
    version = stack.store.publish(artifact_to_files(newer), activate=True)
    try:
        stack.registry.refresh()
        after = stack.service.sample(pinned)
        assert after.codebook_version == stack.with_snapshot
        np.testing.assert_array_equal(after.sample.simple_ids, before.sample.simple_ids)
        fresh = stack.service.sample(_request(newer.index.item_ids[:4]))
        assert fresh.codebook_version == version
    finally:
        stack.store.activate(stack.with_snapshot)
        stack.registry.refresh()
