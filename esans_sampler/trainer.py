"""Trainer-side torch helpers: from a service response and live item-tower embeddings to the
ESANS negatives (real + EDIS virtual) and the InfoNCE loss, with gradients.

The service returns ids; the trainer embeds them with its own item tower, so gradients flow
through the anchors of the interpolation, as in the paper (spec §4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from esans_sampler.client import SampleResponse
from esans_sampler.loss import info_nce_loss
from esans_sampler.torch_ops import hard_interpolation, simple_interpolation

ItemEmbedder = Callable[[torch.Tensor], torch.Tensor]
"""Maps an int64 tensor of item ids (any shape S) to embeddings (S + (d,))."""


@dataclass(frozen=True)
class TrainerNegatives:
    """Per-positive negatives: embeddings (B, N, d), log_q (B, N) (0 for virtual ones) and
    mask (B, N) (True = excluded, e.g. padded hard slots)."""

    embeddings: torch.Tensor
    log_q: torch.Tensor
    mask: torch.Tensor


def esans_negatives(
    response: SampleResponse,
    positive_embeddings: torch.Tensor,
    embed_items: ItemEmbedder,
    eta: float = 0.6,
    hard_lambda: float = 0.1,
    use_edis: bool = True,
) -> TrainerNegatives:
    """Simple, hard and (with ``use_edis``) EDIS virtual negatives for each of the B rows.

    ``positive_embeddings`` (B, d) are the item-tower outputs of the positives. Hard slots
    past ``response.hard_counts`` are masked, as are their virtual twins; ``embed_items`` is
    only ever called with ids the response returned as negatives.
    """
    device = positive_embeddings.device
    batch = positive_embeddings.shape[0]

    def tensor(array: npt.ArrayLike) -> torch.Tensor:
        # Response arrays are read-only views of the wire bytes; torch wants its own copy.
        return torch.from_numpy(np.array(array)).to(device)

    simple_ids = tensor(response.simple_ids)
    # Padded hard slots (id -1) are masked below, but ``embed_items`` still sees them: give
    # them the row's first simple negative, an id every item tower knows.
    valid = response.hard_valid
    stand_in = response.simple_ids.reshape(batch, -1)[:, :1]
    hard_ids = tensor(np.where(valid, response.hard_ids, stand_in))
    hard_valid = tensor(valid)
    simple = embed_items(simple_ids)  # (B, m_c, m_o, d)
    hard = embed_items(hard_ids) * hard_valid[..., None]  # (B, m_h, d)
    dim = simple.shape[-1]

    parts = [simple.reshape(batch, -1, dim), hard]
    log_q = [
        tensor(response.simple_log_q).reshape(batch, -1),
        tensor(np.where(response.hard_valid, response.hard_log_q, np.float32(0.0))),
    ]
    excluded = [
        torch.zeros(simple_ids.reshape(batch, -1).shape, dtype=torch.bool, device=device),
        ~hard_valid,
    ]
    if use_edis:
        virtual_simple, _ = simple_interpolation(simple, eta)  # eq. 11-12
        virtual_hard = hard_interpolation(positive_embeddings, hard, hard_lambda)  # eq. 13
        parts += [virtual_simple.reshape(batch, -1, dim), virtual_hard]
        log_q += [
            torch.zeros(virtual_simple.shape[:-1], device=device).reshape(batch, -1),
            torch.zeros(virtual_hard.shape[:-1], device=device),
        ]
        excluded += [
            torch.zeros(virtual_simple.shape[:-1], dtype=torch.bool, device=device).reshape(
                batch, -1
            ),
            ~hard_valid,
        ]
    return TrainerNegatives(
        embeddings=torch.cat(parts, dim=1),
        log_q=torch.cat(log_q, dim=1).to(positive_embeddings.dtype),
        mask=torch.cat(excluded, dim=1),
    )


def esans_loss(
    user_embeddings: torch.Tensor,
    positive_embeddings: torch.Tensor,
    response: SampleResponse,
    embed_items: ItemEmbedder,
    temperature: float = 0.05,
    eta: float = 0.6,
    hard_lambda: float = 0.1,
    use_edis: bool = True,
    log_q_correction: bool = False,
) -> torch.Tensor:
    """InfoNCE (eq. 14) of users (B, d) against their positives (B, d) and the response's
    negatives embedded live; a scalar with gradients into both towers.

    ``log_q_correction`` subtracts each sampled negative's log probability from its logit
    (virtual negatives have none). The paper trains without it; it is off by default.
    """
    negatives = esans_negatives(
        response, positive_embeddings, embed_items, eta, hard_lambda, use_edis
    )
    return info_nce_loss(
        user_embeddings,
        positive_embeddings,
        negatives.embeddings,
        temperature=temperature,
        negative_log_q=negatives.log_q if log_q_correction else None,
        negative_mask=negatives.mask,
    )
