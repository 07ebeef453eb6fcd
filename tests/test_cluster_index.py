from __future__ import annotations

import numpy as np
import pytest

from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.errors import InvalidInputError, UnknownItemError


def _index(ids: list[int]) -> ClusterIndex:
    rng = np.random.default_rng(0)
    n = len(ids)
    return ClusterIndex.build(ids, rng.integers(0, 4, n), rng.integers(0, 3, n), 4, 3)


@pytest.mark.parametrize("ids", [list(range(100, 140)), [5, 10**12, -7, 42, 3, 99999999]])
def test_rows_of_round_trips_dense_and_sparse_ids(ids: list[int]) -> None:
    index = _index(ids)
    query = np.array(ids[::-1])
    assert np.array_equal(index.item_ids[index.rows_of(query)], query)


def test_csr_ranges_hold_exactly_their_cells() -> None:
    index = _index(list(range(200)))
    for p in range(4):
        lo, hi = index.cluster_offsets[p], index.cluster_offsets[p + 1]
        assert np.all(index.primary[index.ordered_rows[lo:hi]] == p)
        for s in range(3):
            flo, fhi = index.fine_offsets[p * 3 + s], index.fine_offsets[p * 3 + s + 1]
            rows = index.ordered_rows[flo:fhi]
            assert np.all((index.primary[rows] == p) & (index.secondary[rows] == s))
    assert index.cluster_sizes.sum() == 200
    assert np.array_equal(index.ordered_ids, index.item_ids[index.ordered_rows])


def test_unknown_ids_are_named() -> None:
    index = _index(list(range(10)))
    with pytest.raises(UnknownItemError, match="2 positive id"):
        index.rows_of([1, 77, -3])


def test_duplicate_ids_and_bad_codes_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="unique"):
        ClusterIndex.build([1, 2, 2], [0, 0, 0], [0, 0, 0], 1, 1)
    with pytest.raises(InvalidInputError, match="primary codes"):
        ClusterIndex.build([1, 2], [0, 5], [0, 0], 2, 1)


@pytest.mark.parametrize(
    ("ids", "query", "unknown"),
    [
        (list(range(10, 20)), [9, 12, 20], 2),  # dense, no gaps: below and above the range
        ([10, 12, 14, 16], [12, 13, 10], 1),  # dense with gaps: a hole inside the range
        ([5, 10**12, -7], [5, 6, -7, 10**13], 2),  # sparse: binary search
    ],
)
def test_unknown_ids_are_found_on_every_lookup_path(
    ids: list[int], query: list[int], unknown: int
) -> None:
    index = _index(ids)
    with pytest.raises(UnknownItemError, match=f"{unknown} positive id"):
        index.rows_of(query)
    assert index.rows_of(np.zeros(0, dtype=np.int64)).shape == (0,)
