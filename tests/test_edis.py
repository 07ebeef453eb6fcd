from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from esans_sampler import edis
from esans_sampler.edis import (
    MAX_ETA,
    SIM_FLOOR,
    apply_weights,
    edis_from_rows,
    edis_similarity,
    gather_rows,
    hard_interpolation,
    interpolation_schedule,
    simple_interpolation,
)
from esans_sampler.errors import InvalidInputError


def _explicit_simple(anchors: npt.NDArray[np.float64], eta: float) -> npt.NDArray[np.float64]:
    """eq. 11-12 written out with loops, in float64: (m_o, d) -> (T, d)."""

    def sim(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
        cos = float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))
        return float(np.clip((cos + 1.0) / 2.0, SIM_FLOOR, 1.0))

    out = []
    for n_o in range(2, anchors.shape[0] + 1):
        for a in range(n_o):
            numer = [sim(anchors[a], anchors[i]) ** eta for i in range(n_o)]
            total = sum(numer)
            out.append(sum((numer[i] / total) * anchors[i] for i in range(n_o)))
    return np.array(out).reshape(-1, anchors.shape[1])


@pytest.mark.parametrize(("m_o", "expected"), [(1, 0), (2, 2), (3, 5), (5, 14), (8, 35)])
def test_schedule_counts(m_o: int, expected: int) -> None:
    anchor, prefix = interpolation_schedule(m_o)
    assert anchor.shape == prefix.shape == (expected,)
    assert expected == m_o * (m_o + 1) // 2 - 1  # 2 + 3 + ... + m_o
    assert anchor.dtype == prefix.dtype == np.int64
    pairs = [(int(a), int(n)) for a, n in zip(anchor, prefix, strict=True)]
    assert pairs == [(a, n) for n in range(2, m_o + 1) for a in range(n)]


@pytest.mark.parametrize("m_o", [0, -3])
def test_schedule_rejects_bad_m_o(m_o: int) -> None:
    with pytest.raises(InvalidInputError):
        interpolation_schedule(m_o)


def test_schedule_result_is_a_private_copy() -> None:
    anchor, _ = interpolation_schedule(4)
    anchor[:] = 99
    assert interpolation_schedule(4)[0][0] == 0


def test_similarity_range_and_values() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    sim = edis_similarity(a, a)
    assert sim.shape == (4, 4) and sim.dtype == np.float32
    assert sim[0, 0] == pytest.approx(1.0)
    assert sim[0, 1] == pytest.approx(0.5)
    assert sim[0, 2] == pytest.approx(SIM_FLOOR)  # opposite vectors hit the floor
    assert np.allclose(sim[3], 0.5)  # a zero vector has cosine 0 with everything
    assert np.all((sim >= SIM_FLOOR) & (sim <= 1.0))


def test_similarity_rejects_bad_input() -> None:
    with pytest.raises(InvalidInputError, match="NaN"):
        edis_similarity(np.array([[np.nan, 1.0]]), np.ones((2, 2)))
    with pytest.raises(InvalidInputError, match=r"\(\.\.\., n, d\)"):
        edis_similarity(np.ones((2, 3)), np.ones((2, 4)))


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0, 3.0])
@pytest.mark.parametrize("m_o", [1, 2, 5])
def test_weights_are_convex_and_zero_past_the_prefix(eta: float, m_o: int) -> None:
    rng = np.random.default_rng(m_o)
    anchors = rng.standard_normal((4, 2, m_o, 8)).astype(np.float32)
    virtual, weights = simple_interpolation(anchors, eta)
    t = m_o * (m_o + 1) // 2 - 1
    assert virtual.shape == (4, 2, t, 8) and weights.shape == (4, 2, t, m_o)
    assert virtual.dtype == weights.dtype == np.float32
    assert np.all(weights >= 0)
    assert np.allclose(weights.sum(axis=-1), 1.0, atol=1e-6)
    _, prefix = interpolation_schedule(m_o)
    past_prefix = np.arange(m_o)[None, :] >= prefix[:, None]
    assert np.all(weights[..., past_prefix] == 0)
    # Convex hull: each virtual point is a convex combination of its cluster's anchors.
    assert np.allclose(virtual, apply_weights(weights, anchors), atol=0)


