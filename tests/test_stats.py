from __future__ import annotations

import json
import math

import numpy as np
import numpy.typing as npt
import pytest

from esans_sampler.errors import InvalidInputError
from esans_sampler.stats import codebook_stats, hard_coverage, histogram_label, usage_perplexity


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([5, 5, 5, 5], 4.0),
        ([0, 7, 0], 1.0),
        ([1, 1, 0, 0], 2.0),
        ([0, 0], 0.0),
        ([3, 1], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),
    ],
)
def test_usage_perplexity(counts: list[int], expected: float) -> None:
    assert usage_perplexity(counts) == pytest.approx(expected)


def test_known_codes() -> None:
    # K_p = 4 (cluster 3 empty), K_s = 3 (code 2 unused).
    primary = np.array([0, 0, 0, 0, 1, 1, 2, 2], dtype=np.int32)
    secondary = np.array([0, 1, 0, 1, 0, 0, 1, 1], dtype=np.int32)
    stats = codebook_stats(primary, secondary, 4, 3, num_bins=4)
    assert stats.num_items == 8
    assert stats.primary_used == 3 and stats.empty_clusters == 1
    assert stats.secondary_used == 2
    assert stats.secondary_perplexity == pytest.approx(2.0)
    assert stats.fine_cells_used == 4  # (0,0) (0,1) (1,0) (2,1)
    assert stats.fine_perplexity == pytest.approx(4.0)
    assert stats.primary_perplexity == pytest.approx(usage_perplexity([4, 2, 2, 0]))
    assert (stats.cluster_size_min, stats.cluster_size_median, stats.cluster_size_max) == (0, 2, 4)
    # Integer bins [lo, hi) over sizes 0..4: [0], [1], [2, 3], [4].
    assert stats.cluster_size_bin_edges == (0, 1, 2, 4, 5)
    assert stats.cluster_size_counts == (1, 0, 2, 1)


def test_equal_cluster_sizes_make_one_bin() -> None:
    stats = codebook_stats(np.repeat(np.arange(12), 480), np.zeros(5760, dtype=np.int64), 12, 4)
    assert stats.cluster_size_bin_edges == (480, 481)
    assert stats.cluster_size_counts == (12,)
    assert histogram_label(480, 481) == "480"
    assert histogram_label(11, 21) == "11-20"
    # float edges of older artifacts
    assert histogram_label(479.5, 480.5) == "480"
    assert histogram_label(479.5, 479.6) == "479.5-479.6"


def test_hard_coverage_of_known_cells() -> None:
    # Cluster 0: cells of 6 and 1 item; cluster 1: one cell of 10 (no hard candidates);
    # cluster 2: cells of 3 and 3; cluster 3: empty.
    fine_sizes = np.array([[6, 1], [10, 0], [3, 3], [0, 0]])
    coverage = hard_coverage(fine_sizes, m_h=3)
    assert (coverage.cells_per_cluster_min, coverage.cells_per_cluster_max) == (1, 2)
    assert coverage.cells_per_cluster_median == 2.0
    # >= 3 candidates: the 1-item cell (6 outside) and both 3-item cells (3 outside each).
    assert coverage.share_with_m_h == pytest.approx(7 / 23)
    assert coverage.share_with_any == pytest.approx(13 / 23)
    assert "30% of items have at least 3" in (coverage.warning() or "")
    assert hard_coverage(fine_sizes, m_h=0).share_with_m_h == 1.0
    assert hard_coverage([[5, 5], [5, 5]], m_h=5).warning() is None


@pytest.mark.parametrize("fine_sizes", [np.zeros((2, 2)), np.array([1, 2]), np.array([[-1, 2]])])
def test_hard_coverage_rejects_bad_counts(fine_sizes: npt.NDArray[np.int64]) -> None:
    with pytest.raises(InvalidInputError):
        hard_coverage(fine_sizes)


def test_histogram_counts_every_primary_cluster() -> None:
    rng = np.random.default_rng(0)
    stats = codebook_stats(rng.integers(0, 50, 1000), rng.integers(0, 5, 1000), 60, 5)
    assert sum(stats.cluster_size_counts) == 60
    assert stats.empty_clusters >= 10


def test_as_dict_is_json_serialisable() -> None:
    stats = codebook_stats([0, 1, 1], [0, 0, 1], 2, 2)
    restored = json.loads(json.dumps(stats.as_dict()))
    assert restored["primary_used"] == 2
    assert restored["cluster_size_counts"] == list(stats.cluster_size_counts)


@pytest.mark.parametrize(
    ("primary", "secondary", "kp", "ks"),
    [
        ([0, 4], [0, 0], 4, 2),  # primary out of range
        ([0, 1], [0, -1], 4, 2),  # secondary negative
        ([0, 1, 2], [0, 1], 4, 2),  # lengths differ
        ([0.0, 1.0], [0, 1], 4, 2),  # not integer
        ([[0, 1]], [[0, 1]], 4, 2),  # not 1-D
        ([], [], 4, 2),  # empty
        ([0], [0], 0, 2),  # K_p < 1
    ],
)
def test_bad_codes_are_rejected(
    primary: list[object], secondary: list[object], kp: int, ks: int
) -> None:
    with pytest.raises(InvalidInputError):
        codebook_stats(np.array(primary), np.array(secondary), kp, ks)
