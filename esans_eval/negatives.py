"""One training step's InfoNCE loss for every method of the evaluation.

A step gathers a pool of negative columns and scores every row of the batch against it:

* sampled: what the service drew for the batch's positives (``SampleResponse``), the ESANS
  simple and hard negatives or a baseline's draws, plus (``uniform_extra``) a second UNS
  draw; with ``use_edis`` the EDIS virtual negatives built from them on live embeddings;
* in-batch: the batch's positives, as a trainer's batch softmax uses them.

Protocols. ``shared`` (the paper's, appendix C): every row sees the whole pool. Per
positive: row b sees only what was drawn for it (and the in-batch columns). One pool for
both: per positive, other rows' columns are masked, or (without in-batch columns) each row
gathers its own columns of the pool, padded, at B x n rather than B x B n.

Masks (logit -inf) for row b: any column holding b's positive (accidental hit); for ESANS,
real negatives in b's fine cell (spec §5); with ``mask_history``, items b's user has in
training.

log-q (``log_q``). Sampled only: a negative's logit loses log(n q_j), n the draws a row can
see, q_j the probability its draw had; the sum over the pool is then an importance-sampling
estimate of the full softmax's normaliser (virtual negatives are not drawn: no correction).
With in-batch columns (TFRS's and debiased MNS's batch softmax): every logit, the positive's
included, loses log E[count_j], the expected number of copies of j among the candidates:
B p_j from the batch (p: frequency among training targets) + n_u / N from uniform draws.
ESANS draws with in-batch columns: two estimates of the normaliser, the batch's and the
draws', weighted by their sizes; each column is corrected by its own (log(B p_j / w_batch)
or log(n q_j / w_drawn)), the positive as a member of the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from esans_sampler.client import SampleResponse
from esans_sampler.exclusions import Exclusions, exclusion_mask
from esans_sampler.loss import info_nce_loss
from esans_sampler.torch_ops import hard_interpolation, simple_interpolation

IntArray = npt.NDArray[np.int64]
FULL = "full"
BEHAVIOUR_ONLY = "behaviour"
GLOBAL_SECONDARY = "global"  # the three views with the paper's one global secondary codebook


@dataclass(frozen=True)
class Method:
    """One way of building a step's negatives (module docstring).

    sampler: the service sampler ("uniform", "popularity", "esans") or None (no draws).
    codebook: which published codebook ESANS samples (FULL, BEHAVIOUR_ONLY, GLOBAL_SECONDARY).
    per_positive: sampled negatives per positive for a baseline sampler (ESANS: m_c * m_o).
    role: "baseline", "paper" (ESANS as published), "default" (the service's product
    default), "ablation" or "probe" (validation only).
    """

    name: str
    sampler: str | None
    role: str = "baseline"
    codebook: str = FULL
    per_positive: int = 10
    m_h: int = 0
    use_edis: bool = False
    hard_lambda: float | None = None
    gamma: float | None = None
    in_batch: bool = False
    uniform_extra: int = 0
    log_q: bool = False
    mask_history: bool = False
    pns_alpha: float | None = None
    shared: bool = True
    simple_negatives: bool = True
    """False: only the hard negatives of an ESANS draw enter the loss (with in-batch ones)."""
    correct_drawn: bool = True
    """With in-batch + log q: False leaves the drawn negatives uncorrected."""

    def __post_init__(self) -> None:
        if self.log_q and self.in_batch and self.sampler == "popularity":
            raise ValueError(f"{self.name}: batch-softmax log q with PNS draws is not defined")
        if self.sampler is None and not self.in_batch:
            raise ValueError(f"{self.name}: a method needs draws or in-batch negatives")

    @property
    def esans(self) -> bool:
        return self.sampler == "esans"

    def lam(self, default: float) -> float:
        return default if self.hard_lambda is None else self.hard_lambda

    def describe(self, m_c: int, m_o: int) -> str:
        parts = []
        if self.sampler:
            count = m_c * m_o if self.esans else self.per_positive
            parts.append(f"{count} {self.sampler}" + (f" + {self.m_h} hard" if self.m_h else ""))
        if self.uniform_extra:
            parts.append(f"{self.uniform_extra} uniform")
        if self.use_edis:
            parts.append("EDIS")
        if self.in_batch:
            parts.append("in-batch")
        if not self.simple_negatives:
            parts.append("hard only")
        if self.log_q and not self.correct_drawn:
            parts.append("drawn uncorrected")
        if self.log_q:
            parts.append("log-q")
        if self.mask_history:
            parts.append("user's items masked")
        if self.gamma is not None:
            parts.append(f"gamma {self.gamma:g}")
        if self.hard_lambda is not None:
            parts.append(f"lambda {self.hard_lambda:g}")
        if self.pns_alpha is not None:
            parts.append(f"alpha {self.pns_alpha:g}")
        return ", ".join(parts) + (" (per positive)" if not self.shared else " (shared)")


@dataclass(frozen=True)
class Context:
    """What the loss needs besides the batch: item fine cells of the method's codebook (or
    None), log target frequency (I,) for batch-softmax log q, each user's sorted training
    items (CSR: ``train_ptr`` (U+1,), ``train_items``), and the budget's tau / eta / lambda."""

    num_items: int
    fine: IntArray | None
    log_frequency: npt.NDArray[np.float64]
    train_ptr: IntArray
    train_items: IntArray
    temperature: float
    eta: float
    hard_lambda: float


