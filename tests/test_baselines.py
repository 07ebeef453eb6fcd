from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esans_sampler.baselines import MixedSampler, PopularitySampler, UniformSampler
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.errors import FailedPreconditionError, InvalidInputError, UnknownItemError
from esans_sampler.sampler import EsansSampler, NegativeSample, NegativeSampler


def _index(n: int, seed: int = 0) -> ClusterIndex:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n).astype(np.int64) * 3 + 7  # ids differ from catalogue rows
    return ClusterIndex.build(ids, rng.integers(0, 3, n), rng.integers(0, 2, n), 3, 2)


def _check_common(sample: NegativeSample, index: ClusterIndex, m_c: int, m_o: int) -> None:
    b = sample.positive_ids.shape[0]
    assert sample.simple_ids.shape == (b, m_c, m_o) == sample.simple_log_q.shape
    assert np.array_equal(index.item_ids[sample.simple_rows], sample.simple_ids)
    assert np.all(sample.simple_ids != sample.positive_ids[:, None, None])
    assert np.all(sample.simple_clusters == -1) and sample.simple_clusters.shape == (b, m_c)
    assert np.all(sample.hard_counts == 0) and np.all(sample.hard_ids == -1)
    assert np.all(sample.hard_rows == -1) and np.all(sample.hard_log_q == -np.inf)
    assert np.all(sample.simple_secondary == -1) and np.all(sample.hard_secondary == -1)
    assert sample.simple_secondary.shape == sample.simple_ids.shape
    assert sample.hard_secondary.shape == sample.hard_ids.shape
    assert sample.simple_log_q.dtype == np.float32
    assert np.array_equal(index.primary[sample.positive_rows], sample.positive_primary)


def _counts(n: int, seed: int = 1) -> npt.NDArray[np.int64]:
    return np.random.default_rng(seed).integers(0, 50, n)


def _samplers(index: ClusterIndex) -> list[NegativeSampler]:
    return [
        UniformSampler(index),
        PopularitySampler(index, _counts(index.num_items)),
        MixedSampler(index, 0.5),
    ]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 30),
    data=st.data(),
    m_c=st.integers(1, 3),
    m_o=st.integers(1, 4),
    m_h=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_baseline_keeps_the_shared_layout(
    n: int, data: st.DataObject, m_c: int, m_o: int, m_h: int, seed: int
) -> None:
    index = _index(n, seed % 1000)
    rows = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=10))
    positives = index.item_ids[np.array(rows)]
    for sampler in _samplers(index):
        sample = sampler.sample(positives, np.random.default_rng(seed), m_c, m_o, m_h)
        _check_common(sample, index, m_c, m_o)
        assert sample.hard_ids.shape == (len(rows), m_h) and sample.sampler == sampler.name


def test_uniform_log_q_and_frequencies() -> None:
    index = _index(6)
    positive = index.item_ids[2]
    sample = UniformSampler(index).sample(np.full(4000, positive), np.random.default_rng(0))
    assert np.allclose(sample.simple_log_q, -np.log(5))
    counts = np.bincount(sample.simple_rows.ravel(), minlength=6)
    assert counts[2] == 0
    expected = counts.sum() / 5
    assert ((counts[counts > 0] - expected) ** 2 / expected).sum() < 23.0  # 4 dof


def test_popularity_log_q_and_frequencies() -> None:
    index = _index(5)
    counts = np.array([0, 10, 100, 3, 1000])
    sampler = PopularitySampler(index, counts, alpha=0.75)
    positive_row = 4  # the most popular item is the positive: most draws get redrawn
    sample = sampler.sample(
        np.full(4000, index.item_ids[positive_row]), np.random.default_rng(0), m_c=1, m_o=5
    )
    weights = (counts + 1.0) ** 0.75
    probs = weights / weights.sum()
    q = probs / (1.0 - probs[positive_row])
    q[positive_row] = 0.0
    drawn = sample.simple_rows.ravel()
    np.testing.assert_allclose(sample.simple_log_q.ravel(), np.log(q[drawn]), rtol=1e-5)
    freq = np.bincount(drawn, minlength=5)
    assert freq[positive_row] == 0
    expected = freq.sum() * q
    keep = expected > 0
    assert ((freq[keep] - expected[keep]) ** 2 / expected[keep]).sum() < 22.0  # 3 dof