def test_hand_computed_example() -> None:
    anchors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    virtual, weights = simple_interpolation(anchors[None, None], eta=1.0)
    s = (np.sqrt(0.5) + 1) / 2  # sim of a diagonal against an axis
    expected_weights = np.array(
        [
            [1 / 1.5, 0.5 / 1.5, 0],  # n_o = 2, anchor 0: sims (1, 0.5)
            [0.5 / 1.5, 1 / 1.5, 0],  # n_o = 2, anchor 1
            [1 / (1.5 + s), 0.5 / (1.5 + s), s / (1.5 + s)],  # n_o = 3, anchor 0
            [0.5 / (1.5 + s), 1 / (1.5 + s), s / (1.5 + s)],
            [s / (1 + 2 * s), s / (1 + 2 * s), 1 / (1 + 2 * s)],
        ]
    )
    assert np.allclose(weights[0, 0], expected_weights, atol=1e-6)
    assert np.allclose(virtual[0, 0], expected_weights @ anchors, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.6, 2.0])
def test_matches_explicit_formula(eta: float) -> None:
    rng = np.random.default_rng(7)
    anchors = rng.standard_normal((3, 2, 5, 6)).astype(np.float32)
    virtual, _ = simple_interpolation(anchors, eta)
    for b in range(3):
        for c in range(2):
            expected = _explicit_simple(anchors[b, c].astype(np.float64), eta)
            assert np.allclose(virtual[b, c], expected, atol=1e-5)


def test_eta_zero_gives_prefix_means() -> None:
    rng = np.random.default_rng(1)
    anchors = rng.standard_normal((1, 1, 4, 3)).astype(np.float32)
    virtual, _ = simple_interpolation(anchors, eta=0.0)
    _, prefix = interpolation_schedule(4)
    means = np.array([anchors[0, 0, :n].mean(axis=0) for n in prefix])
    assert np.allclose(virtual[0, 0], means, atol=1e-6)


def test_large_eta_stays_finite_and_favours_the_anchor() -> None:
    rng = np.random.default_rng(2)
    anchors = rng.standard_normal((2, 1, 5, 4)).astype(np.float32)
    anchors[0, 0, 3] = 0.0  # a zero vector too
    virtual, weights = simple_interpolation(anchors, eta=MAX_ETA)
    assert np.isfinite(virtual).all() and np.isfinite(weights).all()
    anchor_idx, _ = interpolation_schedule(5)
    own = np.take_along_axis(weights[1, 0], anchor_idx[:, None], axis=1)[:, 0]
    assert np.allclose(own, 1.0, atol=1e-4)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf"), "x", 1000.5, 1e39])
def test_bad_eta_rejected(eta: float) -> None:
    with pytest.raises(InvalidInputError, match="eta"):
        simple_interpolation(np.ones((1, 1, 3, 2), dtype=np.float32), eta)


def test_non_finite_anchors_rejected() -> None:
    anchors = np.ones((2, 1, 3, 2), dtype=np.float32)
    anchors[1, 0, 2, 1] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        simple_interpolation(anchors)


@pytest.mark.parametrize("shape", [(3,), (1, 0, 2)])
def test_bad_anchor_shape_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidInputError, match="anchors"):
        simple_interpolation(np.ones(shape, dtype=np.float32))


@pytest.mark.parametrize("lam", [0.1, -0.1, 0.0, 0.9])
def test_hard_interpolation(lam: float) -> None:
    rng = np.random.default_rng(3)
    pos = rng.standard_normal((4, 6)).astype(np.float32)
    hard = rng.standard_normal((4, 3, 6)).astype(np.float32)
    out = hard_interpolation(pos, hard, lam)
    assert out.shape == (4, 3, 6) and out.dtype == np.float32
    assert np.allclose(out, lam * pos[:, None, :] + (1 - lam) * hard, atol=1e-6)


