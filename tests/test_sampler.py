from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esans_sampler.cluster_choice import cluster_choice_matrix
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.draws import draw_distinct
from esans_sampler.errors import FailedPreconditionError, InvalidInputError, UnknownItemError
from esans_sampler.sampler import EsansSampler, NegativeSample

ID_OFFSET = 1000


@dataclass(frozen=True)
class Case:
    index: ClusterIndex
    codewords: npt.NDArray[np.float64]
    positives: npt.NDArray[np.int64]


def _index(primary: list[int], secondary: list[int], k_p: int, k_s: int) -> ClusterIndex:
    ids = np.arange(len(primary), dtype=np.int64)[::-1] + ID_OFFSET
    return ClusterIndex.build(ids, primary, secondary, k_p, k_s)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Random codebooks with empty clusters and cells, and batches with duplicates."""
    k_p = draw(st.integers(2, 7))
    k_s = draw(st.integers(1, 4))
    n = draw(st.integers(2, 50))
    # Codes concentrated on a random subset of clusters, so some clusters stay empty.
    used = draw(st.lists(st.integers(0, k_p - 1), min_size=2, max_size=k_p, unique=True))
    primary = draw(st.lists(st.sampled_from(used), min_size=n, max_size=n))
    primary[:2] = used[:2]  # at least two non-empty primary clusters
    secondary = draw(st.lists(st.integers(0, k_s - 1), min_size=n, max_size=n))
    index = _index(primary, secondary, k_p, k_s)
    seed = draw(st.integers(0, 2**32 - 1))
    codewords = np.random.default_rng(seed).normal(size=(k_p, 3))
    rows = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=12))
    return Case(index, codewords, index.item_ids[np.array(rows)])


def _check_rules(
    sample: NegativeSample, index: ClusterIndex, matrix: npt.NDArray[np.float64], m_h: int
) -> None:
    p = sample.positive_primary
    s = sample.positive_secondary
    assert np.array_equal(index.item_ids[sample.positive_rows], sample.positive_ids)
    # Simple: from a drawn cluster != p, non-empty, and the item's primary code matches it.
    clusters = sample.simple_clusters
    assert np.all(clusters != p[:, None])
    assert np.all(index.cluster_sizes[clusters] > 0)
    assert np.all(index.primary[sample.simple_rows] == clusters[:, :, None])
    assert np.array_equal(index.item_ids[sample.simple_rows], sample.simple_ids)
    assert np.all(sample.simple_ids != sample.positive_ids[:, None, None])
    expected = np.log(matrix[p[:, None], clusters]) - np.log(index.cluster_sizes[clusters])
    np.testing.assert_allclose(
        sample.simple_log_q, np.broadcast_to(expected[:, :, None], sample.simple_ids.shape), 1e-5
    )
    # Hard: in p, outside (p, s), distinct, count exact, log q = -log A, padded after.
    available = index.cluster_sizes[p] - index.fine_sizes[p, s]
    assert np.array_equal(sample.hard_counts, np.minimum(available, m_h))
    for b in range(sample.B):
        count = sample.hard_counts[b]
        rows = sample.hard_rows[b, :count]
        assert np.all(index.primary[rows] == p[b])
        assert np.all(index.secondary[rows] != s[b])
        assert np.unique(rows).size == count
        assert np.array_equal(index.item_ids[rows], sample.hard_ids[b, :count])
        assert sample.positive_ids[b] not in sample.hard_ids[b, :count]
        if count:
            np.testing.assert_allclose(sample.hard_log_q[b, :count], -np.log(available[b]), 1e-6)
        assert np.all(sample.hard_ids[b, count:] == -1)
        assert np.all(sample.hard_rows[b, count:] == -1)
        assert np.all(sample.hard_log_q[b, count:] == -np.inf)
        # Secondary codes on the wire: a trainer masks fine cells with them.
        assert np.array_equal(sample.hard_secondary[b, :count], index.secondary[rows])
        assert np.all(sample.hard_secondary[b, count:] == -1)
    assert np.array_equal(sample.simple_secondary, index.secondary[sample.simple_rows])
    assert sample.simple_secondary.dtype == sample.hard_secondary.dtype == np.int32


@settings(max_examples=80, deadline=None)
@given(
    case=cases(),
    m_c=st.integers(1, 3),
    m_o=st.integers(1, 4),
    m_h=st.integers(0, 6),
    gamma=st.sampled_from([0.0, 1.0, 2.5]),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_rule_holds_on_random_codebooks(
    case: Case, m_c: int, m_o: int, m_h: int, gamma: float, seed: int
) -> None:
    sampler = EsansSampler(case.index, case.codewords, gamma=gamma)
    sample = sampler.sample(case.positives, np.random.default_rng(seed), m_c, m_o, m_h)
    b = case.positives.shape[0]
    assert (sample.B, sample.m_c, sample.m_o, sample.m_h) == (b, m_c, m_o, m_h)
    assert sample.simple_ids.dtype == np.int64 and sample.simple_log_q.dtype == np.float32
    assert sample.simple_clusters.dtype == np.int32 and sample.hard_counts.dtype == np.int32
    assert sample.hard_log_q.dtype == np.float32 and sample.sampler == "esans"
    matrix = cluster_choice_matrix(case.codewords, case.index.cluster_sizes, gamma)
    _check_rules(sample, case.index, matrix, m_h)


def _planted() -> tuple[ClusterIndex, npt.NDArray[np.float64]]:
    """4 clusters; cluster 0 has fine cells of 3 (s = 0), 7 (s = 1) and 0 (s = 2) items."""
    primary = [0] * 10 + [1] * 4 + [2] * 6 + [3] * 5
    secondary = [0] * 3 + [1] * 7 + [0, 1, 1, 2] + [2] * 6 + [0, 0, 1, 1, 2]
    codewords = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1]])
    return _index(primary, secondary, 4, 3), codewords


def _chi_square(counts: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert np.all(counts[~keep] == 0)
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_cluster_frequencies_match_eq9() -> None:
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords, gamma=2.0)
    positive = index.item_ids[index.ordered_rows[0]]  # in cluster 0
    sample = sampler.sample(np.full(4000, positive), np.random.default_rng(3), m_c=3, m_o=1)
    counts = np.bincount(sample.simple_clusters.ravel(), minlength=4)
    probs = sampler.cluster_choice()[0]
    assert counts[0] == 0
    # chi-square with 2 degrees of freedom: 20 is far beyond its 0.9999 quantile (18.4).
    assert _chi_square(counts, probs) < 20.0


def test_items_are_uniform_inside_a_drawn_cluster() -> None:
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords)
    positive = index.item_ids[index.ordered_rows[0]]
    sample = sampler.sample(np.full(3000, positive), np.random.default_rng(4), m_c=1, m_o=4)
    rows = sample.simple_rows[sample.simple_clusters[:, 0] == 2].ravel()
    in_cluster_2 = index.ordered_rows[index.cluster_offsets[2] : index.cluster_offsets[3]]
    counts = np.array([(rows == r).sum() for r in in_cluster_2])
    assert _chi_square(counts, np.full(6, 1 / 6)) < 25.0  # 5 dof, 0.9999 quantile 25.7


@pytest.mark.parametrize(("secondary", "m_h"), [(0, 3), (0, 7), (1, 2), (1, 5)])
def test_hard_draws_are_uniform_in_every_slot(secondary: int, m_h: int) -> None:
    # In cluster 0 a positive of cell s = 0 has A = 7 candidates (rejection path for
    # m_h = 3, Floyd for m_h = 7); one of cell s = 1 has A = 3 (rejection then Floyd for
    # m_h = 2; all three, shuffled, for m_h = 5).
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords)
    lo = index.fine_offsets[secondary]
    positive = index.ordered_ids[lo]
    available = 10 - int(index.fine_sizes[0, secondary])
    n = 6000
    sample = sampler.sample(np.full(n, positive), np.random.default_rng(9), m_h=m_h)
    count = min(m_h, available)
    assert np.all(sample.hard_counts == count)
    candidates = np.setdiff1d(
        index.ordered_rows[:10], index.ordered_rows[lo : index.fine_offsets[secondary + 1]]
    )
    for slot in range(count):
        drawn = sample.hard_rows[:, slot]
        counts = np.array([(drawn == r).sum() for r in candidates])
        assert counts.sum() == n
        # dof <= 6; 0.9999 quantile 27.9
        assert _chi_square(counts, np.full(available, 1 / available)) < 28.0


@pytest.mark.parametrize(("available", "m"), [(4, 2), (3, 3), (5, 4), (40, 3)])
def test_draw_distinct_is_uniform_over_ordered_tuples(available: int, m: int) -> None:
    n = 24_000
    picks, counts = draw_distinct(
        np.full(n, available, dtype=np.int64), m, np.random.default_rng(2)
    )
    assert np.all(counts == m)
    assert all(np.unique(row).size == m for row in picks[:500])
    if available <= 5:
        codes = (picks * available ** np.arange(m)).sum(axis=1)
        tally = np.unique(codes, return_counts=True)[1]
        num_tuples = int(np.prod(np.arange(available - m + 1, available + 1)))
        assert tally.size == num_tuples
        stat = _chi_square(tally, np.full(num_tuples, 1 / num_tuples))
        assert stat < num_tuples + 6 * np.sqrt(2 * num_tuples)
    else:
        for slot in range(m):
            tally = np.bincount(picks[:, slot], minlength=available)
            assert _chi_square(tally, np.full(available, 1 / available)) < 80.0  # 39 dof


def test_draw_distinct_mixes_row_sizes() -> None:
    available = np.array([0, 1, 2, 9, 1000, 5], dtype=np.int64)
    picks, counts = draw_distinct(available, 5, np.random.default_rng(0))
    assert counts.tolist() == [0, 1, 2, 5, 5, 5]
    assert picks[0].tolist() == [0] * 5 and picks[1].tolist() == [0] * 5
    assert sorted(picks[2, :2].tolist()) == [0, 1] and picks[2, 2:].tolist() == [0, 0, 0]
    assert sorted(picks[5].tolist()) == [0, 1, 2, 3, 4]
    assert np.all(picks[3] < 9) and np.unique(picks[4]).size == 5


def test_positive_alone_in_its_cluster_gets_no_hard_negatives() -> None:
    index = _index([0, 1, 1, 1], [0, 0, 0, 1], 2, 2)
    sampler = EsansSampler(index, np.eye(2))
    sample = sampler.sample(index.item_ids[[0, 1]], np.random.default_rng(0), m_h=4)
    assert sample.hard_counts.tolist() == [0, 1]
    assert np.all(sample.hard_ids[0] == -1) and np.all(sample.hard_log_q[0] == -np.inf)
    assert sample.hard_ids[1, 0] == index.item_ids[3] and sample.hard_log_q[1, 0] == 0.0


def test_sampling_is_deterministic_in_the_seed() -> None:
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords)
    positives = index.item_ids[[0, 5, 5, 12, 20]]
    first = sampler.sample(positives, np.random.default_rng(7))
    again = sampler.sample(positives, np.random.default_rng(7))
    other = sampler.sample(positives, np.random.default_rng(8))
    for name in ("simple_ids", "simple_log_q", "hard_ids", "hard_log_q", "hard_counts"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.simple_ids, other.simple_ids)


def test_unknown_ids_raise() -> None:
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords)
    with pytest.raises(UnknownItemError, match="1 positive id"):
        sampler.sample([ID_OFFSET, 7], np.random.default_rng(0))


def test_fewer_than_two_non_empty_clusters_is_refused() -> None:
    index = _index([1, 1, 1], [0, 1, 0], 3, 2)
    with pytest.raises(FailedPreconditionError, match="at least 2 non-empty"):
        EsansSampler(index, np.eye(3))


@pytest.mark.parametrize(
    "sizes",
    [{"m_c": 0}, {"m_o": 0}, {"m_h": -1}, {"m_c": 1.5}, {"m_o": True}, {"m_h": "2"}],
)
def test_bad_sizes_are_refused(sizes: dict[str, object]) -> None:
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords)
    with pytest.raises(InvalidInputError):
        sampler.sample(index.item_ids[:2], np.random.default_rng(0), **sizes)  # type: ignore[arg-type]


def test_bad_inputs_are_refused() -> None:
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords)
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInputError, match="1-D"):
        sampler.sample(index.item_ids[:4].reshape(2, 2), rng)
    with pytest.raises(InvalidInputError, match="integers"):
        sampler.sample(np.array([1000.0]), rng)
    with pytest.raises(InvalidInputError, match="gamma"):
        sampler.sample(index.item_ids[:2], rng, gamma=-1.0)
    with pytest.raises(InvalidInputError, match="primary_codewords"):
        EsansSampler(index, np.eye(3))


def test_empty_batch_gives_empty_arrays() -> None:
    index, codewords = _planted()
    sample = EsansSampler(index, codewords).sample([], np.random.default_rng(0))
    assert sample.simple_ids.shape == (0, 2, 5) and sample.hard_ids.shape == (0, 5)


def test_gamma_override_uses_its_own_matrix_and_is_cached() -> None:
    index, codewords = _planted()
    sampler = EsansSampler(index, codewords, gamma=1.0)
    sizes = index.cluster_sizes
    np.testing.assert_allclose(sampler.cluster_choice(), cluster_choice_matrix(codewords, sizes, 1))
    sharp = sampler.cluster_choice(8.0)
    np.testing.assert_allclose(sharp, cluster_choice_matrix(codewords, sizes, 8.0))
    assert sampler.cluster_choice(8.0) is sharp
    positive = index.ordered_ids[0]
    sample = sampler.sample(np.full(50, positive), np.random.default_rng(0), gamma=8.0)
    expected = np.log(sharp[0, sample.simple_clusters]) - np.log(sizes[sample.simple_clusters])
    np.testing.assert_allclose(sample.simple_log_q[:, :, 0], expected, rtol=1e-5)
    for g in range(20, 30):
        sampler.cluster_choice(float(g))
    assert sampler.cluster_choice(8.0) is not sharp  # evicted from the small cache


def test_precomputed_matrix_is_used_and_checked() -> None:
    index, codewords = _planted()
    matrix = cluster_choice_matrix(codewords, index.cluster_sizes, 0.0)
    sampler = EsansSampler(index, codewords, gamma=0.0, cluster_choice=matrix)
    assert np.array_equal(sampler.cluster_choice(), matrix)
    bad = matrix.copy()
    bad[0, 0], bad[0, 1] = bad[0, 1], 0.0
    with pytest.raises(InvalidInputError, match="diagonal"):
        EsansSampler(index, codewords, cluster_choice=bad)
    with pytest.raises(InvalidInputError, match="sum to 1"):
        EsansSampler(index, codewords, cluster_choice=matrix * 0.5)
    with pytest.raises(InvalidInputError, match=r"\(4, 4\)"):
        EsansSampler(index, codewords, cluster_choice=matrix[:3])


def test_sampling_modules_do_not_import_torch() -> None:
    code = (
        "import sys, esans_sampler.sampler, esans_sampler.baselines, "
        "esans_sampler.cluster_choice; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_draw_distinct_with_many_slots_checks_repeats_by_sorting() -> None:
    available = np.array([100, 25, 20, 7], dtype=np.int64)
    picks, counts = draw_distinct(available, 20, np.random.default_rng(1))
    assert counts.tolist() == [20, 20, 20, 7]
    for row, count in zip(picks, counts, strict=True):
        assert np.unique(row[:count]).size == count
    assert sorted(picks[2].tolist()) == list(range(20))
    assert np.all(picks[0] < 100) and np.all(picks[1] < 25)


@pytest.mark.parametrize("id_base", [-(2**62), 0, 2**40])
@pytest.mark.parametrize("spread", [1, 2**33])
def test_rules_hold_for_compact_and_wide_item_ids(id_base: int, spread: int) -> None:
    # Ids spanning less than 2**32 are stored as 32-bit offsets, wider ones as int64.
    rng = np.random.default_rng(3)
    n = 60
    ids = id_base + spread * rng.permutation(n).astype(np.int64)
    index = ClusterIndex.build(ids, rng.integers(0, 4, n), rng.integers(0, 3, n), 4, 3)
    codewords = rng.normal(size=(4, 3))
    sampler = EsansSampler(index, codewords)
    sample = sampler.sample(ids[::3], np.random.default_rng(4), 2, 3, 4)
    _check_rules(sample, index, sampler.cluster_choice(), 4)
    assert sample.simple_rows.flags.c_contiguous and sample.hard_ids.flags.c_contiguous
