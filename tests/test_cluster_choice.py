from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esans_sampler.cluster_choice import (
    MIN_CLUSTER_DISTANCE,
    AliasTable,
    cluster_choice_matrix,
    effective_clusters,
)
from esans_sampler.errors import InvalidInputError


def _reference_row(
    codewords: npt.NDArray[np.float64], sizes: npt.NDArray[np.int64], p: int, gamma: float
) -> npt.NDArray[np.float64]:
    """eq. 9 written out for one row, the slow obvious way."""
    k = codewords.shape[0]
    unit = codewords / np.linalg.norm(codewords, axis=1, keepdims=True)
    q = np.zeros(k)
    for i in range(k):
        if i != p and sizes[i] > 0:
            s = (float(unit[i] @ unit[p]) + 1.0) / 2.0
            q[i] = max(1.0 - s, MIN_CLUSTER_DISTANCE) ** -gamma
    return q / q.sum() if q.sum() > 0 else q


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0])
def test_matrix_matches_eq9_row_by_row(gamma: float) -> None:
    rng = np.random.default_rng(1)
    codewords = rng.normal(size=(7, 4))
    sizes = np.array([3, 0, 5, 1, 0, 9, 2])
    matrix = cluster_choice_matrix(codewords, sizes, gamma)
    for p in range(7):
        np.testing.assert_allclose(matrix[p], _reference_row(codewords, sizes, p, gamma))
    assert np.all(np.diagonal(matrix) == 0.0)
    assert np.all(matrix[:, sizes == 0] == 0.0)


def test_gamma_zero_is_uniform_over_other_non_empty_clusters() -> None:
    sizes = np.array([1, 1, 0, 1, 1])
    matrix = cluster_choice_matrix(np.eye(5), sizes, 0.0)
    np.testing.assert_allclose(matrix[0], [0, 1 / 3, 0, 1 / 3, 1 / 3])


def test_larger_gamma_favours_the_closest_cluster() -> None:
    codewords = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    sizes = np.ones(4, dtype=np.int64)
    soft = cluster_choice_matrix(codewords, sizes, 0.5)[0]
    sharp = cluster_choice_matrix(codewords, sizes, 4.0)[0]
    assert soft[1] > soft[2] > soft[3]
    assert sharp[1] > soft[1]
    assert effective_clusters(sharp[None])[0] < effective_clusters(soft[None])[0]


def test_identical_codewords_are_floored_and_huge_gamma_stays_finite() -> None:
    codewords = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    matrix = cluster_choice_matrix(codewords, np.ones(3, dtype=np.int64), 1000.0)
    assert np.isfinite(matrix).all()
    np.testing.assert_allclose(matrix[0], [0.0, 1.0, 0.0])


def test_row_without_a_valid_cluster_is_zero() -> None:
    matrix = cluster_choice_matrix(np.eye(3), np.array([4, 0, 0]), 1.0)
    assert np.all(matrix[0] == 0.0)
    np.testing.assert_allclose(matrix[1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(effective_clusters(matrix), [0.0, 1.0, 1.0])


@pytest.mark.parametrize("gamma", [-0.1, float("nan"), float("inf"), 1000.5, 2.6e307])
def test_bad_gamma_is_refused(gamma: float) -> None:
    with pytest.raises(InvalidInputError, match="gamma"):
        cluster_choice_matrix(np.eye(3), np.ones(3), gamma)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="cluster_sizes"):
        cluster_choice_matrix(np.eye(3), np.ones(4), 1.0)
    with pytest.raises(InvalidInputError, match="primary_codewords"):
        cluster_choice_matrix(np.ones(3), np.ones(3), 1.0)


def test_effective_clusters_of_a_uniform_row_is_its_support() -> None:
    row = np.array([[0.25, 0.25, 0.0, 0.25, 0.25]])
    np.testing.assert_allclose(effective_clusters(row), [4.0])


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e3)), min_size=1, max_size=40).filter(
        lambda w: sum(w) > 0
    )
)
def test_alias_table_encodes_its_probabilities(weights: list[float]) -> None:
    w = np.array(weights)
    table = AliasTable.build(w)
    np.testing.assert_allclose(table.probabilities()[0], w / w.sum(), atol=1e-12)
    # An outcome of weight 0 can be reached neither through its column nor as an alias.
    zero = w == 0.0
    assert np.all(table.prob[0][zero] == 0.0)
    assert not np.any(zero[table.alias[0][table.prob[0] < 1.0]])


def test_alias_table_of_a_matrix_and_its_draw_frequencies() -> None:
    rng = np.random.default_rng(5)
    weights = rng.random((3, 6)) ** 2
    weights[1, [0, 4]] = 0.0
    table = AliasTable.build(weights)
    probs = weights / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(table.probabilities(), probs, atol=1e-12)
    n = 60_000
    for r in range(3):
        drawn = table.draw(np.full(n, r), rng)
        freq = np.bincount(drawn, minlength=6) / n
        # 5 binomial standard deviations, never failing by chance at this seed.
        tol = 5 * np.sqrt(probs[r] * (1 - probs[r]) / n) + 1e-12
        assert np.all(np.abs(freq - probs[r]) <= tol)
        assert np.array_equal(table.draw_row(r, 10, np.random.default_rng(0)).shape, (10,))


def test_alias_draws_are_deterministic_in_the_seed() -> None:
    table = AliasTable.build(np.random.default_rng(0).random((4, 9)))
    rows = np.array([0, 3, 1, 1, 2])
    first = table.draw(rows, np.random.default_rng(11))
    assert np.array_equal(first, table.draw(rows, np.random.default_rng(11)))


def test_alias_refuses_bad_weights_and_rows() -> None:
    with pytest.raises(InvalidInputError):
        AliasTable.build([1.0, -1.0])
    with pytest.raises(InvalidInputError):
        AliasTable.build([1.0, float("nan")])
    table = AliasTable.build([[1.0, 2.0], [0.0, 0.0]])
    assert table.valid.tolist() == [True, False]
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInputError, match="no outcome"):
        table.draw(np.array([0, 1]), rng)
    with pytest.raises(InvalidInputError, match="rows must lie"):
        table.draw(np.array([2]), rng)
    with pytest.raises(InvalidInputError, match="integer"):
        table.draw(np.array([0.5]), rng)


def test_a_300_row_table_holds_its_matrix() -> None:
    # Its build time is reported by benchmarks/bench_sampler.py, not asserted here.
    rng = np.random.default_rng(0)
    matrix = cluster_choice_matrix(rng.normal(size=(300, 32)), rng.integers(0, 50, 300), 1.0)
    table = AliasTable.build(matrix)
    np.testing.assert_allclose(table.probabilities(), matrix, atol=1e-12)
