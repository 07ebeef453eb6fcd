"""Vectorised k-means in torch, used to initialise the MSAC codebooks.

Pure function of its inputs: the random generator is passed in, nothing global is touched.
Seeding is greedy k-means++ (or a random subset), optionally the best of several seedings;
a cluster that ends a Lloyd iteration empty is moved onto a point that is currently worst
served (farthest from its own centroid).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from esans_sampler.errors import InvalidInputError

KMeansInit = Literal["kmeans++", "random"]

# Rows per block when computing (rows, K) distance tables, so memory stays ~64 MB.
_DISTANCE_BLOCK_ELEMENTS = 1 << 24


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2`` (n,) of the rows of ``x`` (n, d), without an (n, d) temporary."""
    norms: torch.Tensor = torch.linalg.vector_norm(x, dim=1)
    return norms.square_()


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``||x_i - c_k||^2`` as an (n, K) tensor for ``x`` (n, d) and ``centroids`` (K, d)."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped: the expansion can round below zero.
    dots = x @ centroids.T
    dots.mul_(-2.0)
    dots.add_(squared_norms(centroids)[None, :])
    dots.add_(squared_norms(x)[:, None])
    return dots.clamp_min_(0.0)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (n,) int64 of the nearest centroid of each row of ``x`` and its squared distance (n,).

    Blocked over rows so an (n, K) table is never materialised for large ``n``.
    """
    n = x.shape[0]
    block = max(1, _DISTANCE_BLOCK_ELEMENTS // max(1, centroids.shape[0]))
    indices = torch.empty(n, dtype=torch.int64)
    distances = torch.empty(n, dtype=x.dtype)
    for start in range(0, n, block):
        d2 = squared_distances(x[start : start + block], centroids)
        best, idx = d2.min(dim=1)
        indices[start : start + block] = idx
        distances[start : start + block] = best
    return indices, distances


def _kmeans_plus_plus(
    x: torch.Tensor, num_clusters: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; the variant scikit-learn uses).

    Each new centroid is the best, by the resulting potential sum_i D(x_i)^2, of
    ``2 + floor(ln K)`` candidates drawn with probability ~ D(x)^2. Trying several
    candidates makes two seeds landing in one well-separated cluster much rarer.
    """
    n, d = x.shape
    num_candidates = 2 + int(math.log(num_clusters))
    centroids = torch.empty(num_clusters, d, dtype=x.dtype)
    x_sq = squared_norms(x)
    first = int(torch.randint(n, (1,), generator=generator).item())
    centroids[0] = x[first]
    closest = (x_sq - 2.0 * (x @ x[first]) + x_sq[first]).clamp_min_(0.0)
    for k in range(1, num_clusters):
        total = float(closest.sum().item())
        if total > 0.0:
            # Inverse-CDF draws (torch.multinomial caps the number of categories at 2^24).
            cdf = torch.cumsum(closest, dim=0)
            targets = torch.rand(num_candidates, generator=generator, dtype=cdf.dtype) * cdf[-1]
            picks = torch.searchsorted(cdf, targets).clamp_max_(n - 1)
            # (n, L) squared distances to the candidates; keep the lowest resulting potential.
            trial = (x @ x[picks].T).mul_(-2.0).add_(x_sq[:, None]).add_(x_sq[picks][None, :])
            trial = torch.minimum(trial.clamp_min_(0.0), closest[:, None])
            best = int(trial.sum(dim=0).argmin().item())
            pick = int(picks[best].item())
            closest = trial[:, best].contiguous()
        else:  # every point already coincides with a centroid (duplicates): pick uniformly
            pick = int(torch.randint(n, (1,), generator=generator).item())
        centroids[k] = x[pick]
    return centroids


def _seed(
    x: torch.Tensor, num_clusters: int, init: KMeansInit, generator: torch.Generator
) -> torch.Tensor:
    if init == "kmeans++":
        return _kmeans_plus_plus(x, num_clusters, generator)
    return x[torch.randperm(x.shape[0], generator=generator)[:num_clusters]].clone()


