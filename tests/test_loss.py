from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
import torch

from esans_sampler.errors import InvalidInputError
from esans_sampler.loss import info_nce_loss, shared_negative_mask

B, N, D = 4, 6, 5


def _reference(
    user: npt.NDArray[np.float64],
    positive: npt.NDArray[np.float64],
    negatives: npt.NDArray[np.float64],
    tau: float,
    neg_log_q: npt.NDArray[np.float64] | None = None,
    mask: npt.NDArray[np.bool_] | None = None,
) -> float:
    """eq. 14 written out row by row; negatives (B, N, d), log-q (B, N), mask (B, N)."""
    total = 0.0
    for b in range(user.shape[0]):
        pos = float(user[b] @ positive[b]) / tau
        terms = [pos]
        for j in range(negatives.shape[1]):
            if mask is not None and mask[b, j]:
                continue
            logit = float(user[b] @ negatives[b, j]) / tau
            if neg_log_q is not None:
                logit -= float(neg_log_q[b, j])
            terms.append(logit)
        top = max(terms)
        log_denominator = top + math.log(sum(math.exp(t - top) for t in terms))
        total += log_denominator - pos
    return total / int(user.shape[0])


def _data(seed: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(B, D, dtype=torch.float64, generator=gen)
    positive = torch.randn(B, D, dtype=torch.float64, generator=gen)
    shape = (N, D) if shared else (B, N, D)
    negatives = torch.randn(*shape, dtype=torch.float64, generator=gen)
    return user, positive, negatives


def _per_row(negatives: torch.Tensor) -> npt.NDArray[np.float64]:
    arr: npt.NDArray[np.float64] = negatives.numpy()
    return np.broadcast_to(arr, (B, N, D)) if negatives.dim() == 2 else arr


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tau", [0.05, 1.0, 3.0])
def test_matches_log_softmax_reference(shared: bool, tau: float) -> None:
    user, positive, negatives = _data(0, shared)
    got = info_nce_loss(user, positive, negatives, temperature=tau)
    expected = _reference(user.numpy(), positive.numpy(), _per_row(negatives), tau)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_temperature_scales_the_logits() -> None:
    user, positive, negatives = _data(1, shared=False)
    scaled = info_nce_loss(user / 0.1, positive, negatives, temperature=1.0)
    assert info_nce_loss(user, positive, negatives, temperature=0.1).item() == pytest.approx(
        scaled.item(), rel=1e-12
    )


@pytest.mark.parametrize("shared", [False, True])
def test_log_q_shifts_logits_exactly(shared: bool) -> None:
    user, positive, negatives = _data(2, shared)
    gen = torch.Generator().manual_seed(9)
    log_q = torch.log(torch.rand(N if shared else (B, N), dtype=torch.float64, generator=gen))
    got = info_nce_loss(user, positive, negatives, temperature=0.5, negative_log_q=log_q)
    per_row_q = np.broadcast_to(log_q.numpy(), (B, N))
    expected = _reference(
        user.numpy(), positive.numpy(), _per_row(negatives), 0.5, neg_log_q=per_row_q
    )
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # Zero log-q (virtual negatives) changes nothing.
    zero = torch.zeros(N, dtype=torch.float64)
    assert info_nce_loss(user, positive, negatives, 0.5, negative_log_q=zero).item() == (
        pytest.approx(info_nce_loss(user, positive, negatives, 0.5).item(), rel=1e-12)
    )


def test_positive_log_q_shifts_the_positive_logit() -> None:
    user, positive, negatives = _data(3, shared=True)
    log_q = torch.full((B,), -2.0, dtype=torch.float64)
    got = info_nce_loss(user, positive, negatives, 1.0, positive_log_q=log_q)
    # Subtracting -2 from the positive logit is adding 2 to it: shift the positive vector.
    shift = 2.0 * user / (user * user).sum(dim=1, keepdim=True)
    assert got.item() == pytest.approx(
        info_nce_loss(user, positive + shift, negatives, 1.0).item(), rel=1e-9
    )


@pytest.mark.parametrize("shared", [False, True])
def test_mask_matches_reference(shared: bool) -> None:
    user, positive, negatives = _data(4, shared)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 1] = mask[2, :3] = mask[3, :] = True
    got = info_nce_loss(user, positive, negatives, 0.2, negative_mask=mask)
    expected = _reference(
        user.numpy(), positive.numpy(), _per_row(negatives), 0.2, mask=mask.numpy()
    )
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_masked_copy_of_the_positive_changes_nothing() -> None:
    user, positive, negatives = _data(5, shared=False)
    with_copy = torch.cat([negatives, positive.unsqueeze(1)], dim=1)  # (B, N + 1, d)
    mask = torch.zeros(B, N + 1, dtype=torch.bool)
    mask[:, N] = True
    got = info_nce_loss(user, positive, with_copy, 0.05, negative_mask=mask)
    assert got.item() == pytest.approx(info_nce_loss(user, positive, negatives).item(), rel=1e-12)
    unmasked = info_nce_loss(user, positive, with_copy, 0.05)
    assert unmasked.item() > got.item()


