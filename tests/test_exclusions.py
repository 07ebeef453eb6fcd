"""Per-row exclusions for every sampler: no excluded id is ever returned, and log q is the
exact probability of what was drawn, renormalised over what remains (chi-square against the
served q, as the other log-q tests do)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import numpy.typing as npt
import pytest
from conftest import build_random_artifact

from esans_sampler.artifact import CodebookArtifact, artifact_to_files
from esans_sampler.baselines import MixedSampler, PopularitySampler, UniformSampler
from esans_sampler.client import HttpSamplerClient, SamplerClient
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.contract._proto.esans.v1 import sampler_pb2, sampler_pb2_grpc
from esans_sampler.errors import InvalidInputError
from esans_sampler.exclusions import Exclusions, to_csr
from esans_sampler.sampler import EsansSampler, NegativeSample
from esans_service.app import ServiceRuntime
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import local_settings
from esans_service.store import CodebookStore

# 4 clusters; cluster 0 has fine cells of 3 (s = 0), 7 (s = 1) and 0 (s = 2) items.
PRIMARY = [0] * 10 + [1] * 4 + [2] * 6 + [3] * 5
SECONDARY = [0] * 3 + [1] * 7 + [0, 1, 1, 2] + [2] * 6 + [0, 0, 1, 1, 2]
CODEWORDS = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.1]])
INDEX = ClusterIndex.build(np.arange(25, dtype=np.int64) + 1000, PRIMARY, SECONDARY, 4, 3)
IDS = INDEX.item_ids


def _exclusions(batch: int, per_row: list[int]) -> Exclusions:
    """The same excluded ids for every row of the batch."""
    flat = np.tile(np.array(per_row, dtype=np.int64), batch)
    offsets = np.arange(batch + 1, dtype=np.int64) * len(per_row)
    return Exclusions.build(INDEX, batch, flat, offsets)


def _chi_square(counts: npt.NDArray[np.int64], probs: npt.NDArray[np.float64]) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert np.all(counts[~keep] == 0)
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _served_q(rows: npt.NDArray[np.int64], log_q: npt.NDArray[np.float32]) -> dict[int, float]:
    """The one q served for each catalogue row (it must not vary between slots)."""
    served: dict[int, float] = {}
    for row, value in zip(rows.ravel().tolist(), np.exp(log_q.ravel()).tolist(), strict=True):
        assert np.isclose(served.setdefault(row, value), value, rtol=1e-5), row
    return served


def _check_simple(sample: NegativeSample, excluded_rows: set[int], dof_bound: float) -> None:
    rows = sample.simple_rows
    assert not excluded_rows & set(rows.ravel().tolist())
    served = _served_q(rows, sample.simple_log_q)
    probs = np.zeros(INDEX.num_items)
    for row, q in served.items():
        probs[row] = q
    # q of a slot sums to 1 over the items it can hold (those never drawn have small q).
    assert probs.sum() == pytest.approx(1.0, abs=0.02)
    counts = np.bincount(rows.ravel(), minlength=INDEX.num_items)
    assert _chi_square(counts, probs / probs.sum()) < dof_bound


EXCLUDED = [1000 + 10, 1000 + 14, 1000 + 15, 1000 + 21]  # cluster 1 (one), 2 (two), 3 (one)
EXCLUDED_ROWS = set(INDEX.rows_of(np.array(EXCLUDED)).tolist())


def test_esans_simple_negatives_avoid_exclusions_with_exact_q() -> None:
    sampler = EsansSampler(INDEX, CODEWORDS, gamma=2.0)
    positive = IDS[INDEX.ordered_rows[0]]  # cluster 0
    batch = 6000
    sample = sampler.sample(
        np.full(batch, positive), np.random.default_rng(1), m_c=2, m_o=3, m_h=0,
        exclude=_exclusions(batch, EXCLUDED),
    )  # fmt: skip
    # 15 candidate items minus 4 excluded = 11 cells: 10 dof, 0.9999 quantile 35.6.
    _check_simple(sample, EXCLUDED_ROWS, 35.6)


def test_an_emptied_cluster_is_never_drawn_and_the_others_take_its_mass() -> None:
    sampler = EsansSampler(INDEX, CODEWORDS, gamma=1.0)
    positive = IDS[INDEX.ordered_rows[0]]
    cluster_1 = IDS[INDEX.ordered_rows[10:14]].tolist()  # all of cluster 1
    batch = 4000
    sample = sampler.sample(
        np.full(batch, positive), np.random.default_rng(2), m_c=2, m_o=2, m_h=0,
        exclude=_exclusions(batch, cluster_1),
    )  # fmt: skip
    assert not (sample.simple_clusters == 1).any()
    _check_simple(sample, set(INDEX.rows_of(np.array(cluster_1)).tolist()), 35.0)


def test_a_sharp_choice_on_an_emptied_cluster_still_draws_from_the_rest() -> None:
    # gamma 5 puts 99.97% of P(. | 0) on cluster 1; with cluster 1 emptied, rejection
    # alone would rarely find another cluster: the exact fallback must.
    sampler = EsansSampler(INDEX, CODEWORDS, gamma=5.0)
    assert sampler.cluster_choice()[0, 1] > 0.99
    positive = IDS[INDEX.ordered_rows[0]]
    cluster_1 = IDS[INDEX.ordered_rows[10:14]].tolist()
    for seed in range(20):
        sample = sampler.sample(
            np.full(8, positive), np.random.default_rng(seed), m_c=2, m_o=2, m_h=0,
            exclude=_exclusions(8, cluster_1),
        )  # fmt: skip
        assert not (sample.simple_clusters == 1).any()
        assert np.isfinite(sample.simple_log_q).all()


def test_esans_hard_negatives_avoid_exclusions_and_q_is_one_over_what_remains() -> None:
    sampler = EsansSampler(INDEX, CODEWORDS)
    positive = IDS[INDEX.ordered_rows[0]]  # cell (0, 0): 7 hard candidates in cell (0, 1)
    candidates = INDEX.ordered_rows[3:10]
    excluded = IDS[candidates[:3]].tolist()
    batch = 5000
    sample = sampler.sample(
        np.full(batch, positive), np.random.default_rng(3), m_c=1, m_o=1, m_h=2,
        exclude=_exclusions(batch, excluded),
    )  # fmt: skip
    allowed = candidates[3:]
    assert set(sample.hard_rows.ravel().tolist()) <= set(allowed.tolist())
    assert (sample.hard_counts == 2).all()
    np.testing.assert_allclose(np.exp(sample.hard_log_q), 1 / 4, rtol=1e-6)
    for slot in range(2):  # each slot uniform over the 4 remaining: 3 dof, 0.9999 q. 21.1
        counts = np.array([(sample.hard_rows[:, slot] == r).sum() for r in allowed])
        assert _chi_square(counts, np.full(4, 0.25)) < 21.1
    assert (sample.hard_rows[:, 0] != sample.hard_rows[:, 1]).all()


def test_hard_negatives_shrink_when_exclusions_leave_fewer_than_m_h() -> None:
    sampler = EsansSampler(INDEX, CODEWORDS)
    positive = IDS[INDEX.ordered_rows[0]]
    candidates = INDEX.ordered_rows[3:10]
    excluded = IDS[candidates[:5]].tolist()
    sample = sampler.sample(
        np.full(50, positive), np.random.default_rng(4), m_c=1, m_o=1, m_h=4,
        exclude=_exclusions(50, excluded),
    )  # fmt: skip
    assert (sample.hard_counts == 2).all()
    assert (sample.hard_ids[:, 2:] == -1).all() and np.isneginf(sample.hard_log_q[:, 2:]).all()
    np.testing.assert_allclose(np.exp(sample.hard_log_q[:, :2]), 1 / 2, rtol=1e-6)
    # the secondary codes follow the redrawn items, and the padding
    assert np.array_equal(sample.hard_secondary[:, :2], INDEX.secondary[sample.hard_rows[:, :2]])
    assert (sample.hard_secondary[:, 2:] == -1).all()
    assert np.array_equal(sample.simple_secondary, INDEX.secondary[sample.simple_rows])


@pytest.mark.parametrize(
    "make",
    [
        lambda: UniformSampler(INDEX),
        lambda: PopularitySampler(INDEX, np.arange(25) % 7, alpha=0.75),
    ],
    ids=["uniform", "popularity"],
)
def test_baselines_avoid_exclusions_with_exact_q(make: object) -> None:
    sampler = make()  # type: ignore[operator]
    positive = IDS[3]
    batch = 4000
    excluded = [*EXCLUDED, int(positive)]  # the positive itself may be listed too
    sample = sampler.sample(
        np.full(batch, positive), np.random.default_rng(5), m_c=2, m_o=2,
        exclude=_exclusions(batch, excluded),
    )  # fmt: skip
    # 25 - 1 positive - 4 excluded = 20 cells: 19 dof, 0.9999 quantile 49.
    _check_simple(sample, EXCLUDED_ROWS | {3}, 49.0)


def test_mixed_sampler_avoids_exclusions_in_batch_and_uniform_slots() -> None:
    sampler = MixedSampler(INDEX, in_batch_fraction=0.5)
    rng = np.random.default_rng(6)
    batch = 3000
    positives = rng.choice(IDS, batch)
    excluded = [*EXCLUDED, int(IDS[0]), int(IDS[1])]
    sample = sampler.sample(positives, rng, m_c=2, m_o=2, exclude=_exclusions(batch, excluded))
    excluded_rows = set(INDEX.rows_of(np.array(excluded)).tolist())
    assert not excluded_rows & set(sample.simple_rows.ravel().tolist())
    assert (sample.simple_rows != sample.positive_rows[:, None, None]).all()
    # In-batch slots: q = c_x / (B - c_pos - c(E)); their q sums to 1 over the allowed ids.
    in_batch = sample.simple_rows.reshape(batch, -1)[:, :2]
    log_q = sample.simple_log_q.reshape(batch, -1)[:, :2]
    batch_rows, batch_counts = np.unique(sample.positive_rows, return_counts=True)
    count_of = dict(zip(batch_rows.tolist(), batch_counts.tolist(), strict=True))
    for b in range(0, batch, 97):
        own = count_of[int(sample.positive_rows[b])]
        gone = sum(count_of.get(r, 0) for r in excluded_rows if r != sample.positive_rows[b])
        for slot in range(2):
            expected = count_of[int(in_batch[b, slot])] / (batch - own - gone)
            assert np.exp(log_q[b, slot]) == pytest.approx(expected, rel=1e-5)


def test_mixed_sampler_with_repeated_positives_and_exclusions_past_the_batch() -> None:
    # Repeated positives make the batch's distinct ids fewer than B; an excluded id above
    # all of them must not index past them.
    sampler = MixedSampler(INDEX, in_batch_fraction=0.5)
    ids = np.array([1000, 1000, 1001])
    exclude = Exclusions.build(INDEX, 3, [1024], [0, 1, 1, 1])
    sample = sampler.sample(ids, np.random.default_rng(0), m_c=2, m_o=2, exclude=exclude)
    assert 1024 not in sample.simple_ids[0]


def test_exclusions_are_checked() -> None:
    with pytest.raises(InvalidInputError, match="B \\+ 1 = 3 entries"):
        Exclusions.build(INDEX, 2, [1000], [0, 1])
    with pytest.raises(InvalidInputError, match="never decrease"):
        Exclusions.build(INDEX, 2, [1000, 1001], [0, 2, 1])
    with pytest.raises(InvalidInputError, match="end at len"):
        Exclusions.build(INDEX, 2, [1000, 1001], [0, 1, 1])
    with pytest.raises(InvalidInputError, match="1 exclude_ids are not in the codebook: 5"):
        Exclusions.build(INDEX, 1, [5], [0, 1])
    with pytest.raises(InvalidInputError, match="integers"):
        Exclusions.build(INDEX, 1, [1000.5], [0, 1])
    everything = IDS.tolist()
    with pytest.raises(InvalidInputError, match="leave nothing"):
        UniformSampler(INDEX).sample(
            IDS[:1], np.random.default_rng(0), exclude=_exclusions(1, everything)
        )
    with pytest.raises(InvalidInputError, match="empty every cluster"):
        EsansSampler(INDEX, CODEWORDS).sample(
            IDS[INDEX.ordered_rows[:1]], np.random.default_rng(0),
            exclude=_exclusions(1, IDS[INDEX.ordered_rows[10:]].tolist()),
        )  # fmt: skip


def test_client_side_csr_keeps_large_ids_of_mixed_dtypes() -> None:
    ids, offsets = to_csr([np.array([2**62 + 1], np.uint64), np.array([5], np.int64), []])
    assert ids.tolist() == [2**62 + 1, 5] and offsets.tolist() == [0, 1, 2, 2]
    with pytest.raises(InvalidInputError, match="fit in int64"):
        to_csr([np.array([2**64 - 1], np.uint64)])
    with pytest.raises(InvalidInputError, match="integer ids"):
        to_csr([[1.5]])


def test_no_exclusions_change_nothing() -> None:
    sampler = EsansSampler(INDEX, CODEWORDS)
    ids = IDS[[0, 5, 12, 20]]
    plain = sampler.sample(ids, np.random.default_rng(9), m_h=3)
    empty = Exclusions.build(INDEX, 4, np.zeros(0, np.int64), np.zeros(5, np.int64))
    with_empty = sampler.sample(ids, np.random.default_rng(9), m_h=3, exclude=empty)
    np.testing.assert_array_equal(plain.simple_ids, with_empty.simple_ids)
    np.testing.assert_array_equal(plain.hard_ids, with_empty.hard_ids)
    np.testing.assert_array_equal(plain.simple_log_q, with_empty.simple_log_q)


# ----------------------------------------------------------------------------- service


@pytest.fixture(scope="module")
def served(redis_server: EmbeddedRedis) -> Iterator[tuple[ServiceRuntime, CodebookArtifact]]:
    artifact = build_random_artifact(seed=31, num_items=400, dim=4)
    with redis_server.client() as client:
        CodebookStore(client, namespace="exclusions").publish(artifact_to_files(artifact))
    runtime = ServiceRuntime(
        local_settings(redis_server.url, "exclusions", max_excluded_ids=1000)
    ).start()
    try:
        yield runtime, artifact
    finally:
        runtime.stop(grace=0)


def test_exclusions_hold_on_both_transports(
    served: tuple[ServiceRuntime, CodebookArtifact],
) -> None:
    runtime, artifact = served
    ids = artifact.index.item_ids
    rng = np.random.default_rng(0)
    positives = rng.choice(ids, 16)
    exclude = [rng.choice(ids, 40, replace=False) for _ in positives]
    replies = []
    with SamplerClient(f"127.0.0.1:{runtime.grpc_port}") as client:
        replies.append(client.sample(positives, exclude=exclude, seed=4, m_h=5))
    with HttpSamplerClient(f"http://127.0.0.1:{runtime.http_port}") as client:
        replies.append(client.sample(positives, exclude=exclude, seed=4, m_h=5))
    for reply in replies:
        for b, banned in enumerate(exclude):
            returned = set(reply.simple_ids[b].ravel().tolist())
            returned |= set(reply.hard_ids[b][reply.hard_valid[b]].tolist())
            assert not returned & set(banned.tolist()), b
    np.testing.assert_array_equal(replies[0].simple_ids, replies[1].simple_ids)
    np.testing.assert_array_equal(replies[0].simple_log_q, replies[1].simple_log_q)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"exclude_ids": [1], "exclude_offsets": [0, 1]}, "B \\+ 1 = 3 entries"),
        ({"exclude_ids": [1, 2], "exclude_offsets": [0, 2, 1]}, "never decrease"),
        ({"exclude_ids": [5], "exclude_offsets": [0, 1, 1]}, "not in the codebook: 5"),
        ({"exclude_ids": list(range(1001)), "exclude_offsets": [0, 1001, 1001]}, "at most 1000"),
        ({"exclude_ids": [1.5], "exclude_offsets": [0, 1, 1]}, "exclude_ids"),
    ],
)
def test_bad_exclusions_are_refused_on_both_transports(
    served: tuple[ServiceRuntime, CodebookArtifact], body: dict[str, object], message: str
) -> None:
    runtime, artifact = served
    positives = artifact.index.item_ids[:2].tolist()
    reply = httpx.post(
        f"http://127.0.0.1:{runtime.http_port}/v1/sample",
        json={"positive_ids": positives, **body},
    )
    assert reply.status_code == 422, reply.text
    if "1.5" not in str(body):
        assert re.search(message, reply.json()["error"]["message"]), reply.text
        stub_request = sampler_pb2.SampleNegativesRequest(positive_ids=positives, **body)
        with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            stub = sampler_pb2_grpc.NegativeSamplerStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as caught:
                stub.SampleNegatives(stub_request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, caught.value.details())
    with (
        SamplerClient(f"127.0.0.1:{runtime.grpc_port}") as client,
        pytest.raises(InvalidInputError, match="one list of ids per positive"),
    ):
        client.sample(positives, exclude=[[1]])
