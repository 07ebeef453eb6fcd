"""Trainer helpers on hand-made responses: padded hard slots never reach the item tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esans_sampler.client import SampleResponse
from esans_sampler.trainer import ItemEmbedder, esans_loss, esans_negatives

CATALOGUE = np.arange(1_000_000, 1_000_020, dtype=np.int64)


def _response(hard_counts: list[int]) -> SampleResponse:
    rng = np.random.default_rng(0)
    batch, m_c, m_o, m_h = len(hard_counts), 2, 5, 5
    counts = np.asarray(hard_counts, dtype=np.int32)
    valid = np.arange(m_h)[None, :] < counts[:, None]
    hard = rng.choice(CATALOGUE, size=(batch, m_h))
    return SampleResponse(
        codebook_version="v",
        sampler="esans",
        positive_primary=np.zeros(batch, dtype=np.int32),
        positive_secondary=np.zeros(batch, dtype=np.int32),
        simple_ids=rng.choice(CATALOGUE, size=(batch, m_c, m_o)),
        simple_clusters=np.ones((batch, m_c), dtype=np.int32),
        simple_log_q=np.full((batch, m_c, m_o), -3.0, dtype=np.float32),
        hard_ids=np.where(valid, hard, -1),
        hard_counts=counts,
        hard_log_q=np.where(valid, np.float32(-1.5), -np.inf).astype(np.float32),
    )


def _strict_tower() -> tuple[torch.nn.Embedding, ItemEmbedder]:
    table = torch.nn.Embedding(CATALOGUE.size, 4)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        rows = ids - int(CATALOGUE[0])  # the README's example tower: an offset into a table
        if bool(((rows < 0) | (rows >= CATALOGUE.size)).any()):
            raise IndexError(f"not a catalogue id: {ids[(rows < 0) | (rows >= CATALOGUE.size)]}")
        return table(rows)

    return table, embed


@pytest.mark.parametrize("use_edis", [True, False])
def test_padded_hard_slots_never_reach_the_item_tower(use_edis: bool) -> None:
    response = _response([5, 2, 0])  # full, partly padded, no hard negative at all
    table, embed = _strict_tower()
    positives = embed(torch.as_tensor(CATALOGUE[:3]))
    negatives = esans_negatives(response, positives, embed, use_edis=use_edis)
    hard = negatives.mask[:, 10:15]
    assert torch.equal(hard, ~torch.as_tensor(response.hard_valid))
    assert torch.isfinite(negatives.log_q).all()
    users = torch.randn(3, 4)
    loss = esans_loss(users, positives, response, embed, use_edis=use_edis)
    loss.backward()
    assert torch.isfinite(loss)
    assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0
