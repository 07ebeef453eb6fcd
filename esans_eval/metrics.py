"""Full-ranking Recall@K with one or more held-out items per user."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch


def _per_user(targets: npt.ArrayLike | Sequence[npt.ArrayLike]) -> list[npt.NDArray[np.int64]]:
    if isinstance(targets, np.ndarray) and targets.ndim == 1:
        return [np.asarray([t], dtype=np.int64) for t in targets]
    return [np.atleast_1d(np.asarray(t, dtype=np.int64)) for t in targets]  # type: ignore[union-attr]


def target_ranks(
    scores: torch.Tensor,
    targets: npt.ArrayLike | Sequence[npt.ArrayLike],
    masked: Sequence[npt.ArrayLike],
    max_rank: int | None = None,
) -> npt.NDArray[np.int64]:
    """The 0-based rank of every (user, target) pair among the user's unmasked items.

    scores: (E, I) user x item scores; targets[e]: user e's held-out items (an (E,) array
    means one each); masked[e]: items excluded from user e's ranking (what it already has).
    Pairs come user by user, in target order. Items tied with a target rank above it, so a
    constant scorer gets no credit. Other targets compete like any item: Recall@K counts the
    targets inside the top K of one list. With ``max_rank``, ranks >= max_rank come back as
    max_rank (exact below it), found from each row's top ``max_rank`` scores: far cheaper
    on a large catalogue than counting over every item.
    """
    per_user = _per_user(targets)
    work = scores.clone().float()
    empty = np.zeros(0, dtype=np.int64)
    rows = np.concatenate(
        [np.full(len(np.asarray(m)), e, dtype=np.int64) for e, m in enumerate(masked)] or [empty]
    )
    cols = np.concatenate([np.asarray(m, dtype=np.int64) for m in masked] or [empty])
    if len(rows):
        work[torch.as_tensor(rows), torch.as_tensor(cols)] = float("-inf")
    pair_user = np.concatenate(
        [np.full(len(t), e, dtype=np.int64) for e, t in enumerate(per_user)] or [empty]
    )
    pair_item = np.concatenate(per_user or [empty])
    if not len(pair_user):
        return empty
    user_t, item_t = torch.as_tensor(pair_user), torch.as_tensor(pair_item)
    target_score = work[user_t, item_t]

    def exact(pairs: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(pairs), dtype=torch.int64)
        for start in range(0, len(pairs), 1024):  # bounded memory: 1024 rows of scores
            part = pairs[start : start + 1024]
            row_scores = work[user_t[part]]
            higher = (row_scores > target_score[part, None]).sum(dim=1)
            tied = (row_scores == target_score[part, None]).sum(dim=1) - 1
            out[start : start + len(part)] = higher + tied
        return out

    everything = torch.arange(len(pair_user))
    if max_rank is None or max_rank >= work.shape[1]:
        return exact(everything).numpy()
    top = torch.topk(work, max_rank, dim=1, sorted=True).values  # (E, max_rank)
    row_top = top[user_t]
    threshold = row_top[:, -1]
    above = target_score > threshold
    # Above the max_rank-th score, every item that outranks the target is in the top list.
    ranks = (
        (row_top > target_score[:, None]).sum(dim=1)
        + (row_top == target_score[:, None]).sum(dim=1)
        - 1
    )
    ranks = torch.where(above, ranks, torch.full_like(ranks, max_rank))
    on_edge = everything[target_score == threshold]
    if len(on_edge):  # tied with the cut: count over the whole row
        ranks[on_edge] = exact(on_edge).clamp(max=max_rank)
    return ranks.numpy()


def recall_from_ranks(
    ranks: npt.NDArray[np.int64], pair_user: npt.NDArray[np.int64], ks: Sequence[int]
) -> dict[int, float]:
    """Recall@K averaged over users: each user's share of its targets ranked < K."""
    if not len(ranks):
        return dict.fromkeys(ks, 0.0)
    _, user_index, counts = np.unique(pair_user, return_inverse=True, return_counts=True)
    out = {}
    for k in ks:
        hits = np.bincount(user_index, weights=(ranks < k).astype(np.float64))
        out[k] = float(np.mean(hits / counts))
    return out


def recall_at_k(
    scores: torch.Tensor,
    targets: npt.ArrayLike | Sequence[npt.ArrayLike],
    masked: Sequence[npt.ArrayLike],
    ks: Sequence[int] = (50, 200),
) -> dict[int, float]:
    """Recall@K averaged over users, ranking ALL items (see :func:`target_ranks`).

    With one target per user this is the fraction of users whose target is in the top K.
    """
    per_user = _per_user(targets)
    ranks = target_ranks(scores, per_user, masked)
    pair_user = np.concatenate(
        [np.full(len(t), e, dtype=np.int64) for e, t in enumerate(per_user)]
        or [np.zeros(0, dtype=np.int64)]
    )
    return recall_from_ranks(ranks, pair_user, ks)
