from __future__ import annotations

import numpy as np
import pytest
import torch

from esans_sampler import edis, torch_ops
from esans_sampler.errors import InvalidInputError


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (4, 2, 5, 16), (3, 3, 1, 4), (2, 6, 8)])
def test_simple_matches_numpy(shape: tuple[int, ...], eta: float) -> None:
    rng = np.random.default_rng(sum(shape))
    anchors = rng.standard_normal(shape).astype(np.float32)
    np_virtual, np_weights = edis.simple_interpolation(anchors, eta)
    t_virtual, t_weights = torch_ops.simple_interpolation(torch.from_numpy(anchors), eta)
    assert t_virtual.dtype == torch.float32
    assert np.allclose(t_weights.numpy(), np_weights, atol=1e-5)
    assert np.allclose(t_virtual.numpy(), np_virtual, atol=1e-5)


@pytest.mark.parametrize("lam", [0.1, -0.1])
def test_hard_matches_numpy(lam: float) -> None:
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((5, 8)).astype(np.float32)
    hard = rng.standard_normal((5, 3, 8)).astype(np.float32)
    expected = edis.hard_interpolation(pos, hard, lam)
    got = torch_ops.hard_interpolation(torch.from_numpy(pos), torch.from_numpy(hard), lam)
    assert np.allclose(got.numpy(), expected, atol=1e-6)


def test_similarity_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 4, 5)).astype(np.float32)
    b = rng.standard_normal((2, 3, 5)).astype(np.float32)
    a[0, 0] = 0.0
    b[1, 1] = -a[1, 1]  # opposite vectors: the floor
    got = torch_ops.edis_similarity(torch.from_numpy(a), torch.from_numpy(b))
    assert np.allclose(got.numpy(), edis.edis_similarity(a, b), atol=1e-6)


def test_apply_weights_reproduces_virtual() -> None:
    anchors = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    virtual, weights = torch_ops.simple_interpolation(anchors, 0.6)
    assert torch.equal(torch_ops.apply_weights(weights, anchors), virtual)
    # Weights from the numpy service path, re-applied to live torch embeddings.
    _, np_weights = edis.simple_interpolation(anchors.numpy(), 0.6)
    live = torch_ops.apply_weights(torch.from_numpy(np_weights), anchors)
    assert torch.allclose(live, virtual, atol=1e-5)


def test_gradients_reach_every_anchor_and_the_positive() -> None:
    gen = torch.Generator().manual_seed(2)
    anchors = torch.randn(2, 2, 5, 8, generator=gen, requires_grad=True)
    positive = torch.randn(2, 8, generator=gen, requires_grad=True)
    hard = torch.randn(2, 3, 8, generator=gen, requires_grad=True)
    user = torch.randn(2, 8, generator=gen)
    virtual, _ = torch_ops.simple_interpolation(anchors, 0.6)
    virtual_hard = torch_ops.hard_interpolation(positive, hard, 0.1)
    negatives = torch.cat([virtual.reshape(2, -1, 8), virtual_hard], dim=1)
    logits = torch.einsum("bd,bnd->bn", user, negatives)
    torch.logsumexp(logits, dim=1).sum().backward()  # type: ignore[no-untyped-call]
    for grad in (anchors.grad, positive.grad, hard.grad):
        assert grad is not None and torch.isfinite(grad).all()
    assert anchors.grad is not None and positive.grad is not None and hard.grad is not None
    assert (anchors.grad.abs().sum(dim=-1) > 0).all()  # every anchor of every cluster
    assert (positive.grad.abs().sum(dim=-1) > 0).all()
    assert (hard.grad.abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("eta", [0.6, 1.0])
def test_gradcheck_simple(eta: float) -> None:
    gen = torch.Generator().manual_seed(4)
    anchors = torch.randn(2, 1, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_ops.simple_interpolation(x, eta)

    assert torch.autograd.gradcheck(fn, (anchors,))


def test_gradcheck_hard() -> None:
    gen = torch.Generator().manual_seed(5)
    pos = torch.randn(2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    hard = torch.randn(2, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch_ops.hard_interpolation(p, h, 0.1)

    assert torch.autograd.gradcheck(fn, (pos, hard))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(dtype: torch.dtype) -> None:
    anchors = torch.randn(2, 2, 5, 4, generator=torch.Generator().manual_seed(3))
    reference, _ = torch_ops.simple_interpolation(anchors, 0.6)
    virtual, weights = torch_ops.simple_interpolation(anchors.to(dtype), 0.6)
    assert virtual.dtype == weights.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float64 else 3e-2
    assert torch.allclose(virtual.float(), reference, atol=tolerance)


@pytest.mark.parametrize("lam", [1.0, 2.0, float("nan")])
def test_bad_lam_rejected(lam: float) -> None:
    with pytest.raises(InvalidInputError, match="lam"):
        torch_ops.hard_interpolation(torch.ones(2, 3), torch.ones(2, 1, 3), lam)


@pytest.mark.parametrize("eta", [-1.0, float("nan"), float("inf")])
def test_bad_eta_rejected(eta: float) -> None:
    with pytest.raises(InvalidInputError, match="eta"):
        torch_ops.simple_interpolation(torch.ones(1, 1, 3, 2), eta)


def test_shape_and_dtype_errors() -> None:
    with pytest.raises(InvalidInputError, match="anchors"):
        torch_ops.simple_interpolation(torch.ones(4))
    with pytest.raises(InvalidInputError, match="floating-point"):
        torch_ops.simple_interpolation(torch.ones(1, 1, 3, 2, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="positive"):
        torch_ops.hard_interpolation(torch.ones(2, 3), torch.ones(3, 1, 3))
    with pytest.raises(InvalidInputError, match="apply_weights"):
        torch_ops.apply_weights(torch.ones(2, 5, 3), torch.ones(2, 4, 8))
    with pytest.raises(InvalidInputError, match="broadcast"):
        torch_ops.apply_weights(torch.ones(2, 5, 3), torch.ones(3, 3, 8))
    with pytest.raises(InvalidInputError, match="edis_similarity"):
        torch_ops.edis_similarity(torch.ones(2, 3), torch.ones(2, 4))


@pytest.mark.parametrize("eta", [0.0, 50.0])
def test_extreme_eta_and_zero_anchor_keep_finite_gradients(eta: float) -> None:
    anchors = torch.randn(2, 1, 4, 3, generator=torch.Generator().manual_seed(6))
    anchors[0, 0, 2] = 0.0  # a zero vector (a padded or dead embedding)
    anchors.requires_grad_()
    virtual, weights = torch_ops.simple_interpolation(anchors, eta)
    np_virtual, _ = edis.simple_interpolation(anchors.detach().numpy(), eta)
    assert np.allclose(virtual.detach().numpy(), np_virtual, atol=1e-5)
    assert torch.isfinite(weights).all()
    virtual.square().sum().backward()  # type: ignore[no-untyped-call]
    assert anchors.grad is not None and torch.isfinite(anchors.grad).all()