def test_popularity_fallback_excludes_a_dominant_positive() -> None:
    index = _index(4)
    counts = np.array([0.0, 0.0, 0.0, 1e12])  # p_pos ~ 1 - 3e-12: redraws never succeed
    sampler = PopularitySampler(index, counts, alpha=1.0)
    sample = sampler.sample(np.full(3000, index.item_ids[3]), np.random.default_rng(1))
    freq = np.bincount(sample.simple_rows.ravel(), minlength=4)
    assert freq[3] == 0
    assert np.all(np.abs(freq[:3] / freq.sum() - 1 / 3) < 0.02)
    np.testing.assert_allclose(sample.simple_log_q, -np.log(3), rtol=1e-5)


def test_mixed_in_batch_slots_come_from_other_positives_with_exact_q() -> None:
    index = _index(50)
    ids = index.item_ids[[3, 3, 3, 8, 9, 9]]
    sampler = MixedSampler(index, in_batch_fraction=0.6)  # 6 of 10 slots in-batch
    sample = sampler.sample(ids, np.random.default_rng(0), m_c=2, m_o=5)
    flat_ids = sample.simple_ids.reshape(6, 10)
    flat_q = sample.simple_log_q.reshape(6, 10)
    multiplicity = {int(i): int((ids == i).sum()) for i in ids}
    for b, positive in enumerate(ids):
        others = 6 - multiplicity[int(positive)]
        for slot in range(6):
            drawn = int(flat_ids[b, slot])
            assert drawn in multiplicity and drawn != positive
            assert np.isclose(flat_q[b, slot], np.log(multiplicity[drawn] / others))
        np.testing.assert_allclose(flat_q[b, 6:], -np.log(49), rtol=1e-6)


def test_mixed_in_batch_frequencies_follow_batch_multiplicity() -> None:
    index = _index(50)
    ids = index.item_ids[[1, 2, 2, 2, 5]]
    sampler = MixedSampler(index, in_batch_fraction=1.0)
    sample = sampler.sample(ids, np.random.default_rng(3), m_c=100, m_o=20)
    drawn = sample.simple_ids[0].ravel()  # row of id 1: others are 2, 2, 2, 5
    share_of_2 = float((drawn == ids[1]).mean())
    assert abs(share_of_2 - 0.75) < 0.03
    assert set(np.unique(drawn).tolist()) == {int(ids[1]), int(ids[4])}


def test_mixed_falls_back_to_uniform_without_other_positives() -> None:
    index = _index(20)
    ids = np.full(4, index.item_ids[0])
    sample = MixedSampler(index, 1.0).sample(ids, np.random.default_rng(0))
    assert np.all(sample.simple_ids != ids[0])
    np.testing.assert_allclose(sample.simple_log_q, -np.log(19), rtol=1e-6)


def test_baselines_are_deterministic_and_refuse_bad_input() -> None:
    index = _index(30)
    positives = index.item_ids[[0, 4, 4, 9]]
    for sampler in _samplers(index):
        first = sampler.sample(positives, np.random.default_rng(5))
        again = sampler.sample(positives, np.random.default_rng(5))
        assert np.array_equal(first.simple_ids, again.simple_ids)
        assert np.array_equal(first.simple_log_q, again.simple_log_q)
        with pytest.raises(UnknownItemError):
            sampler.sample([-1], np.random.default_rng(0))
        with pytest.raises(InvalidInputError):
            sampler.sample(positives, np.random.default_rng(0), m_o=0)


def test_constructors_refuse_bad_arguments() -> None:
    index = _index(10)
    tiny = ClusterIndex.build([1], [0], [0], 1, 1)
    for make in (UniformSampler, MixedSampler):
        with pytest.raises(FailedPreconditionError, match="at least 2"):
            make(tiny)
    with pytest.raises(InvalidInputError, match="counts"):
        PopularitySampler(index, np.ones(9))
    with pytest.raises(InvalidInputError, match="counts"):
        PopularitySampler(index, -np.ones(10))
    with pytest.raises(InvalidInputError, match="alpha"):
        PopularitySampler(index, np.ones(10), alpha=-1.0)
    with pytest.raises(InvalidInputError, match="in_batch_fraction"):
        MixedSampler(index, 1.5)


def test_esans_satisfies_the_same_protocol() -> None:
    index = _index(40)
    samplers: list[NegativeSampler] = [*_samplers(index), EsansSampler(index, np.eye(3))]
    positives = index.item_ids[:3]
    shapes = {
        s.name: s.sample(positives, np.random.default_rng(0), 2, 3, 4).simple_ids.shape
        for s in samplers
    }
    assert set(shapes.values()) == {(3, 2, 3)}
    assert set(shapes) == {"uniform", "popularity", "mixed", "esans"}
