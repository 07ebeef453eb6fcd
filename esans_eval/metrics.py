"""Full-ranking Recall@K with one held-out item per user."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch


def recall_at_k(
    scores: torch.Tensor,
    targets: npt.ArrayLike,
    masked: Sequence[npt.ArrayLike],
    ks: Sequence[int] = (50, 200),
) -> dict[int, float]:
    """Recall@K averaged over users, ranking ALL items.

    scores: (E, I) user x item scores; targets: (E,) each user's one held-out item;
    masked[e]: items excluded from user e's ranking (its training items). With one target
    per user, Recall@K is the fraction of users whose target ranks in the top K among the
    unmasked items. Ties are broken against the target (tied items rank above it).
    """
    num_users = scores.shape[0]
    target = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    work = scores.clone().float()
    empty = np.zeros(0, dtype=np.int64)
    rows = np.concatenate(
        [np.full(len(np.asarray(m)), e, dtype=np.int64) for e, m in enumerate(masked)] or [empty]
    )
    cols = np.concatenate([np.asarray(m, dtype=np.int64) for m in masked] or [empty])
    if len(rows):
        work[torch.as_tensor(rows.astype(np.int64)), torch.as_tensor(cols.astype(np.int64))] = (
            float("-inf")
        )
    target_score = work[torch.arange(num_users), target]
    higher = (work > target_score[:, None]).sum(dim=1)
    tied = (work == target_score[:, None]).sum(dim=1) - 1  # other items with the same score
    rank = higher + tied  # 0 = best; a constant scorer gets no credit
    return (
        {k: float((rank < k).float().mean()) for k in ks} if num_users else dict.fromkeys(ks, 0.0)
    )
