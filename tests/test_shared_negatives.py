"""The batch-shared trainer losses (paper protocol and product default), checked against the
evaluation's step loss, which masks fine cells from the codebook itself: the helpers only
have what the response carried over the wire."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import build_random_artifact

from esans_eval.methods import DEFAULT_LEVERS, ESANS_PAPER, METHODS
from esans_eval.negatives import Context, Method, step_loss
from esans_sampler.artifact import CodebookArtifact, artifact_to_files
from esans_sampler.baselines import UniformSampler
from esans_sampler.client import HttpSamplerClient, SamplerClient, SampleResponse
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.contract.messages import response_from_bytes, response_to_bytes
from esans_sampler.errors import EsansError, InvalidInputError
from esans_sampler.exclusions import to_csr
from esans_sampler.sampler import EsansSampler
from esans_sampler.shared_negatives import batch_softmax_loss, fine_cells, shared_esans_loss
from esans_service.app import ServiceRuntime
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import local_settings
from esans_service.store import CodebookStore

N, K_P, K_S, D, B = 80, 4, 3, 8, 12
TAU, ETA, LAMBDA = 0.1, 0.6, 0.2
DEFAULT = next(m for m in METHODS if m.role == "default")


def _index(seed: int = 0) -> ClusterIndex:
    rng = np.random.default_rng(seed)
    primary = rng.integers(0, K_P, N)
    primary[:K_P] = np.arange(K_P)
    return ClusterIndex.build(
        np.arange(N, dtype=np.int64), primary, rng.integers(0, K_S, N), K_P, K_S
    )


INDEX = _index()
FINE_BY_ID = np.empty(N, dtype=np.int64)
FINE_BY_ID[INDEX.item_ids] = INDEX.primary.astype(np.int64) * K_S + INDEX.secondary


def _draw(seed: int = 1) -> tuple[np.ndarray, SampleResponse, list[np.ndarray]]:
    """Positives (with repeats), their ESANS response through the binary wire codec, and
    per-row excluded items (the users' training items)."""
    rng = np.random.default_rng(seed)
    positives = rng.choice(N, B)
    positives[1] = positives[0]  # a repeated positive: an accidental hit in the batch
    sample = EsansSampler(INDEX, rng.normal(size=(K_P, 3))).sample(
        positives, rng, m_c=2, m_o=3, m_h=4
    )
    response = response_from_bytes(response_to_bytes("v" * 16, "esans", sample, None))
    history = [np.setdiff1d(rng.choice(N, 10, replace=False), [p]) for p in positives]
    return positives, response, history


def _oracle(
    method: Method,
    table: torch.Tensor,
    user: torch.Tensor,
    positives: np.ndarray,
    response: SampleResponse,
    history: list[np.ndarray],
    log_frequency: np.ndarray,
) -> torch.Tensor:
    ptr = np.concatenate([[0], np.cumsum([len(h) for h in history])]).astype(np.int64)
    ctx = Context(
        num_items=N,
        fine=FINE_BY_ID,
        log_frequency=log_frequency,
        train_ptr=ptr,
        train_items=np.concatenate([np.sort(h) for h in history]).astype(np.int64),
        temperature=TAU,
        eta=ETA,
        hard_lambda=LAMBDA,
    )
    sampled = np.concatenate([response.simple_ids.ravel(), response.hard_ids[response.hard_valid]])
    rows = {"positives": torch.as_tensor(positives), "sampled:0": torch.as_tensor(sampled)}
    loss, _ = step_loss(table, rows, user, method, positives, np.arange(B), [response], ctx)
    return loss


def _grads(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("use_edis", [True, False])
def test_paper_protocol_equals_the_evaluations_shared_esans(use_edis: bool) -> None:
    positives, response, history = _draw()
    torch.manual_seed(0)
    table = (0.4 * torch.randn(N, D)).requires_grad_()
    user = (0.4 * torch.randn(B, D)).requires_grad_()
    method = replace(ESANS_PAPER, use_edis=use_edis)
    want = _oracle(method, table, user, positives, response, history, np.zeros(N))
    got = shared_esans_loss(
        user, table[torch.as_tensor(positives)], positives, response, lambda ids: table[ids],
        temperature=TAU, eta=ETA, hard_lambda=LAMBDA, use_edis=use_edis,
    )  # fmt: skip
    torch.testing.assert_close(got, want)
    for g, w in zip(_grads(got, table, user), _grads(want, table, user), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    ("lever", "share_hard"),
    [
        ("in-batch softmax + ESANS hard negatives", True),
        ("in-batch softmax + each row's own ESANS hard negatives", False),
    ],
)
def test_product_default_equals_the_evaluations_default(lever: str, share_hard: bool) -> None:
    positives, response, history = _draw(seed=2)
    torch.manual_seed(1)
    table = (0.4 * torch.randn(N, D)).requires_grad_()
    user = (0.4 * torch.randn(B, D)).requires_grad_()
    counts = np.random.default_rng(3).integers(1, 50, N).astype(np.float64)
    log_frequency = np.log(counts / counts.sum())
    method = replace(DEFAULT, **dict(DEFAULT_LEVERS)[lever])
    assert method.mask_history and method.in_batch and method.shared == share_hard
    want = _oracle(method, table, user, positives, response, history, log_frequency)
    got = batch_softmax_loss(
        user, table[torch.as_tensor(positives)], positives, response, lambda ids: table[ids],
        positive_log_frequency=log_frequency[positives], temperature=TAU, hard_lambda=LAMBDA,
        share_hard=share_hard, exclude=to_csr(history),
    )  # fmt: skip
    torch.testing.assert_close(got, want)
    for g, w in zip(_grads(got, table, user), _grads(want, table, user), strict=True):
        torch.testing.assert_close(g, w)


def test_masks_follow_the_fine_cells_on_the_wire() -> None:
    """Row 3 stops seeing a negative drawn for row 0 once the wire puts it in row 3's cell."""
    positives, response, _ = _draw(seed=4)
    table = 0.4 * torch.randn(N, D, generator=torch.Generator().manual_seed(2))
    user = 0.4 * torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    user[3] = 3 * table[int(response.simple_ids[0, 0, 0])]  # a negative row 3 scores high

    def loss(r: SampleResponse) -> float:
        return shared_esans_loss(
            user, table[torch.as_tensor(positives)], positives, r, lambda ids: table[ids],
            use_edis=False,
        ).item()  # fmt: skip

    cells = fine_cells(response)
    assert not (cells.simple == cells.positive[:, None, None]).any()  # other clusters only
    clusters, secondary = response.simple_clusters.copy(), response.simple_secondary.copy()
    clusters[0, 0] = response.positive_primary[3]
    secondary[0, 0, 0] = response.positive_secondary[3]
    moved = replace(response, simple_clusters=clusters, simple_secondary=secondary)
    assert loss(moved) < loss(response) - 0.01


def test_bad_inputs_get_clear_errors() -> None:
    positives, response, _ = _draw()
    table = torch.randn(N, D)
    pos = table[torch.as_tensor(positives)]

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    old_server = replace(response, simple_secondary=None, hard_secondary=None)
    with pytest.raises(EsansError, match="predates simple_secondary"):
        shared_esans_loss(pos, pos, positives, old_server, embed)
    uniform = UniformSampler(INDEX).sample(positives, np.random.default_rng(0), m_h=0)
    baseline = response_from_bytes(response_to_bytes("v" * 16, "uniform", uniform, None))
    with pytest.raises(InvalidInputError, match="only ESANS draws have fine cells"):
        shared_esans_loss(pos, pos, positives, baseline, embed)
    with pytest.raises(InvalidInputError, match="must have the response's 12 rows"):
        shared_esans_loss(pos, pos, positives[:5], response, embed)
    with pytest.raises(InvalidInputError, match="positive_log_frequency"):
        batch_softmax_loss(pos, pos, positives, response, embed, np.zeros(3))
    with pytest.raises(InvalidInputError, match="positive_log_frequency"):
        batch_softmax_loss(pos, pos, positives, response, embed, np.full(B, -np.inf))
    with pytest.raises(InvalidInputError, match=r"exclude_offsets must hold B \+ 1 = 13 entries"):
        batch_softmax_loss(pos, pos, positives, response, embed, np.zeros(B), exclude=([1], [0, 1]))


@pytest.fixture(scope="module")
def served(redis_server: EmbeddedRedis) -> Iterator[tuple[ServiceRuntime, CodebookArtifact]]:
    artifact = build_random_artifact(seed=41, num_items=300, dim=4)
    with redis_server.client() as client:
        CodebookStore(client, namespace="shared-negatives").publish(artifact_to_files(artifact))
    runtime = ServiceRuntime(local_settings(redis_server.url, "shared-negatives")).start()
    try:
        yield runtime, artifact
    finally:
        runtime.stop(grace=0)


def test_both_transports_carry_the_negatives_fine_cells(
    served: tuple[ServiceRuntime, CodebookArtifact],
) -> None:
    runtime, artifact = served
    index = artifact.index
    positives = np.random.default_rng(0).choice(index.item_ids, 32)
    with SamplerClient(f"127.0.0.1:{runtime.grpc_port}") as client:
        grpc_reply = client.sample(positives, seed=5, m_h=6)
    with HttpSamplerClient(f"http://127.0.0.1:{runtime.http_port}") as client:
        http_reply = client.sample(positives, seed=5, m_h=6)
    for reply in (grpc_reply, http_reply):
        assert reply.simple_secondary is not None and reply.hard_secondary is not None
        np.testing.assert_array_equal(
            reply.simple_secondary, index.secondary[index.rows_of(reply.simple_ids)]
        )
        valid = reply.hard_valid
        np.testing.assert_array_equal(
            reply.hard_secondary[valid], index.secondary[index.rows_of(reply.hard_ids[valid])]
        )
        assert (reply.hard_secondary[~valid] == -1).all()
        cells = fine_cells(reply)
        # hard negatives: the positive's cluster, never its fine cell
        assert (
            cells.hard[valid] != np.broadcast_to(cells.positive[:, None], valid.shape)[valid]
        ).all()
        assert (
            (cells.hard[valid] >> 32)
            == np.broadcast_to(reply.positive_primary[:, None], valid.shape)[valid]
        ).all()
    np.testing.assert_array_equal(grpc_reply.hard_secondary, http_reply.hard_secondary)
