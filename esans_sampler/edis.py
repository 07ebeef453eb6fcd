"""EDIS: virtual negatives by interpolating embeddings (paper eq. 11-13), in numpy.

This is the torch-free implementation the service runs over a stored embedding snapshot.
``torch_ops.py`` holds the differentiable twin that a trainer runs over live embeddings;
the two compute the same numbers (same similarity, same floor, same schedule).

Simple interpolation (eq. 11-12). Per drawn cluster the anchors ``v_0 .. v_{m_o-1}`` are
taken in drawn order. For every prefix length ``n_o = 2 .. m_o`` and every anchor index
``a < n_o`` there is one virtual negative

    w_i = sim(v_a, v_i)^eta / sum_{j < n_o} sim(v_a, v_j)^eta   for i < n_o, else 0
    virtual = sum_i w_i v_i

so a cluster yields ``T = 2 + 3 + ... + m_o`` of them (14 for m_o = 5), each a convex
combination of its anchors. ``sim(a, b) = (cos(a, b) + 1) / 2`` (spec §4), floored at
``SIM_FLOOR`` so that ``sim^eta`` keeps a finite gradient in the torch twin.

Hard interpolation (eq. 13): ``virtual_h = lam * v_pos + (1 - lam) * v_h``.

The weights are returned with the vectors: ``virtual == apply_weights(weights, anchors)``,
so a trainer in any framework can re-apply them to its own live embeddings of the same
items and keep the gradient path of the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from esans_sampler.errors import InvalidInputError

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Smallest similarity used in the weights: keeps sim^eta (and its gradient) finite.
SIM_FLOOR = 1e-6
# Norms below this are treated as this when normalising (zero vectors: cosine 0).
NORM_EPS = 1e-12


def interpolation_schedule(m_o: int) -> tuple[IdArray, IdArray]:
    """The (anchor, prefix length) pair of every virtual negative of one cluster (eq. 12).

    Returns ``anchor`` (T,) int64 and ``prefix`` (T,) int64, ordered by ``n_o = 2 .. m_o``
    and, inside each, ``a = 0 .. n_o - 1``; ``T = 2 + 3 + ... + m_o`` (0 for ``m_o = 1``).
    """
    if isinstance(m_o, bool) or not isinstance(m_o, int | np.integer) or m_o < 1:
        raise InvalidInputError(f"m_o must be an integer >= 1, got {m_o!r}")
    anchor, prefix = _schedule(int(m_o))
    return anchor.copy(), prefix.copy()


def schedule_mask(m_o: int) -> tuple[IdArray, FloatArray]:
    """Read-only ``anchor`` (T,) int64 and prefix ``mask`` (T, m_o) float32, cached per m_o.

    ``mask[t, i]`` is 1 where anchor ``i`` takes part in virtual negative ``t``
    (``i < prefix[t]``), else 0.
    """
    if m_o < 1:
        raise InvalidInputError(f"m_o must be >= 1, got {m_o}")
    return _schedule_mask(int(m_o))


@lru_cache(maxsize=64)
def _schedule(m_o: int) -> tuple[IdArray, IdArray]:
    sizes = np.arange(2, m_o + 1, dtype=np.int64)
    prefix = np.repeat(sizes, sizes)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    anchor = np.arange(prefix.shape[0], dtype=np.int64) - starts
    anchor.setflags(write=False)
    prefix.setflags(write=False)
    return anchor, prefix


@lru_cache(maxsize=64)
def _schedule_mask(m_o: int) -> tuple[IdArray, FloatArray]:
    anchor, prefix = _schedule(m_o)
    mask = (np.arange(m_o)[None, :] < prefix[:, None]).astype(np.float32)
    mask.setflags(write=False)
    return anchor, mask


@lru_cache(maxsize=64)
def _weight_map(m_o: int) -> FloatArray:
    """0/1 matrix (m_o * m_o, 2 * T * m_o) turning powered similarities into eq. 11 terms.

    With ``p`` the (m_o * m_o,) flattened ``sim(v_a, v_i)^eta`` of one cluster (index
    ``a * m_o + i``), ``p @ map`` holds first the masked numerators (entry ``t * m_o + i``
    is ``p[a_t * m_o + i]`` for ``i < n_t``, else 0), then the same layout filled with each
    entry's denominator ``sum_{j < n_t} p[a_t * m_o + j]``. One small constant GEMM thus
    replaces a gather, a mask, a sum over a length-m_o axis and a broadcast, which numpy
    runs several times slower, and leaves one contiguous division.
    """
    anchor, mask = _schedule_mask(m_o)
    t_idx, i_idx = np.nonzero(mask)
    t = anchor.shape[0]
    pick = np.zeros((m_o * m_o, t, m_o), dtype=np.float32)
    pick[anchor[t_idx] * m_o + i_idx, t_idx, i_idx] = 1.0
    total = np.repeat(pick.sum(axis=2, keepdims=True), m_o, axis=2)
    weight_map = np.concatenate([pick, total], axis=1).reshape(m_o * m_o, 2 * t * m_o)
    weight_map.setflags(write=False)
    return weight_map


def edis_similarity(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Pairwise EDIS similarity ``clip((cos + 1) / 2, SIM_FLOOR, 1)`` (spec §4).

    ``a`` (..., n, d) and ``b`` (..., k, d) with broadcastable leading dimensions give
    (..., n, k) float32. Zero vectors have cosine 0 with everything (similarity 0.5).
    """
    a32 = _as_float32(a, "a")
    b32 = _as_float32(b, "b")
    if a32.ndim < 2 or b32.ndim < 2 or a32.shape[-1] != b32.shape[-1]:
        raise InvalidInputError(
            f"edis_similarity needs (..., n, d) and (..., k, d), got {a32.shape} and {b32.shape}"
        )
    if not (np.isfinite(a32).all() and np.isfinite(b32).all()):
        raise InvalidInputError("edis_similarity inputs contain NaN or infinite values")
    return _similarity(_unit(a32), _unit(b32))


