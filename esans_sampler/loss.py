"""InfoNCE over a positive and sampled + virtual negatives (paper eq. 14), in torch.

For row b, with logits ``s_b+ = <u_b, v_b+> / tau`` and ``s_bj = <u_b, v_j> / tau``:

    loss = mean_b [ logsumexp(s_b+, s_b1, ..., s_bN) - s_b+ ]

Negatives are either per positive, (B, N, d), or shared by the whole batch, (N, d), as the
paper does. Two optional corrections:

* log-q (sampled-softmax bias correction): ``log q`` of the distribution that drew an item
  is subtracted from its logit. Sampled negatives carry their q (the sampler returns it);
  virtual negatives are not drawn from anything, so a caller passes 0 for them, which
  leaves their logits untouched.
* masking: ``negative_mask[b, j]`` True drops negative j from row b (logit -inf). With
  shared negatives, :func:`shared_negative_mask` marks a row's own positive and the items
  of its fine cell (spec §5); virtual negatives are appended as unmasked columns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from esans_sampler.errors import InvalidInputError

__all__ = ["info_nce_loss", "shared_negative_mask"]


def info_nce_loss(
    user: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.05,
    negative_log_q: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    positive_log_q: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Mean InfoNCE loss of a batch (eq. 14), a scalar tensor.

    user, positive: (B, d). negatives: (B, N, d) per positive, or (N, d) shared by all rows.
    temperature: tau > 0. negative_log_q: (B, N) or (N,), log of each negative's sampling
    probability (0 for virtual negatives), subtracted from its logit. negative_mask:
    (B, N) bool, True = excluded from that row. positive_log_q: (B,), subtracted from the
    positive logit. normalize: L2-normalise user and item vectors first (cosine logits).
    """
    tau = _check_temperature(temperature)
    if user.dim() != 2 or positive.shape != user.shape:
        raise InvalidInputError(
            f"user and positive must both be (B, d), "
            f"got {tuple(user.shape)} and {tuple(positive.shape)}"
        )
    batch, dim = user.shape
    shared = negatives.dim() == 2
    if not (
        (shared and negatives.shape[1] == dim)
        or (negatives.dim() == 3 and negatives.shape[0] == batch and negatives.shape[2] == dim)
    ):
        raise InvalidInputError(
            f"negatives must be (B, N, d) = ({batch}, N, {dim}) or (N, d) = (N, {dim}), "
            f"got {tuple(negatives.shape)}"
        )
    num_neg = negatives.shape[-2]
    if normalize:
        user, positive, negatives = (F.normalize(t, dim=-1) for t in (user, positive, negatives))

    if positive_log_q is not None and positive_log_q.shape != (batch,):
        raise InvalidInputError(
            f"positive_log_q must be ({batch},), got {tuple(positive_log_q.shape)}"
        )
    if negative_log_q is not None and negative_log_q.shape not in ((num_neg,), (batch, num_neg)):
        raise InvalidInputError(
            f"negative_log_q must be ({num_neg},) or ({batch}, {num_neg}), "
            f"got {tuple(negative_log_q.shape)}"
        )
    if negative_mask is not None and (
        negative_mask.shape != (batch, num_neg) or negative_mask.dtype != torch.bool
    ):
        raise InvalidInputError(
            f"negative_mask must be ({batch}, {num_neg}) bool, "
            f"got {tuple(negative_mask.shape)} {negative_mask.dtype}"
        )

    scaled = user / tau
    pos_logits = (scaled * positive).sum(dim=-1)  # (B,)
    if positive_log_q is not None:
        pos_logits = pos_logits - positive_log_q
    # eq. 14: -log softmax at the positive = logsumexp(positive, negatives) - positive.
    if shared:
        # log q enters as addmm's bias (broadcast when it is one value per column) and the
        # mask is applied in place on the logits, so the (B, N) matrix is written once: the
        # pool of shared negatives is large (B x tens of thousands) and extra (B, N) passes
        # dominated a training step.
        column_bias = None if negative_log_q is None else -negative_log_q.to(user.dtype)
        total: torch.Tensor = _SharedLogSumExp.apply(  # type: ignore[no-untyped-call]
            scaled, negatives, column_bias, negative_mask, pos_logits
        )
    else:
        neg_logits = torch.einsum("bd,bnd->bn", scaled, negatives)
        if negative_log_q is not None:
            neg_logits = neg_logits - negative_log_q.to(user.dtype)
        if negative_mask is not None:
            # A finite floor rather than -inf: a row with every negative masked must still
            # get finite gradients (logsumexp over all -inf has NaN ones); exp(floor - x) = 0.
            floor = torch.finfo(user.dtype).min / 4
            neg_logits = neg_logits.masked_fill(negative_mask, floor)
        total = torch.logaddexp(pos_logits, torch.logsumexp(neg_logits, dim=1))
    return (total - pos_logits).mean()


