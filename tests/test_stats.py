from __future__ import annotations

import json
import math

import numpy as np
import pytest

from esans_sampler.errors import InvalidInputError
from esans_sampler.stats import codebook_stats, usage_perplexity


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
    assert len(stats.cluster_size_bin_edges) == 5
    assert stats.cluster_size_bin_edges[0] == 0.0 and stats.cluster_size_bin_edges[-1] == 4.0
    assert stats.cluster_size_counts == (1, 0, 2, 1)


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