def potential(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances of the rows of ``x`` to their nearest centroid."""
    return float(nearest_centroid(x, centroids)[1].double().sum().item())


def _lloyd(
    x: torch.Tensor, centroids: torch.Tensor, num_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from ``centroids``; returns the centroids and assignments."""
    num_clusters = centroids.shape[0]
    assignments, distances = nearest_centroid(x, centroids)
    for _ in range(num_iters):
        counts = torch.bincount(assignments, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        centroids = sums / counts.clamp_min(1).to(x.dtype)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel() > 0:
            # Move each empty centroid onto one of the worst-served points.
            worst = torch.topk(distances, k=empty.numel()).indices
            centroids[empty] = x[worst]
        new_assignments, distances = nearest_centroid(x, centroids)
        converged = empty.numel() == 0 and bool(torch.equal(new_assignments, assignments))
        assignments = new_assignments
        if converged:
            break
    return centroids, assignments


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    num_iters: int,
    generator: torch.Generator,
    init: KMeansInit = "kmeans++",
    num_restarts: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the rows of ``x``.

    Args:
        x: (n, d) floating tensor; gradients are not tracked.
        num_clusters: K, with 1 <= K <= n.
        num_iters: maximum Lloyd iterations (0 returns the seeding); stops early when the
            assignment no longer changes.
        generator: the only source of randomness.
        init: ``"kmeans++"`` (greedy D^2 seeding) or ``"random"`` (K distinct rows).
        num_restarts: independent seedings; the one with the lowest potential (sum of
            squared distances to the nearest seed) is refined by Lloyd. A seeding that put
            two seeds in one cluster and none in another, which Lloyd rarely repairs, has
            a much larger potential, so this catches it at the cost of seedings only.

    Returns:
        centroids (K, d) of ``x``'s dtype and assignments (n,) int64, each row's nearest
        centroid. With fewer than K distinct rows some clusters necessarily stay empty.
    """
    if x.ndim != 2 or not torch.is_floating_point(x):
        raise InvalidInputError(f"k-means needs a 2-D floating tensor, got {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise InvalidInputError(
            f"num_clusters must be in [1, {n}] for {n} points, got {num_clusters}"
        )
    if num_iters < 0:
        raise InvalidInputError(f"num_iters must be >= 0, got {num_iters}")
    if num_restarts < 1:
        raise InvalidInputError(f"num_restarts must be >= 1, got {num_restarts}")
    if init not in ("kmeans++", "random"):
        raise InvalidInputError(f"unknown k-means init {init!r}; use 'kmeans++' or 'random'")
    with torch.no_grad():
        x = x.detach()
        # A NaN/inf entry (or one too large to square in float32) makes its row norm
        # non-finite; this avoids an (n, d) temporary.
        if not bool(torch.isfinite(squared_norms(x)).all()):
            raise InvalidInputError("k-means input contains NaN, inf or values too large")
        seeds = _seed(x, num_clusters, init, generator)
        if num_restarts > 1:
            best = potential(x, seeds)
            for _ in range(num_restarts - 1):
                candidate = _seed(x, num_clusters, init, generator)
                candidate_potential = potential(x, candidate)
                if candidate_potential < best:
                    seeds, best = candidate, candidate_potential
        return _lloyd(x, seeds, num_iters)


def lloyd(x: torch.Tensor, centroids: torch.Tensor, num_iters: int) -> tuple[torch.Tensor, float]:
    """Lloyd iterations on ``x`` (n, d) from ``centroids`` (K, d), K <= n; returns the refined
    centroids and their potential (sum of squared distances of the rows to the nearest)."""
    if not 1 <= centroids.shape[0] <= x.shape[0]:
        raise InvalidInputError(
            f"lloyd needs 1 <= K <= n, got K={centroids.shape[0]}, n={x.shape[0]}"
        )
    with torch.no_grad():
        refined, _ = _lloyd(x.detach(), centroids.detach().clone(), num_iters)
        return refined, potential(x, refined)
