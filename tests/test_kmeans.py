from __future__ import annotations

import numpy as np
import pytest
import torch

from esans_sampler.errors import InvalidInputError
from esans_sampler.kmeans import KMeansInit, kmeans, nearest_centroid, squared_distances
from esans_sampler.synthetic import adjusted_rand_index


def _blobs(
    num_clusters: int = 6, per_cluster: int = 200, dim: int = 8, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 5.0, size=(num_clusters, dim))
    labels = np.repeat(np.arange(num_clusters), per_cluster)
    points = centres[labels] + rng.normal(0.0, 0.3, size=(labels.size, dim))
    order = rng.permutation(labels.size)
    return torch.from_numpy(points[order].astype(np.float32)), labels[order]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("init", "k"), [("kmeans++", 6), ("kmeans++", 1), ("random", 2)])
def test_recovers_separated_blobs(init: KMeansInit, k: int) -> None:
    # A random seeding rarely hits all of many equal clusters, so it gets an easy case.
    x, labels = _blobs(num_clusters=k)
    _, assignments = kmeans(x, k, 50, _gen(), init=init, num_restarts=3)
    assert adjusted_rand_index(labels, assignments.numpy()) == pytest.approx(1.0)


def test_is_a_lloyd_fixed_point() -> None:
    x, _ = _blobs(seed=1)
    centroids, assignments = kmeans(x, 6, 100, _gen(1))
    expected, _ = nearest_centroid(x, centroids)
    assert torch.equal(assignments, expected)
    for k in range(6):
        members = x[assignments == k]
        assert torch.allclose(centroids[k], members.mean(dim=0), atol=1e-5)


def test_same_generator_seed_same_result() -> None:
    x, _ = _blobs(num_clusters=10, per_cluster=50, seed=2)
    c1, a1 = kmeans(x, 7, 10, _gen(3), num_restarts=2)
    c2, a2 = kmeans(x, 7, 10, _gen(3), num_restarts=2)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)


def test_duplicates_leave_extra_clusters_empty_without_failing() -> None:
    # 3 distinct points, 5 clusters: two clusters cannot be filled.
    base = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = base.repeat(40, 1)
    centroids, assignments = kmeans(x, 5, 10, _gen())
    assert torch.isfinite(centroids).all()
    assert int(assignments.min()) >= 0 and int(assignments.max()) < 5
    _, distances = nearest_centroid(x, centroids)
    assert float(distances.max()) == pytest.approx(0.0, abs=1e-5)
    assert torch.unique(assignments).numel() == 3


def test_empty_clusters_are_refilled() -> None:
    # K = n distinct points: every cluster must end with exactly one point.
    x = torch.arange(20, dtype=torch.float32)[:, None] ** 2
    centroids, assignments = kmeans(x, 20, 30, _gen(), init="random")
    assert torch.equal(torch.sort(assignments).values, torch.arange(20))
    assert torch.allclose(torch.sort(centroids[:, 0]).values, x[:, 0])


def test_zero_iterations_return_the_seeding() -> None:
    x, _ = _blobs(num_clusters=3, per_cluster=10)
    centroids, _ = kmeans(x, 3, 0, _gen())
    # Every seed is one of the input rows.
    nearest = squared_distances(centroids, x).min(dim=1).values
    assert float(nearest.max()) == pytest.approx(0.0, abs=1e-3)


def test_squared_distances_match_direct_computation() -> None:
    x = torch.randn(30, 5, generator=_gen())
    c = torch.randn(4, 5, generator=_gen(1))
    direct = ((x[:, None, :] - c[None, :, :]) ** 2).sum(dim=2)
    assert torch.allclose(squared_distances(x, c), direct, atol=1e-5)


@pytest.mark.parametrize(
    ("x", "k", "iters", "kwargs"),
    [
        (torch.zeros(10), 2, 5, {}),
        (torch.zeros(10, 2, dtype=torch.int64), 2, 5, {}),
        (torch.zeros(10, 2), 0, 5, {}),
        (torch.zeros(10, 2), 11, 5, {}),
        (torch.zeros(10, 2), 2, -1, {}),
        (torch.zeros(10, 2), 2, 5, {"num_restarts": 0}),
        (torch.zeros(10, 2), 2, 5, {"init": "forgy"}),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1, 5, {}),
        (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), 1, 5, {}),
    ],
)
def test_bad_input_is_rejected(
    x: torch.Tensor, k: int, iters: int, kwargs: dict[str, object]
) -> None:
    with pytest.raises(InvalidInputError):
        kmeans(x, k, iters, _gen(), **kwargs)  # type: ignore[arg-type]