@dataclass
class StepStats:
    """Bookkeeping of one step's real (not virtual) negatives, as every row sees them."""

    visible: int = 0  # (row, real negative column) pairs not masked
    user_items: int = 0  # ... of which the column is an item the row's user has in training
    negative_ids: IntArray | None = None  # distinct real negative ids of the step


def _user_item_hits(users: IntArray, columns: IntArray, ctx: Context) -> npt.NDArray[np.bool_]:
    """(B, C) bool: row b's user has the id ``columns[0, c]`` (shared columns, (1, C)) or
    ``columns[b, c]`` (each row's own, (B, C)) in training: the service's exclusions of the
    row, applied to the columns it scores. Virtual columns (id -1) never hit."""
    starts, ends = ctx.train_ptr[users], ctx.train_ptr[users + 1]
    parts = [ctx.train_items[s:e] for s, e in zip(starts, ends, strict=True)]
    flat = np.concatenate([np.zeros(0, dtype=np.int64), *parts]).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(ends - starts))).astype(np.int64)
    if columns.shape[0] == 1:
        return exclusion_mask(flat, offsets, columns[0])
    # Each row's own columns: the service's per-row lookup, ids standing for catalogue rows.
    stride = ctx.num_items + 1
    batch_of = np.repeat(np.arange(len(users), dtype=np.int64), ends - starts)
    exclusions = Exclusions(offsets, flat, batch_of, stride, batch_of * stride + flat)
    rows = np.broadcast_to(np.arange(len(users), dtype=np.int64)[:, None], columns.shape)
    hits: npt.NDArray[np.bool_] = exclusions.contains(rows, columns) & (columns >= 0)
    return hits


