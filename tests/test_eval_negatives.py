"""The evaluation's step loss (esans_eval.negatives): protocols, masks and log q."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esans_eval.negatives import Context, Method, step_loss
from esans_sampler.client import SampleResponse
from esans_sampler.loss import info_nce_loss
from esans_sampler.trainer import esans_loss, esans_negatives

NUM_ITEMS, B, M_C, M_O, M_H, D = 40, 4, 2, 3, 2, 8


def _response(rng: np.random.Generator, positives: np.ndarray) -> SampleResponse:
    simple = np.stack([rng.choice(np.setdiff1d(np.arange(20), [p]), (M_C, M_O)) for p in positives])
    hard = rng.integers(20, 30, (B, M_H))  # never a positive (30..33)
    counts = np.array([2, 1, 0, 2], dtype=np.int32)
    hard = np.where(np.arange(M_H)[None, :] < counts[:, None], hard, -1)
    return SampleResponse(
        codebook_version="v", sampler="esans",
        positive_primary=np.zeros(B, np.int32), positive_secondary=np.zeros(B, np.int32),
        simple_ids=simple.astype(np.int64), simple_clusters=np.zeros((B, M_C), np.int32),
        simple_log_q=np.log(rng.uniform(0.01, 0.2, (B, M_C, M_O))).astype(np.float32),
        hard_ids=hard.astype(np.int64), hard_counts=counts,
        hard_log_q=np.where(hard >= 0, np.float32(-2.0), -np.inf).astype(np.float32),
    )  # fmt: skip


def _context(fine: np.ndarray | None, train: list[list[int]]) -> Context:
    ptr = np.concatenate([[0], np.cumsum([len(t) for t in train])]).astype(np.int64)
    items = np.concatenate([sorted(t) for t in train]).astype(np.int64)
    return Context(
        num_items=NUM_ITEMS, fine=fine, log_frequency=np.full(NUM_ITEMS, -math.log(NUM_ITEMS)),
        train_ptr=ptr, train_items=items, temperature=0.1, eta=0.6, hard_lambda=0.1,
    )  # fmt: skip


def _inputs(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, SampleResponse, torch.Tensor]:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    table = F.normalize(torch.randn(NUM_ITEMS, D, dtype=torch.float64, generator=gen), dim=-1)
    positives = np.array([30, 31, 32, 33])
    user = F.normalize(torch.randn(B, D, dtype=torch.float64, generator=gen), dim=-1)
    return table, positives, _response(rng, positives), user


def _step(method: Method, ctx: Context, seed: int = 0) -> tuple[torch.Tensor, object]:
    table, positives, response, user = _inputs(seed)
    sampled = np.concatenate([response.simple_ids.ravel(), response.hard_ids[response.hard_valid]])
    rows = {"positives": torch.as_tensor(positives), "sampled:0": torch.as_tensor(sampled)}
    users = np.arange(B)
    return step_loss(table, rows, user, method, positives, users, [response], ctx)


def test_per_positive_protocol_is_the_trainer_helpers_loss() -> None:
    """Per positive, a row sees exactly its own draws and their EDIS twins: the loss equals
    esans_loss, the trainer helper users call, on the same response."""
    table, positives, response, user = _inputs()
    fine = np.arange(NUM_ITEMS)  # every item its own cell: the fine-cell mask removes nothing
    method = Method("ESANS", "esans", m_h=M_H, use_edis=True, shared=False)
    got, _ = _step(method, _context(fine, [[]] * B))
    want = esans_loss(
        user, table[positives], response, embed_items=lambda ids: table[ids],
        temperature=0.1, eta=0.6, hard_lambda=0.1, use_edis=True,
    )  # fmt: skip
    torch.testing.assert_close(got, want)
    # With log q: each draw's logit loses log q + log(n), n the mean draws a row sees.
    got, _ = _step(replace(method, log_q=True), _context(fine, [[]] * B))
    negatives = esans_negatives(response, table[positives], lambda ids: table[ids], 0.6, 0.1)
    draws = (response.simple_ids[0].size * B + response.hard_counts.sum()) / B
    drawn = negatives.log_q != 0  # virtual negatives carry log q 0
    want = info_nce_loss(
        user, table[positives], negatives.embeddings, temperature=0.1,
        negative_log_q=torch.where(drawn, negatives.log_q + math.log(draws), 0.0),
        negative_mask=negatives.mask,
    )  # fmt: skip
    torch.testing.assert_close(got, want)


def test_shared_protocol_scores_every_row_against_the_whole_pool() -> None:
    table, positives, response, user = _inputs()
    method = Method("UNS", "uniform")
    got, stats = _step(method, _context(None, [[]] * B))
    pool = np.concatenate([response.simple_ids.ravel(), response.hard_ids[response.hard_valid]])
    want = info_nce_loss(user, table[positives], table[pool], temperature=0.1)
    torch.testing.assert_close(got, want)
    assert stats.visible == B * len(pool) and stats.user_items == 0  # type: ignore[attr-defined]


def test_masks_drop_own_positive_fine_cell_and_users_items() -> None:
    _, positives, response, _ = _inputs()
    pool = np.concatenate([response.simple_ids.ravel(), response.hard_ids[response.hard_valid]])
    # Row 0's user owns the first two pooled items; fine cells put item pool[2] with row 1.
    train = [[int(pool[0]), int(pool[1])], [], [], []]
    fine = np.arange(NUM_ITEMS) + 100
    fine[pool[2]] = fine[positives[1]]
    esans = Method("ESANS", "esans", m_h=M_H)
    _, plain = _step(esans, _context(fine, train))
    masked_loss, masked = _step(replace(esans, mask_history=True), _context(fine, train))
    owned = int(np.isin(pool, pool[:2]).sum())
    cell = int((pool == pool[2]).sum())
    assert plain.visible == B * len(pool) - cell  # type: ignore[attr-defined]
    assert plain.user_items == owned  # type: ignore[attr-defined]
    assert masked.user_items == 0  # type: ignore[attr-defined]
    assert masked.visible == plain.visible - owned  # type: ignore[attr-defined]
    assert torch.isfinite(masked_loss)


def test_batch_softmax_log_q_corrects_every_logit() -> None:
    """In-batch + log q (TFRS): logit - log(B p_j) for every candidate, the positive too."""
    table, positives, _, user = _inputs()
    ctx = _context(None, [[]] * B)
    rows = {"positives": torch.as_tensor(positives)}
    method = Method("in-batch", None, in_batch=True, log_q=True)
    got, _ = step_loss(table, rows, user, method, positives, np.arange(B), [], ctx)
    logits = user @ table[positives].T / 0.1 - math.log(B / NUM_ITEMS)
    want = torch.nn.functional.cross_entropy(logits, torch.arange(B))
    torch.testing.assert_close(got, want)


def test_esans_draws_with_the_batch_weigh_two_normaliser_estimates() -> None:
    """ESANS + in-batch + log q: batch columns and the positive lose log(B p / w), drawn
    columns log(n q / (1 - w)), w = B / (B + n) the batch's share of the candidates."""
    table, positives, response, user = _inputs()
    method = Method("ESANS + batch", "esans", m_h=M_H, in_batch=True, log_q=True)
    got, _ = _step(method, _context(np.arange(NUM_ITEMS) + 100, [[]] * B))
    drawn = np.concatenate([response.simple_ids.ravel(), response.hard_ids[response.hard_valid]])
    drawn_log_q = np.concatenate(
        [response.simple_log_q.ravel(), response.hard_log_q[response.hard_valid]]
    ).astype(np.float64)
    n = len(drawn)
    w = B / (B + n)
    log_p = -math.log(NUM_ITEMS)
    batch_adj = math.log(B) + log_p - math.log(w)
    negatives = torch.cat([table[drawn], table[positives]])
    log_q = np.concatenate([drawn_log_q + math.log(n / (1 - w)), np.full(B, batch_adj)])
    mask = np.concatenate([drawn, positives])[None, :] == positives[:, None]
    want = info_nce_loss(
        user, table[positives], negatives, temperature=0.1,
        negative_log_q=torch.as_tensor(log_q), negative_mask=torch.as_tensor(mask),
        positive_log_q=torch.full((B,), batch_adj, dtype=torch.float64),
    )  # fmt: skip
    torch.testing.assert_close(got, want)