def simple_interpolation(anchors: npt.ArrayLike, eta: float = 0.6) -> tuple[FloatArray, FloatArray]:
    """Virtual simple negatives of every drawn cluster (eq. 11-12).

    ``anchors`` (B, m_c, m_o, d) float32: the simple negatives of each positive, grouped by
    drawn cluster, in drawn order (any leading shape ``(..., m_o, d)`` works).
    ``eta`` >= 0 sharpens the weights towards anchors similar to the one in focus; 0 gives
    plain prefix means.

    Returns ``virtual`` (B, m_c, T, d) float32 and ``weights`` (B, m_c, T, m_o) float32
    with ``T = 2 + ... + m_o``; rows of ``weights`` are >= 0, sum to 1 and are 0 past the
    prefix, and ``virtual == apply_weights(weights, anchors)``.
    """
    x = _as_float32(anchors, "anchors")
    if x.ndim < 2 or x.shape[-2] < 1:
        raise InvalidInputError(f"anchors must be (..., m_o, d) with m_o >= 1, got {x.shape}")
    eta32 = np.float32(check_eta(eta))
    m_o, d = x.shape[-2:]
    # Anchor-major view (m_o, n, d) of the n clusters (no copy for anchor-major input).
    slot_major = np.moveaxis(x.reshape(-1, m_o, d), 1, 0)
    weights = _simple_weights(slot_major, eta32)
    weights = weights.reshape(*x.shape[:-2], -1, m_o)
    return apply_weights(weights, x), weights