def step_loss(
    model_items: torch.Tensor,
    item_rows: dict[str, torch.Tensor],
    user: torch.Tensor,
    method: Method,
    positives: IntArray,
    users: IntArray,
    responses: list[SampleResponse],
    ctx: Context,
) -> tuple[torch.Tensor, StepStats]:
    """The step's loss (module docstring) and its negative bookkeeping.

    model_items: (R, d) live item-tower outputs of the step's distinct ids; item_rows maps
    "positives" (B,) and "sampled:<k>" to rows of it (k-th response's simple then valid hard
    ids, flattened); user: (B, d); positives, users: (B,) ids; responses: the service's
    answers for this batch, the method's draw first, then the uniform extra.
    """
    batch = len(positives)
    v_pos = model_items[item_rows["positives"]]
    columns: list[torch.Tensor] = []
    ids: list[IntArray] = []  # per column its item id, -1 for virtual ones
    owner: list[IntArray] = []  # per column the row that drew it, -1 for everyone's
    log_q: list[IntArray | npt.NDArray[np.float64]] = []  # per column log q (nan: none)
    is_sampled: list[npt.NDArray[np.bool_]] = []
    for k, response in enumerate(responses):
        valid = response.hard_valid
        simple_ids = response.simple_ids.reshape(batch, -1)
        emb = model_items[item_rows[f"sampled:{k}"]]
        n_simple = simple_ids.size
        simple = emb[:n_simple]
        hard = emb[n_simple:]
        hard_rows = np.nonzero(valid)[0]
        keep_simple = k > 0 or method.simple_negatives
        if keep_simple:
            columns.append(simple)
            ids.append(simple_ids.ravel())
            owner.append(np.repeat(np.arange(batch), simple_ids.shape[1]))
            log_q.append(response.simple_log_q.reshape(-1).astype(np.float64))
            is_sampled.append(np.ones(n_simple, dtype=bool))
        columns.append(hard)
        ids.append(response.hard_ids[valid])
        owner.append(hard_rows)
        log_q.append(response.hard_log_q[valid].astype(np.float64))
        is_sampled.append(np.ones(len(hard_rows), dtype=bool))
        if k == 0 and method.use_edis:
            n_virtual = len(hard_rows)
            if keep_simple:
                anchors = simple.reshape(*response.simple_ids.shape, -1)
                virtual, _ = simple_interpolation(anchors, ctx.eta)
                per_row = virtual.shape[1] * virtual.shape[2]
                columns.append(virtual.reshape(-1, virtual.shape[-1]))
                owner.append(np.repeat(np.arange(batch), per_row))
                n_virtual += batch * per_row
            hard_virtual = hard_interpolation(
                v_pos[torch.as_tensor(hard_rows)], hard.unsqueeze(1), method.lam(ctx.hard_lambda)
            ).squeeze(1)
            columns.append(hard_virtual)
            owner.append(hard_rows)
            ids.append(np.full(n_virtual, -1, dtype=np.int64))
            log_q.append(np.full(n_virtual, np.nan))
            is_sampled.append(np.zeros(n_virtual, dtype=bool))
    if method.in_batch:
        columns.append(v_pos)
        ids.append(positives.astype(np.int64))
        owner.append(np.full(batch, -1, dtype=np.int64))
        log_q.append(np.full(batch, np.nan))
        is_sampled.append(np.zeros(batch, dtype=bool))

    col_ids = np.concatenate(ids)
    col_owner = np.concatenate(owner)
    col_log_q = np.concatenate(log_q)
    col_sampled = np.concatenate(is_sampled)
    real = col_ids >= 0
    real_ids = col_ids[real]

    # The columns each row scores. From the pool (shared, and per positive with in-batch
    # columns): masks are worked out on the real columns (virtual ones are never masked for
    # a positive, cell or user item) and, per positive, other rows' draws are masked. Per
    # positive without in-batch columns, each row gathers its own (``grid`` (B, n), padded),
    # so a step costs B x n rather than B x (every row's draws); with them, gathering the
    # batch's B columns for every row would cost more than masking the pool.
    grid = pad = foreign = None
    if method.shared or method.in_batch:
        ids_seen, sampled_seen = real_ids[None, :], col_sampled[real][None, :]
        if not method.shared:
            foreign = (col_owner >= 0) & (col_owner[None, :] != np.arange(batch)[:, None])
    else:
        grid, pad = _own_columns(col_owner, batch)
        ids_seen, sampled_seen = col_ids[grid], col_sampled[grid]
    seen_mask = positives[:, None] == ids_seen  # a virtual column's -1 is never a positive
    if method.esans and ctx.fine is not None:
        fine_seen = np.where(sampled_seen & (ids_seen >= 0), ctx.fine[ids_seen], -1)
        seen_mask |= ctx.fine[positives][:, None] == fine_seen
    user_hit = _user_item_hits(users, ids_seen, ctx)
    if method.mask_history:
        seen_mask |= user_hit
    if foreign is not None:
        seen_mask |= foreign[:, real]
    if pad is None:
        mask = torch.zeros((batch, len(col_ids)), dtype=torch.bool)
        mask.index_copy_(1, torch.as_tensor(np.flatnonzero(real)), torch.as_tensor(seen_mask))
        if foreign is not None:
            mask |= torch.as_tensor(foreign)
    else:
        mask = torch.as_tensor(seen_mask | pad)

    negative_log_q = positive_log_q = None
    if method.log_q and method.in_batch and method.esans and not method.correct_drawn:
        # The batch softmax's own correction; the drawn (hard) negatives ride along as
        # extra negatives, uncorrected, as hard negatives are added to a batch softmax.
        batch_correction = np.log(batch) + ctx.log_frequency
        in_batch_col = real & ~col_sampled
        negative_log_q = np.where(in_batch_col, batch_correction[np.maximum(col_ids, 0)], 0.0)
        positive_log_q = batch_correction[positives]
    elif method.log_q and method.in_batch and method.esans:
        # Two estimates of the softmax normaliser, weighted by their sizes: the batch's
        # (B draws from the target frequency, the positive among them) and the service's
        # (n draws, each with its own q). Each column is corrected by its own estimator.
        n_drawn = int(col_sampled.sum())
        share_batch = batch / (batch + n_drawn)
        in_batch_col = real & ~col_sampled
        batch_correction = np.log(batch) + ctx.log_frequency - math.log(share_batch)
        # (no draws, e.g. no hard negative found for any row: nothing to correct)
        drawn_correction = math.log(n_drawn / (1 - share_batch)) if n_drawn else 0.0
        negative_log_q = np.where(
            in_batch_col,
            batch_correction[np.maximum(col_ids, 0)],
            np.where(col_sampled, col_log_q + drawn_correction, 0.0),
        )
        positive_log_q = batch_correction[positives]
    elif method.log_q and method.in_batch:
        n_uniform = int(col_sampled.sum())
        expected = batch * np.exp(ctx.log_frequency) + n_uniform / ctx.num_items
        correction = np.log(expected)
        negative_log_q = np.where(real, correction[np.maximum(col_ids, 0)], 0.0)
        positive_log_q = correction[positives]
    elif method.log_q:
        draws = (
            col_sampled.sum()
            if method.shared
            else np.bincount(col_owner[col_sampled], minlength=batch).mean()
        )
        negative_log_q = np.where(col_sampled, col_log_q + math.log(max(draws, 1)), 0.0)

    negatives = torch.cat(columns, dim=0)
    if grid is not None:
        negatives = negatives[torch.as_tensor(grid)]
        if negative_log_q is not None:
            negative_log_q = negative_log_q[grid]
    loss = info_nce_loss(
        user,
        v_pos,
        negatives,
        temperature=ctx.temperature,
        negative_log_q=None
        if negative_log_q is None
        else torch.as_tensor(negative_log_q, dtype=user.dtype),
        negative_mask=mask,
        positive_log_q=None
        if positive_log_q is None
        else torch.as_tensor(positive_log_q, dtype=user.dtype),
    )
    seen = ~seen_mask
    if pad is not None:
        seen &= (ids_seen >= 0) & ~pad
    stats = StepStats(
        visible=int(np.count_nonzero(seen)),
        user_items=int(np.count_nonzero(seen & user_hit)),
        negative_ids=np.unique(real_ids),
    )
    return loss, stats


def _own_columns(owner: IntArray, batch: int) -> tuple[IntArray, npt.NDArray[np.bool_]]:
    """Per positive: (B, n) column indices of each row's own columns (``owner`` == row, in
    column order, padded) followed by everyone's (``owner`` -1), and (B, n) True on padding."""
    everyone = np.flatnonzero(owner < 0)
    owned = np.flatnonzero(owner >= 0)
    order = owned[np.argsort(owner[owned], kind="stable")]
    counts = np.bincount(owner[order], minlength=batch)
    width = int(counts.max(initial=0))
    slot = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    grid = np.zeros((batch, width), dtype=np.int64)
    pad = np.ones((batch, width), dtype=bool)
    grid[owner[order], slot] = order
    pad[owner[order], slot] = False
    shared = np.broadcast_to(everyone, (batch, len(everyone)))
    return np.hstack([grid, shared]), np.hstack([pad, np.zeros(shared.shape, dtype=bool)])