def test_shared_mask_drops_own_positive_and_fine_cell() -> None:
    user, positive, negatives = _data(6, shared=True)
    positive_ids, positive_fine = torch.arange(B) + 100, torch.arange(B)
    negative_ids, negative_fine = torch.arange(N), torch.full((N,), 9)
    negative_fine[2] = 3  # negative 2 lies in row 3's fine cell
    # In-batch style: the positives are shared negatives too, each masked in its own row.
    all_negatives = torch.cat([negatives, positive])
    mask = shared_negative_mask(
        positive_ids,
        positive_fine,
        torch.cat([negative_ids, positive_ids]),
        torch.cat([negative_fine, positive_fine]),
    )
    expected_mask = torch.zeros(B, N + B, dtype=torch.bool)
    expected_mask[3, 2] = True
    expected_mask[torch.arange(B), N + torch.arange(B)] = True
    assert torch.equal(mask, expected_mask)
    got = info_nce_loss(user, positive, all_negatives, 0.05, negative_mask=mask)
    per_row = np.broadcast_to(all_negatives.numpy(), (B, N + B, D))
    expected = _reference(user.numpy(), positive.numpy(), per_row, 0.05, mask=mask.numpy())
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_normalize_uses_cosine_logits() -> None:
    user, positive, negatives = _data(7, shared=False)
    unit = torch.nn.functional.normalize
    got = info_nce_loss(user * 3.0, positive * 0.5, negatives * 7.0, 0.1, normalize=True)
    expected = info_nce_loss(
        unit(user, dim=-1), unit(positive, dim=-1), unit(negatives, dim=-1), 0.1
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)


def test_gradients_flow_to_all_inputs() -> None:
    user, positive, negatives = (t.requires_grad_() for t in _data(8, shared=False))
    info_nce_loss(user, positive, negatives).backward()  # type: ignore[no-untyped-call]
    for t in (user, positive, negatives):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_rejected(tau: float) -> None:
    user, positive, negatives = _data(8, shared=True)
    with pytest.raises(InvalidInputError, match="temperature"):
        info_nce_loss(user, positive, negatives, temperature=tau)


def test_shape_errors() -> None:
    user, positive, negatives = _data(9, shared=False)
    with pytest.raises(InvalidInputError, match="user and positive"):
        info_nce_loss(user, positive[:2], negatives)
    with pytest.raises(InvalidInputError, match="negatives"):
        info_nce_loss(user, positive, negatives[:2])
    with pytest.raises(InvalidInputError, match="negatives"):
        info_nce_loss(user, positive, negatives[..., :3])
    with pytest.raises(InvalidInputError, match="negative_log_q"):
        info_nce_loss(user, positive, negatives, negative_log_q=torch.zeros(N + 1))
    with pytest.raises(InvalidInputError, match="negative_mask"):
        info_nce_loss(user, positive, negatives, negative_mask=torch.zeros(B, N))
    with pytest.raises(InvalidInputError, match="positive_log_q"):
        info_nce_loss(user, positive, negatives, positive_log_q=torch.zeros(B, 1))
    with pytest.raises(InvalidInputError, match="positive_ids"):
        shared_negative_mask(torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(3))
    with pytest.raises(InvalidInputError, match="differ in length"):
        shared_negative_mask(
            torch.zeros(2, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
            torch.zeros(3, dtype=torch.long),
        )


def test_shared_loss_matches_the_composed_formula_in_value_and_gradients() -> None:
    """The fused shared-negative path gives what addmm + logsumexp + logaddexp give,
    gradients included, with log q, a mask and a row whose negatives are all masked."""
    gen = torch.Generator().manual_seed(3)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()

    user, positive, negatives = leaf(5, 4), leaf(5, 4), leaf(9, 4)
    log_q = torch.rand(9, dtype=torch.float64, generator=gen) - 3.0
    mask = torch.rand(5, 9, generator=gen) < 0.3
    mask[2] = True  # every negative of row 2 masked: its loss is 0, its gradients finite

    got = info_nce_loss(user, positive, negatives, 0.2, negative_log_q=log_q, negative_mask=mask)
    grads = torch.autograd.grad(got, (user, positive, negatives))
    logits = (user @ negatives.T / 0.2 - log_q).masked_fill(mask, float("-inf"))
    pos = (user * positive).sum(-1) / 0.2
    per_row = torch.logaddexp(pos, torch.logsumexp(logits, dim=1)) - pos
    want = per_row.mean()
    expected = torch.autograd.grad(want, (user, positive, negatives), allow_unused=True)
    torch.testing.assert_close(got, want)
    for g, e in zip(grads, expected, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, torch.nan_to_num(e, nan=0.0))
    assert torch.autograd.gradcheck(
        lambda u, p, n: info_nce_loss(u, p, n, 0.2, negative_log_q=log_q, negative_mask=mask),
        (user, positive, negatives),
    )
