"""Synthetic catalogues with planted cluster structure, for the demo, tests and benchmarks,
and random (untrained) codebook artifacts for load tests.

Each item belongs to a planted primary cluster and a planted sub-cluster inside it. A
shared latent vector (cluster centre + sub-cluster offset + item noise) is projected into
every modality by a fixed random matrix, plus modality-specific noise, so the modalities
agree on the structure the way aligned image/text/behaviour views of one item do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.artifact import CodebookArtifact
from esans_sampler.cluster_choice import cluster_choice_matrix
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook


@dataclass(frozen=True)
class PlantedCatalogue:
    """item_ids (N,) int64; features name -> (N, D_m) float32; planted labels (N,) int64."""

    item_ids: npt.NDArray[np.int64]
    features: dict[str, npt.NDArray[np.float32]]
    planted_primary: npt.NDArray[np.int64]
    planted_fine: npt.NDArray[np.int64]


def make_planted_catalogue(
    num_items: int,
    widths: Mapping[str, int],
    num_clusters: int,
    num_subclusters: int = 3,
    latent_dim: int = 32,
    cluster_spread: float = 1.0,
    subcluster_spread: float = 0.35,
    item_noise: float = 0.08,
    modality_noise: float = 0.05,
    seed: int = 0,
    id_offset: int = 1_000_000,
) -> PlantedCatalogue:
    """A catalogue of ``num_items`` items with planted clusters, deterministic in ``seed``."""
    if num_items < 1 or num_clusters < 1 or num_subclusters < 1:
        raise ValueError("num_items, num_clusters and num_subclusters must be >= 1")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, cluster_spread, size=(num_clusters, latent_dim))
    sub_offsets = rng.normal(
        0.0, subcluster_spread, size=(num_clusters, num_subclusters, latent_dim)
    )
    primary = rng.integers(0, num_clusters, size=num_items)
    sub = rng.integers(0, num_subclusters, size=num_items)
    latent = (
        centres[primary]
        + sub_offsets[primary, sub]
        + rng.normal(0.0, item_noise, size=(num_items, latent_dim))
    )
    features: dict[str, npt.NDArray[np.float32]] = {}
    for name, width in widths.items():
        projection = rng.normal(0.0, 1.0 / np.sqrt(latent_dim), size=(latent_dim, width))
        view = latent @ projection + rng.normal(0.0, modality_noise, size=(num_items, width))
        features[name] = view.astype(np.float32)
    item_ids = (id_offset + rng.permutation(num_items)).astype(np.int64)
    return PlantedCatalogue(
        item_ids=item_ids,
        features=features,
        planted_primary=primary.astype(np.int64),
        planted_fine=(primary * num_subclusters + sub).astype(np.int64),
    )


def random_artifact(
    num_items: int,
    num_primary: int,
    num_secondary: int,
    snapshot_dim: int,
    seed: int = 0,
    first_id: int = 1_000_000,
    metadata: Mapping[str, Any] | None = None,
) -> CodebookArtifact:
    """A valid codebook artifact from random arrays, without training, for load tests and
    benchmarks: ids ``first_id .. first_id + num_items - 1`` shuffled, every primary cluster
    non-empty, a (num_items, snapshot_dim) float32 embedding snapshot."""
    rng = np.random.default_rng(seed)
    dim, width = 16, 12
    codebook = Codebook(
        modality_names=("image",),
        map_weights=(rng.normal(size=(dim, width)).astype(np.float32),),
        map_biases=(np.zeros(dim, dtype=np.float32),),
        primary_codewords=rng.normal(size=(num_primary, dim)).astype(np.float32),
        secondary_codewords=rng.normal(size=(num_secondary, dim)).astype(np.float32),
    )
    codes = rng.permutation(np.arange(num_items) % num_primary)
    index = ClusterIndex.build(
        first_id + rng.permutation(num_items).astype(np.int64),
        codes,
        rng.integers(0, num_secondary, size=num_items),
        num_primary,
        num_secondary,
    )
    return CodebookArtifact(
        codebook=codebook,
        index=index,
        cluster_choice=cluster_choice_matrix(codebook.primary_codewords, index.cluster_sizes, 1.0),
        embeddings=rng.standard_normal(size=(num_items, snapshot_dim), dtype=np.float32),
        metadata={"seed": seed, **(metadata or {})},
    )


def adjusted_rand_index(labels_true: npt.ArrayLike, labels_pred: npt.ArrayLike) -> float:
    """Adjusted Rand index of two labelings (1.0 = identical partitions, ~0 = chance)."""
    a = np.asarray(labels_true)
    b = np.asarray(labels_pred)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("labelings must be 1-D arrays of the same length")
    _, a_codes = np.unique(a, return_inverse=True)
    _, b_codes = np.unique(b, return_inverse=True)
    contingency = np.zeros((a_codes.max() + 1, b_codes.max() + 1), dtype=np.int64)
    np.add.at(contingency, (a_codes, b_codes), 1)

    def pairs(x: npt.NDArray[np.int64]) -> float:
        return float((x * (x - 1) // 2).sum())

    index = pairs(contingency)
    rows = pairs(contingency.sum(axis=1))
    cols = pairs(contingency.sum(axis=0))
    total = a.size * (a.size - 1) / 2
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)