class _SharedLogSumExp(torch.autograd.Function):
    """logsumexp over [positive, user @ negatives.T - log q, masked] per row, with shared
    negatives.

    The same value and gradients as composing addmm, masked_fill, logsumexp and logaddexp,
    but the (B, N) logit matrix is written once and then worked on in place: with
    batch-shared pools of tens of thousands of negatives these memory passes are most of a
    training step. ``bias`` ((N,) or (B, N), -log q) and ``mask`` ((B, N) bool) are
    constants.

    Masked logits are set to -inf, not to a finite floor: exp of a huge negative number
    takes the CPU's slow path (about 13x the time of a normal exp, and per positive nearly
    every entry of the matrix is masked), while exp(-inf) = 0 costs about 3x. A fully
    masked row stays finite: its maximum is the positive's logit, and the gradients are
    written out below rather than left to autograd.
    """

    @staticmethod
    def forward(
        ctx: Any,
        user: torch.Tensor,
        negatives: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        positive: torch.Tensor,
    ) -> torch.Tensor:
        neg_t = negatives.transpose(0, 1)
        logits = user @ neg_t if bias is None else torch.addmm(bias, user, neg_t)
        if mask is not None:
            logits.masked_fill_(mask, -math.inf)
        row_max = torch.maximum(logits.amax(dim=1), positive)
        logits.sub_(row_max.unsqueeze(1)).exp_()  # now exp(logit - row max)
        total = row_max + torch.log(logits.sum(dim=1) + torch.exp(positive - row_max))
        ctx.save_for_backward(user, negatives, logits, row_max, total, positive)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        user, negatives, weights, row_max, total, positive = ctx.saved_tensors
        # d total / d logit_j = exp(logit_j - total) = weights_j * exp(row max - total); not
        # in place, so that a graph kept for a second backward stays intact.
        scaled = weights * (grad_total * torch.exp(row_max - total)).unsqueeze(1)
        grad_user = scaled @ negatives if ctx.needs_input_grad[0] else None
        grad_negatives = scaled.transpose(0, 1) @ user if ctx.needs_input_grad[1] else None
        grad_positive = grad_total * torch.exp(positive - total)
        return grad_user, grad_negatives, None, None, grad_positive


def shared_negative_mask(
    positive_ids: torch.Tensor,
    positive_fine: torch.Tensor,
    negative_ids: torch.Tensor,
    negative_fine: torch.Tensor,
) -> torch.Tensor:
    """(B, N) bool: True where shared negative j must be dropped from row b (spec §5).

    That is where ``negative_ids[j] == positive_ids[b]`` (the row's own positive) or
    ``negative_fine[j] == positive_fine[b]`` (same fine cell: a likely false negative).
    positive_ids, positive_fine: (B,) integer; negative_ids, negative_fine: (N,) integer.
    A fine cell is one integer per item, e.g. ``primary * K_s + secondary``.
    """
    for name, t in (
        ("positive_ids", positive_ids),
        ("positive_fine", positive_fine),
        ("negative_ids", negative_ids),
        ("negative_fine", negative_fine),
    ):
        if t.dim() != 1 or t.is_floating_point() or t.is_complex():
            raise InvalidInputError(f"{name} must be a 1-D integer tensor, got {t.dtype}")
    if positive_fine.shape != positive_ids.shape or negative_fine.shape != negative_ids.shape:
        raise InvalidInputError(
            f"ids and fine cells differ in length: positives {tuple(positive_ids.shape)} vs "
            f"{tuple(positive_fine.shape)}, negatives {tuple(negative_ids.shape)} vs "
            f"{tuple(negative_fine.shape)}"
        )
    same_item = positive_ids.unsqueeze(1) == negative_ids.unsqueeze(0)
    same_cell = positive_fine.unsqueeze(1) == negative_fine.unsqueeze(0)
    return same_item | same_cell


def _check_temperature(temperature: float) -> float:
    try:
        tau = float(temperature)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"temperature must be a real number, got {temperature!r}") from exc
    if not math.isfinite(tau) or tau <= 0:
        raise InvalidInputError(f"temperature must be finite and > 0, got {temperature!r}")
    return tau