def _simple_weights(x: FloatArray, eta: np.float32) -> FloatArray:
    """eq. 11 weights (n, T * m_o) float32 of the n clusters of anchors ``x`` (m_o, n, d).

    Everything before the final GEMM is laid out pair-major, (pairs, n), so that every
    per-anchor value broadcasts along contiguous rows of length n.
    """
    m_o, n, _ = x.shape
    weight_map = _weight_map(m_o)
    first, second, diagonal, full = _pair_layout(m_o)
    # The Gram matrices' upper triangles (pair (i, j), i <= j, per row), one batched dot
    # product per anchor i; then cosines from the diagonal (the squared norms).
    sim = np.empty((first.shape[0], n), dtype=np.float32)
    start = 0
    for i in range(m_o):
        np.einsum("jnd,nd->jn", x[i:], x[i], out=sim[start : start + m_o - i])
        start += m_o - i
    inv_norms = sim.take(diagonal, axis=0)
    if not np.isfinite(inv_norms).all():
        raise InvalidInputError("anchors contain NaN or infinite values (or overflow float32)")
    np.sqrt(inv_norms, out=inv_norms)
    np.maximum(inv_norms, np.float32(NORM_EPS), out=inv_norms)
    np.divide(np.float32(1), inv_norms, out=inv_norms)
    scale = inv_norms.take(first, axis=0)
    scale *= inv_norms.take(second, axis=0)
    sim *= scale
    # spec §4's mapping to [SIM_FLOOR, 1], then eq. 11 numerators sim(v_a, v_i)^eta =
    # exp(eta * log sim), each row a divided by its self-similarity sim(v_a, v_a) (its
    # maximum): the weights are unchanged, but nothing underflows to 0 / 0 however large
    # eta is.
    log_sim = np.log(_to_similarity(sim), out=sim)
    powered = log_sim.take(full, axis=0).reshape(m_o, m_o, n)  # (a, i, n)
    powered -= log_sim.take(diagonal, axis=0)[:, None, :]
    powered *= eta
    np.exp(powered, out=powered)
    # (n, 2 * T * m_o): numerators | their denominators, from the pair-major layout read
    # transposed by the GEMM itself.
    terms = powered.reshape(m_o * m_o, n).T @ weight_map
    t_m = weight_map.shape[1] // 2
    weights: FloatArray = np.divide(terms[:, :t_m], terms[:, t_m:])  # eq. 11
    return weights


@lru_cache(maxsize=64)
def _pair_layout(m_o: int) -> tuple[IdArray, IdArray, IdArray, IdArray]:
    """Rows of the upper-triangle layout used by :func:`_simple_weights`.

    Pairs (i, j), i <= j, are ordered by i then j. Returns the ``first`` and ``second``
    anchor of each pair, the rows of the ``diagonal`` pairs (i, i), and for every full
    index ``a * m_o + i`` the row of pair (min(a, i), max(a, i)).
    """
    first, second = np.triu_indices(m_o)
    row = np.zeros((m_o, m_o), dtype=np.int64)
    row[first, second] = np.arange(first.shape[0])
    row[second, first] = row[first, second]
    layout = (first.astype(np.int64), second.astype(np.int64), np.diagonal(row).copy(), row.ravel())
    for array in layout:
        array.setflags(write=False)
    return layout


def hard_interpolation(
    positive: npt.ArrayLike, hard: npt.ArrayLike, lam: float = 0.1
) -> FloatArray:
    """Virtual hard negatives ``lam * v_pos + (1 - lam) * v_h`` (eq. 13).

    ``positive`` (B, d) and ``hard`` (B, m_h, d) float32 give (B, m_h, d) float32.
    ``lam`` in (0, 1) moves each hard negative towards its positive (harder), ``lam < 0``
    away from it (easier); ``lam >= 1`` would reach or pass the positive and is rejected.
    """
    pos = _as_float32(positive, "positive")
    h = _as_float32(hard, "hard")
    if pos.ndim != 2 or h.ndim != 3 or h.shape[0] != pos.shape[0] or h.shape[2] != pos.shape[1]:
        raise InvalidInputError(
            f"hard_interpolation needs positive (B, d) and hard (B, m_h, d), "
            f"got {pos.shape} and {h.shape}"
        )
    return _hard_interpolation(pos, h, check_lam(lam), out=None)


def _hard_interpolation(
    pos: FloatArray, hard: FloatArray, lam: float, out: FloatArray | None
) -> FloatArray:
    # eq. 13, written into ``out`` (which may be ``hard`` itself) or a new array.
    lam32 = np.float32(lam)
    result: FloatArray = np.multiply(hard, np.float32(1) - lam32, out=out)
    result += lam32 * pos[:, None, :]
    # Any NaN or inf in either input (even with lam = 0: 0 * nan = nan) shows in the result.
    if not np.isfinite(result).all():
        raise InvalidInputError("positive or hard embeddings contain NaN or infinite values")
    return result


