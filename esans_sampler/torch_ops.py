"""Differentiable EDIS (paper eq. 11-13) on torch tensors, for use inside training.

The twin of :mod:`esans_sampler.edis`: same signatures, same similarity floor, same
schedule and the same numbers (to float rounding). Gradients flow into the anchors, through
both the vectors and the weights, and into the positive of a hard interpolation; this is
how the paper runs EDIS on the item tower's live output.

Works on any floating dtype and device. Half-precision inputs compute their weights in
float32. Tensor values are not checked for NaN here (that would force a device sync on
every step); ``eta``, ``lam`` and shapes are.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from esans_sampler.edis import NORM_EPS, SIM_FLOOR, check_eta, check_lam, schedule_mask
from esans_sampler.errors import InvalidInputError

__all__ = ["apply_weights", "edis_similarity", "hard_interpolation", "simple_interpolation"]


def edis_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise EDIS similarity ``clamp((cos + 1) / 2, SIM_FLOOR, 1)`` (spec §4).

    ``a`` (..., n, d) and ``b`` (..., k, d) with broadcastable leading dimensions give
    (..., n, k). Zero vectors have cosine 0 with everything (similarity 0.5).
    """
    _check_float(a, "a")
    _check_float(b, "b")
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-1]:
        raise InvalidInputError(
            f"edis_similarity needs (..., n, d) and (..., k, d), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return _similarity(_unit(a), _unit(b))


def simple_interpolation(
    anchors: torch.Tensor, eta: float = 0.6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual simple negatives of every drawn cluster (eq. 11-12), differentiably.

    ``anchors`` (B, m_c, m_o, d): the simple negatives' live embeddings, grouped by drawn
    cluster in drawn order (any leading shape ``(..., m_o, d)`` works).
    Returns ``virtual`` (B, m_c, T, d) and ``weights`` (B, m_c, T, m_o), T = 2 + ... + m_o,
    in the dtype of ``anchors``; ``virtual == apply_weights(weights, anchors)``.
    """
    _check_float(anchors, "anchors")
    if anchors.dim() < 2 or anchors.shape[-2] < 1:
        raise InvalidInputError(
            f"anchors must be (..., m_o, d) with m_o >= 1, got {tuple(anchors.shape)}"
        )
    eta_value = check_eta(eta)
    work = anchors.float() if anchors.dtype in (torch.float16, torch.bfloat16) else anchors
    anchor_idx, mask = _schedule(anchors.shape[-2], work.device, work.dtype)
    unit = _unit(work)
    sim = _similarity(unit, unit)  # (..., m_o, m_o)
    # eq. 11 numerators sim^eta = exp(eta * log sim), each row divided by its anchor's
    # self-similarity as in edis.py. That rescale leaves the weights unchanged, so it is
    # detached: it only keeps sim^eta from underflowing for a large eta.
    log_sim = sim.log()
    log_self = torch.diagonal(log_sim, dim1=-2, dim2=-1).detach().unsqueeze(-1)
    powered = torch.exp(eta_value * (log_sim - log_self))
    numer = powered[..., anchor_idx, :] * mask  # (..., T, m_o); zero past the prefix
    weights = (numer / numer.sum(dim=-1, keepdim=True)).to(anchors.dtype)
    return apply_weights(weights, anchors), weights


def hard_interpolation(
    positive: torch.Tensor, hard: torch.Tensor, lam: float = 0.1
) -> torch.Tensor:
    """Virtual hard negatives ``lam * v_pos + (1 - lam) * v_h`` (eq. 13), differentiably.

    ``positive`` (B, d) and ``hard`` (B, m_h, d) give (B, m_h, d). ``lam`` must be finite
    and < 1 (``lam < 0`` gives easier negatives).
    """
    _check_float(positive, "positive")
    _check_float(hard, "hard")
    if (
        positive.dim() != 2
        or hard.dim() != 3
        or hard.shape[0] != positive.shape[0]
        or hard.shape[2] != positive.shape[1]
    ):
        raise InvalidInputError(
            f"hard_interpolation needs positive (B, d) and hard (B, m_h, d), "
            f"got {tuple(positive.shape)} and {tuple(hard.shape)}"
        )
    lam_value = check_lam(lam)
    return lam_value * positive.unsqueeze(1) + (1.0 - lam_value) * hard  # eq. 13


def apply_weights(weights: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Re-apply interpolation ``weights`` (..., T, m_o) to ``anchors`` (..., m_o, d).

    Returns (..., T, d): ``virtual[t] = sum_i weights[t, i] * anchors[i]`` (eq. 11). This is
    how a trainer turns weights returned by the service (numpy ``EdisResult``) into
    virtual negatives over its own live embeddings, with gradients into the anchors.
    """
    _check_float(weights, "weights")
    _check_float(anchors, "anchors")
    if weights.dim() < 2 or anchors.dim() < 2 or weights.shape[-1] != anchors.shape[-2]:
        raise InvalidInputError(
            f"apply_weights needs weights (..., T, m_o) and anchors (..., m_o, d), "
            f"got {tuple(weights.shape)} and {tuple(anchors.shape)}"
        )
    try:
        return torch.matmul(weights.to(anchors.dtype), anchors)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"leading shapes of weights {tuple(weights.shape)} and anchors "
            f"{tuple(anchors.shape)} do not broadcast"
        ) from exc


def _similarity(unit_a: torch.Tensor, unit_b: torch.Tensor) -> torch.Tensor:
    # spec §4: cosine mapped to [0, 1], floored so sim^eta keeps a finite gradient.
    cos = torch.matmul(unit_a, unit_b.transpose(-1, -2))
    return ((cos + 1.0) * 0.5).clamp(min=SIM_FLOOR, max=1.0)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=-1, eps=NORM_EPS)


@lru_cache(maxsize=64)
def _schedule(
    m_o: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    anchor, mask = schedule_mask(m_o)
    return (
        torch.tensor(anchor.tolist(), dtype=torch.long, device=device),
        torch.tensor(mask.tolist(), dtype=dtype, device=device).reshape(-1, m_o),
    )


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InvalidInputError(f"{name} must be a floating-point torch tensor")