def test_methods_reject_impossible_combinations() -> None:
    with pytest.raises(ValueError, match="needs draws or in-batch"):
        Method("nothing", None)
    with pytest.raises(ValueError, match="PNS draws is not defined"):
        Method("mix", "popularity", in_batch=True, log_q=True)


def test_hard_negatives_ride_along_a_batch_softmax_uncorrected() -> None:
    table, positives, response, user = _inputs()
    method = Method(
        "batch + hard", "esans", m_h=M_H, in_batch=True, log_q=True,
        simple_negatives=False, correct_drawn=False,
    )  # fmt: skip
    got, stats = _step(method, _context(np.arange(NUM_ITEMS) + 100, [[]] * B))
    hard = response.hard_ids[response.hard_valid]
    adj = math.log(B) - math.log(NUM_ITEMS)  # log(B p) with p uniform in the context
    negatives = torch.cat([table[hard], table[positives]])
    log_q = np.concatenate([np.zeros(len(hard)), np.full(B, adj)])
    mask = np.concatenate([hard, positives])[None, :] == positives[:, None]
    want = info_nce_loss(
        user, table[positives], negatives, temperature=0.1,
        negative_log_q=torch.as_tensor(log_q), negative_mask=torch.as_tensor(mask),
        positive_log_q=torch.full((B,), adj, dtype=torch.float64),
    )  # fmt: skip
    torch.testing.assert_close(got, want)
    assert set(stats.negative_ids.tolist()) == set(hard.tolist()) | set(positives.tolist())  # type: ignore[attr-defined]