def apply_weights(weights: npt.ArrayLike, anchors: npt.ArrayLike) -> FloatArray:
    """Re-apply interpolation ``weights`` (..., T, m_o) to ``anchors`` (..., m_o, d).

    Returns (..., T, d) float32: ``virtual[t] = sum_i weights[t, i] * anchors[i]`` (eq. 11).
    ``simple_interpolation`` computes its vectors with this very function.
    """
    w = _as_float32(weights, "weights")
    x = _as_float32(anchors, "anchors")
    if w.ndim < 2 or x.ndim < 2 or w.shape[-1] != x.shape[-2]:
        raise InvalidInputError(
            f"apply_weights needs weights (..., T, m_o) and anchors (..., m_o, d), "
            f"got {w.shape} and {x.shape}"
        )
    try:
        out: FloatArray = np.matmul(w, x)
    except ValueError as exc:
        raise InvalidInputError(
            f"leading shapes of weights {w.shape} and anchors {x.shape} do not broadcast"
        ) from exc
    return out


def gather_rows(table: npt.ArrayLike, rows: npt.ArrayLike) -> FloatArray:
    """Rows of ``table`` (N, d) at ``rows`` (...) int64; ``-1`` gives a zero vector.

    Returns (..., d) float32. Any other index outside ``[0, N)`` is rejected.
    """
    t = _as_float32(table, "table")
    r = np.asarray(rows)
    if t.ndim != 2:
        raise InvalidInputError(f"table must be (N, d), got {t.shape}")
    if r.dtype.kind not in "iu":
        raise InvalidInputError(f"rows must be integers, got dtype {r.dtype}")
    if r.size == 0:
        return np.zeros((*r.shape, t.shape[1]), dtype=np.float32)
    low, high = int(r.min()), int(r.max())
    if low < -1 or high >= t.shape[0]:
        raise InvalidInputError(f"rows must lie in [-1, {t.shape[0]}), got [{low}, {high}]")
    if low >= 0:
        return np.take(t, r, axis=0)
    padded = r < 0
    out: FloatArray = np.take(t, np.where(padded, 0, r), axis=0)
    out[padded] = 0.0
    return out


@dataclass(frozen=True)
class EdisResult:
    """EDIS output for a batch of B positives.

    virtual_simple: (B, m_c, T, d) float32, T = 2 + ... + m_o (eq. 11-12).
    simple_weights: (B, m_c, T, m_o) float32; ``virtual_simple == apply_weights(
        simple_weights, anchors)`` for the simple anchors (B, m_c, m_o, d).
    virtual_hard: (B, m_h, d) float32 (eq. 13); zero vectors in padded slots.
    hard_valid: (B, m_h) bool, False where the hard row was ``-1`` (padding).
    positive, simple, hard: the gathered rows the vectors were made from, (B, d),
        (B, m_c, m_o, d) (a view, anchor-major in memory) and (B, m_h, d) with zero vectors
        in padded slots, so a caller that also returns them need not gather them again.
    """

    virtual_simple: FloatArray
    simple_weights: FloatArray
    virtual_hard: FloatArray
    hard_valid: BoolArray
    positive: FloatArray
    simple: FloatArray
    hard: FloatArray


