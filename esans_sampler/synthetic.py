"""Synthetic catalogues with planted cluster structure, for the demo, tests and benchmarks,
and random (untrained) codebook artifacts for load tests.

Each item belongs to a planted primary cluster and a planted sub-cluster inside it. A
shared latent vector (cluster centre + sub-cluster offset + item noise) is projected into
every modality by a fixed random matrix, plus modality-specific noise, so the modalities
agree on the structure the way aligned image/text/behaviour views of one item do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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
    modality_noise: float | Mapping[str, float] = 0.05,
    size_skew: float = 0.0,
    seed: int = 0,
    id_offset: int = 1_000_000,
) -> PlantedCatalogue:
    """A catalogue of ``num_items`` items with planted clusters, deterministic in ``seed``.

    modality_noise: the std of each view's own noise, one for all or one per modality name.
    size_skew: 0 gives clusters (and sub-clusters inside each) of equal expected size; s > 0
    draws them with Zipf-like weights ``rank ** -s`` in a random order, so sizes differ.
    """
    if num_items < 1 or num_clusters < 1 or num_subclusters < 1:
        raise ValueError("num_items, num_clusters and num_subclusters must be >= 1")
    if size_skew < 0:
        raise ValueError("size_skew must be >= 0")
    noise = (
        {name: float(modality_noise) for name in widths}
        if isinstance(modality_noise, int | float)
        else {name: float(modality_noise[name]) for name in widths}
    )
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, cluster_spread, size=(num_clusters, latent_dim))
    sub_offsets = rng.normal(
        0.0, subcluster_spread, size=(num_clusters, num_subclusters, latent_dim)
    )
    if size_skew == 0:
        primary = rng.integers(0, num_clusters, size=num_items)
        sub = rng.integers(0, num_subclusters, size=num_items)
    else:
        primary = rng.choice(
            num_clusters, size=num_items, p=_zipf_weights(num_clusters, size_skew, rng)
        )
        sub_weights = np.stack(
            [_zipf_weights(num_subclusters, size_skew, rng) for _ in range(num_clusters)]
        )
        cumulative = np.cumsum(sub_weights, axis=1)[primary]
        sub = np.minimum((rng.random((num_items, 1)) > cumulative).sum(axis=1), num_subclusters - 1)
    latent = (
        centres[primary]
        + sub_offsets[primary, sub]
        + rng.normal(0.0, item_noise, size=(num_items, latent_dim))
    )
    features: dict[str, npt.NDArray[np.float32]] = {}
    for name, width in widths.items():
        projection = rng.normal(0.0, 1.0 / np.sqrt(latent_dim), size=(latent_dim, width))
        view = latent @ projection + rng.normal(0.0, noise[name], size=(num_items, width))
        features[name] = view.astype(np.float32)
    item_ids = (id_offset + rng.permutation(num_items)).astype(np.int64)
    return PlantedCatalogue(
        item_ids=item_ids,
        features=features,
        planted_primary=primary.astype(np.int64),
        planted_fine=(primary * num_subclusters + sub).astype(np.int64),
    )


def _zipf_weights(n: int, skew: float, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    weights = rng.permutation(np.arange(1, n + 1, dtype=np.float64) ** -skew)
    normalised: npt.NDArray[np.float64] = weights / weights.sum()
    return normalised


@dataclass(frozen=True)
class PlantedShape:
    """A named planted catalogue (the arguments of :func:`make_planted_catalogue`), used by the
    fine-cell tests and ``benchmarks/bench_fine_cells.py``."""

    name: str
    num_items: int
    widths: dict[str, int]
    clusters: int
    subclusters: int
    options: dict[str, Any] = field(default_factory=dict)

    def make(self, seed: int = 0) -> PlantedCatalogue:
        return make_planted_catalogue(
            self.num_items,
            self.widths,
            self.clusters,
            self.subclusters,
            seed=seed,
            **self.options,
        )


PLANTED_SHAPES = {
    shape.name: shape
    for shape in (
        # The catalogue: 12 clusters x 4 sub-clusters of 480 items on average.
        PlantedShape("12x4", 5760, {"image": 64, "text": 32}, 12, 4),
        # Sub-structure a tenth as strong as the clusters' (default: 0.35).
        PlantedShape(
            "weak-sub", 4000, {"image": 64, "text": 32}, 10, 4, {"subcluster_spread": 0.1}
        ),
        # Zipf-like cluster and sub-cluster sizes.
        PlantedShape("unequal", 6000, {"image": 64, "text": 32}, 10, 3, {"size_skew": 1.0}),
        # One modality.
        PlantedShape("one-view", 4000, {"text": 48}, 10, 4),
        # Three modalities of different widths and noise.
        PlantedShape(
            "three-views",
            4000,
            {"image": 96, "text": 48, "graph": 16},
            10,
            4,
            {"modality_noise": {"image": 0.05, "text": 0.3, "graph": 0.6}},
        ),
        # A known limit: sizes so skewed (the largest cluster holds a third of the items)
        # that k-means splits it and merges small ones, so primary clusters are not recovered.
        PlantedShape("very-unequal", 6000, {"image": 64, "text": 32}, 10, 3, {"size_skew": 1.5}),
    )
}
PLANTED_SHAPE_LIMITS = {"very-unequal"}  # shapes not expected to meet the targets


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


@dataclass(frozen=True)
class FineCellRecovery:
    """How a codebook's fine cells match a planted catalogue's, and what hard negatives get.

    fine_ari: adjusted Rand index of the (primary, secondary) cells against the planted ones.
    hard_fill: filled share of the requested hard slots (every item a positive once).
    hard_false_negatives: share of the returned hard negatives in the positive's planted cell.
    """

    fine_ari: float
    primary_ari: float
    fine_cells_used: int
    hard_fill: float
    hard_false_negatives: float

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def fine_cell_recovery(
    planted: PlantedCatalogue, index: ClusterIndex, m_h: int = 5, seed: int = 0
) -> FineCellRecovery:
    """Compare ``index`` (built over ``planted``'s items) with the planted cells, and draw
    ``m_h`` hard negatives for every item with the ESANS sampler."""
    from esans_sampler.sampler import EsansSampler

    rows = index.rows_of(planted.item_ids)
    primary = index.primary[rows].astype(np.int64)
    fine = primary * index.num_secondary + index.secondary[rows]
    planted_fine_of_row = np.empty(index.num_items, dtype=np.int64)
    planted_fine_of_row[rows] = planted.planted_fine
    sampler = EsansSampler(index, np.eye(index.num_primary))
    sample = sampler.sample(planted.item_ids, np.random.default_rng(seed), m_c=1, m_o=1, m_h=m_h)
    real = sample.hard_rows >= 0
    same_cell = (
        planted_fine_of_row[sample.hard_rows[real]]
        == np.repeat(planted.planted_fine, m_h).reshape(-1, m_h)[real]
    )
    returned = int(real.sum())
    return FineCellRecovery(
        fine_ari=adjusted_rand_index(planted.planted_fine, fine),
        primary_ari=adjusted_rand_index(planted.planted_primary, primary),
        fine_cells_used=int(np.unique(fine).size),
        hard_fill=returned / sample.hard_rows.size if m_h else 1.0,
        hard_false_negatives=float(same_cell.mean()) if returned else 0.0,
    )