@pytest.mark.parametrize("mask_history", [False, True])
@pytest.mark.parametrize("in_batch", [False, True])
def test_per_positive_row_sees_its_own_draws_and_the_batch(
    mask_history: bool, in_batch: bool
) -> None:
    """Per positive: row b scores its own draws (and, with in-batch columns, every positive
    of the batch), with its own positive, its fine cell (draws only) and, with
    ``mask_history``, its user's items masked; other rows' draws never reach it, in the loss
    or the counts. (Without in-batch columns each row gathers its own; with them, the pool
    is masked.)"""
    table, positives, response, user = _inputs(3)
    rng = np.random.default_rng(3)
    fine = rng.integers(0, 4, NUM_ITEMS)
    train = [rng.choice(34, 5, replace=False).tolist() for _ in range(B)]
    method = Method(
        "own + batch",
        "esans",
        m_h=M_H,
        in_batch=in_batch,
        mask_history=mask_history,
        shared=False,
    )
    got, stats = _step(method, _context(fine, train), seed=3)
    losses, visible, user_items = [], 0, 0
    for b in range(B):
        drawn = np.concatenate(
            [response.simple_ids[b].ravel(), response.hard_ids[b][response.hard_valid[b]]]
        )
        columns = np.concatenate([drawn, positives]) if in_batch else drawn
        masked = columns == positives[b]
        masked[: len(drawn)] |= fine[drawn] == fine[positives[b]]
        owned = np.isin(columns, train[b])
        if mask_history:
            masked |= owned
        visible += int((~masked).sum())
        user_items += int((~masked & owned).sum())
        logits = user[b] @ table[columns[~masked]].T / 0.1
        positive = user[b] @ table[positives[b]] / 0.1
        losses.append(torch.logsumexp(torch.cat([positive[None], logits]), 0) - positive)
    torch.testing.assert_close(got, torch.stack(losses).mean())
    assert (stats.visible, stats.user_items) == (visible, user_items)  # type: ignore[attr-defined]
    assert user_items > 0 or mask_history
    _, with_edis = _step(replace(method, use_edis=True), _context(fine, train), seed=3)
    assert with_edis.visible == visible  # type: ignore[attr-defined]  # virtual: not counted


def test_per_positive_with_the_batch_keeps_other_rows_virtual_negatives_out() -> None:
    """Per positive with in-batch columns and EDIS: row b's pool is its own draws, their EDIS
    twins (esans_negatives' row b) and the batch's positives (its own masked)."""
    table, positives, response, user = _inputs(5)
    method = Method("own + batch", "esans", m_h=M_H, use_edis=True, in_batch=True, shared=False)
    got, _ = _step(method, _context(np.arange(NUM_ITEMS), [[]] * B), seed=5)
    own = esans_negatives(response, table[positives], lambda ids: table[ids], 0.6, 0.1)
    losses = []
    for b in range(B):
        columns = torch.cat([own.embeddings[b][~own.mask[b]], table[np.delete(positives, b)]])
        logits = user[b] @ columns.T / 0.1
        positive = user[b] @ table[positives[b]] / 0.1
        losses.append(torch.logsumexp(torch.cat([positive[None], logits]), 0) - positive)
    torch.testing.assert_close(got, torch.stack(losses).mean())


def test_no_hard_negative_found_for_any_row_leaves_the_batch_softmax() -> None:
    """ESANS hard negatives only, with the batch and log q, when the service found none for
    any row: nothing drawn to correct, the loss is the batch softmax's."""
    table, positives, response, user = _inputs()
    empty = replace(
        response, hard_ids=np.full_like(response.hard_ids, -1),
        hard_counts=np.zeros_like(response.hard_counts),
        hard_log_q=np.full_like(response.hard_log_q, -np.inf),
    )  # fmt: skip
    method = Method(
        "hard + batch", "esans", m_h=M_H, in_batch=True, log_q=True, simple_negatives=False
    )
    rows = {"positives": torch.as_tensor(positives), "sampled:0": torch.as_tensor(
        empty.simple_ids.ravel()
    )}  # fmt: skip
    ctx = _context(np.arange(NUM_ITEMS) + 100, [[]] * B)
    got, _ = step_loss(table, rows, user, method, positives, np.arange(B), [empty], ctx)
    logits = user @ table[positives].T / 0.1  # every column corrected alike: it cancels
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, torch.arange(B)))