@pytest.mark.parametrize("lam", [1.0, 1.5, float("nan"), float("inf"), -1000.5, -1e39])
def test_bad_lam_rejected(lam: float) -> None:
    with pytest.raises(InvalidInputError, match="lam"):
        hard_interpolation(np.ones((2, 3), np.float32), np.ones((2, 1, 3), np.float32), lam)


def test_hard_shape_and_nan_rejected() -> None:
    with pytest.raises(InvalidInputError, match="positive"):
        hard_interpolation(np.ones((2, 3), np.float32), np.ones((3, 1, 3), np.float32))
    hard = np.ones((2, 1, 3), np.float32)
    hard[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        hard_interpolation(np.ones((2, 3), np.float32), hard)


def test_apply_weights_shape_errors() -> None:
    with pytest.raises(InvalidInputError, match="apply_weights"):
        apply_weights(np.ones((2, 5, 3), np.float32), np.ones((2, 4, 8), np.float32))
    with pytest.raises(InvalidInputError, match="broadcast"):
        apply_weights(np.ones((2, 5, 3), np.float32), np.ones((3, 3, 8), np.float32))


def test_gather_rows_pads_with_zeros() -> None:
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows = np.array([[2, -1], [0, 3]])
    out = gather_rows(table, rows)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    assert np.array_equal(out[0, 0], table[2]) and np.array_equal(out[1, 1], table[3])
    assert np.all(out[0, 1] == 0)
    assert table[0, 0] == 0 and table[2, 0] == 6  # table untouched
    assert gather_rows(table, np.zeros((0, 2), dtype=np.int64)).shape == (0, 2, 3)


@pytest.mark.parametrize("rows", [[4], [-2], [0.5]])
def test_gather_rows_rejects_bad_rows(rows: list[float]) -> None:
    with pytest.raises(InvalidInputError, match="rows"):
        gather_rows(np.ones((4, 3), np.float32), np.array(rows))


def test_edis_from_rows_matches_the_parts() -> None:
    rng = np.random.default_rng(4)
    table = rng.standard_normal((50, 8)).astype(np.float32)
    pos = rng.integers(0, 50, 6)
    simple = rng.integers(0, 50, (6, 2, 5))
    hard = rng.integers(0, 50, (6, 3))
    hard[1, 2] = -1
    hard[4, :] = -1
    result = edis_from_rows(table, pos, simple, hard, eta=0.6, lam=0.1)
    virtual, weights = simple_interpolation(table[simple], 0.6)
    assert np.array_equal(result.virtual_simple, virtual)
    assert np.array_equal(result.simple_weights, weights)
    assert np.array_equal(result.hard_valid, hard >= 0)
    expected_hard = hard_interpolation(table[pos], table[hard], 0.1)
    valid = hard >= 0
    assert np.allclose(result.virtual_hard[valid], expected_hard[valid])
    assert np.all(result.virtual_hard[~valid] == 0)
    assert result.virtual_hard.shape == (6, 3, 8)
    # The gathered rows come back too, as gather_rows gives them (zero vectors for padding).
    assert np.array_equal(result.positive, gather_rows(table, pos))
    assert np.array_equal(result.simple, gather_rows(table, simple))
    assert np.array_equal(result.hard, gather_rows(table, hard))


def test_edis_from_rows_validates_rows() -> None:
    table = np.ones((10, 4), np.float32)
    ok_simple, ok_hard = np.zeros((2, 1, 3), np.int64), np.zeros((2, 2), np.int64)
    with pytest.raises(InvalidInputError, match="simple_rows"):
        edis_from_rows(table, [0, 1], np.full((2, 1, 3), -1), ok_hard)
    with pytest.raises(InvalidInputError, match="positive_rows"):
        edis_from_rows(table, [0, -1], ok_simple, ok_hard)
    with pytest.raises(InvalidInputError, match="batch sizes"):
        edis_from_rows(table, [0, 1, 2], ok_simple, ok_hard)
    with pytest.raises(InvalidInputError, match="rows must be"):
        edis_from_rows(table, [0, 1], ok_simple[:, 0], ok_hard)


def test_edis_module_does_not_import_torch() -> None:
    tree = ast.parse(Path(edis.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert "torch" not in imported