def edis_from_rows(
    table: npt.ArrayLike,
    positive_rows: npt.ArrayLike,
    simple_rows: npt.ArrayLike,
    hard_rows: npt.ArrayLike,
    eta: float = 0.6,
    lam: float = 0.1,
) -> EdisResult:
    """EDIS over a stored embedding ``table`` (N, d) float32, addressed by row.

    ``positive_rows`` (B,) int64, ``simple_rows`` (B, m_c, m_o) int64 (all valid: simple
    anchors are never padded), ``hard_rows`` (B, m_h) int64 with ``-1`` for padding
    (fewer hard negatives than asked). Padded hard slots give zero vectors and
    ``hard_valid`` False.
    """
    pos_r, simple_r, hard_r = (np.asarray(r) for r in (positive_rows, simple_rows, hard_rows))
    if pos_r.ndim != 1 or simple_r.ndim != 3 or hard_r.ndim != 2:
        raise InvalidInputError(
            f"rows must be positive (B,), simple (B, m_c, m_o) and hard (B, m_h), "
            f"got {pos_r.shape}, {simple_r.shape} and {hard_r.shape}"
        )
    if simple_r.shape[0] != pos_r.shape[0] or hard_r.shape[0] != pos_r.shape[0]:
        raise InvalidInputError(
            f"batch sizes differ: {pos_r.shape[0]}, {simple_r.shape[0]}, {hard_r.shape[0]}"
        )
    if pos_r.size and pos_r.min() < 0:
        raise InvalidInputError("positive_rows must not hold -1 padding")
    if simple_r.size and simple_r.min() < 0:
        raise InvalidInputError("simple_rows must not hold -1 padding")
    lam_value = check_lam(lam)
    # Gathered anchor-major ((m_o, B, m_c, d) in memory, viewed as (B, m_c, m_o, d)) so that
    # each anchor's rows are contiguous for the Gram dot products.
    anchors = np.moveaxis(gather_rows(table, np.moveaxis(simple_r, -1, 0)), 0, -2)
    virtual_simple, weights = simple_interpolation(anchors, eta)
    hard_valid = hard_r >= 0
    hard = gather_rows(table, hard_r)
    positive = gather_rows(table, pos_r)
    virtual_hard = _hard_interpolation(positive, hard, lam_value, out=None)
    if not hard_valid.all():
        virtual_hard[~hard_valid] = 0.0
    return EdisResult(virtual_simple, weights, virtual_hard, hard_valid, positive, anchors, hard)


def _similarity(unit_a: FloatArray, unit_b: FloatArray) -> FloatArray:
    return _to_similarity(np.matmul(unit_a, np.swapaxes(unit_b, -1, -2)))


def _to_similarity(cos: FloatArray) -> FloatArray:
    # spec §4: cosine mapped to [0, 1], floored so sim^eta stays differentiable (in place).
    cos += np.float32(1)
    cos *= np.float32(0.5)
    out: FloatArray = np.clip(cos, np.float32(SIM_FLOOR), np.float32(1), out=cos)
    return out


def _unit(x: FloatArray) -> FloatArray:
    norms = np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]
    unit: FloatArray = x / np.maximum(norms, np.float32(NORM_EPS))
    return unit


def _as_float32(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise InvalidInputError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    out: FloatArray = arr.astype(np.float32, copy=False)
    return out


# Beyond these the float32 arithmetic of EDIS overflows (eta scales a log before exp; lambda
# scales the positive), and they are far past any useful value: at eta = 1000 the weights are
# already one-hot on the anchor, and lambda = -1000 pushes a virtual hard negative 1000
# embedding-lengths away.
MAX_ETA = 1_000.0
MIN_LAMBDA = -1_000.0


def check_eta(eta: float) -> float:
    """``eta`` as a float; raises :class:`InvalidInputError` unless in [0, MAX_ETA]."""
    value = _as_scalar(eta, "eta")
    if not (math.isfinite(value) and 0 <= value <= MAX_ETA):
        raise InvalidInputError(f"eta must be a finite number in [0, {MAX_ETA:g}], got {eta!r}")
    return value


def check_lam(lam: float) -> float:
    """``lam`` as a float; raises :class:`InvalidInputError` unless in [MIN_LAMBDA, 1)."""
    value = _as_scalar(lam, "lam")
    if not (math.isfinite(value) and MIN_LAMBDA <= value < 1):
        raise InvalidInputError(
            f"lambda must be a finite number in [{MIN_LAMBDA:g}, 1), got {lam!r} "
            "(1 would put every virtual hard negative on its positive)"
        )
    return value


def _as_scalar(value: float, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name} must be a real number, got {value!r}") from exc
