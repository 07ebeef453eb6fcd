"""Exact vectorised random draws: distinct integers per row, uniformly ordered.

:func:`draw_distinct` picks, for each row r of a batch, min(m, A_r) distinct integers from
[0, A_r) in uniformly random order: every ordered selection is equally likely, so each slot
is uniform over [0, A_r). :func:`fill_distinct` is the same draw written in place,
slot-major, as the ESANS hard-negative draw (sec. 3.3.3) uses it. NumPy only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# Rejection rounds of the draw before the remaining rows go to Floyd's algorithm.
_HARD_REJECTION_ROUNDS = 3
# Up to this many slots, repeats are found by comparing all slot pairs; beyond, by sorting.
_PAIRWISE_REPEAT_CHECK_MAX = 16


def draw_distinct(available: IdArray, m: int, rng: np.random.Generator) -> tuple[IdArray, IdArray]:
    """Per row, min(m, A) distinct integers from [0, A) in uniformly random order.

    available: (B,) int64 A per row. Returns picks (B, m) int64 (0 past the count) and
    counts (B,) int64 = min(m, A). Every ordered selection of distinct values is equally
    likely, so each slot is uniform over [0, A).

    Rows with A > m try m draws with replacement and keep them if all differ, which is
    exactly uniform over distinct ordered tuples; rows still rejected after a few rounds, and
    rows with A <= m, use Floyd's algorithm followed by a random shuffle, which has the same
    law. With A much larger than m nearly every row is accepted at once.
    """
    picks = np.empty((m, available.shape[0]), dtype=np.int64)
    counts = fill_distinct(picks, rng.random(picks.shape), available, True, rng)
    if counts is None:
        counts = np.full(available.shape[0], m, dtype=np.int64)
    return np.ascontiguousarray(picks.T), counts


def fill_distinct(
    picks: IdArray,
    u: FloatArray,
    available: npt.NDArray[np.integer],
    may_be_short: bool,
    rng: np.random.Generator,
) -> IdArray | None:
    """:func:`draw_distinct` written into ``picks`` (m, B), slot-major, from uniforms ``u``.

    ``u`` (m, B) float64 is overwritten. Returns the counts (B,) int64, or None when every
    row got m picks. ``may_be_short`` False promises every A > m (skips that check).
    """
    m = picks.shape[0]
    u *= available
    # floor(u * n) < n for every double u < 1 and integer n < 2**53, so no clamp is needed.
    np.copyto(picks, u, casting="unsafe")
    small = available <= m if may_be_short else None
    if small is not None and small.any():
        # Cannot be filled by rejection (A < m) or rarely so (A == m): Floyd's algorithm.
        pending = np.flatnonzero(_has_repeat(picks) & ~small)
    else:
        small = None
        pending = np.flatnonzero(_has_repeat(picks))
        if pending.size == 0:
            return None
    for _ in range(_HARD_REJECTION_ROUNDS - 1):
        if pending.size == 0:
            break
        # Redraw whole rows: a row kept only once all its slots differ is exactly uniform.
        draw = _uniform_below(available[pending], m, rng)
        picks[:, pending] = draw  # rows that clash again are redrawn below
        pending = pending[_has_repeat(draw)]
    rest = pending if small is None else np.concatenate((np.flatnonzero(small), pending))
    if rest.size:
        picks[:, rest] = _floyd_shuffled(available[rest].astype(np.int64), m, rng).T
    if small is None:
        return None
    counts: IdArray = np.minimum(available, m).astype(np.int64)
    return counts


def _uniform_below(bound: npt.NDArray[np.integer], m: int, rng: np.random.Generator) -> IdArray:
    """(m, R) int64 independent uniform integers in [0, bound[r]) (0 where bound is 0)."""
    u = rng.random((m, bound.shape[0]))
    u *= bound
    # floor(u * n) < n for every double u < 1 and integer n < 2**53, so no clamp is needed.
    drawn: IdArray = u.astype(np.int64)
    return drawn


def _has_repeat(values: IdArray) -> npt.NDArray[np.bool_]:
    """(R,) bool: whether column r of values (m, R) holds some value twice."""
    m, r = values.shape
    if m < 2:
        return np.zeros(r, dtype=np.bool_)
    if m <= _PAIRWISE_REPEAT_CHECK_MAX:
        # Every pair (i, i + lag), one comparison call per lag, into one (m(m-1)/2, R) array.
        equal = np.empty((m * (m - 1) // 2, r), dtype=np.bool_)
        start = 0
        for lag in range(1, m):
            np.equal(values[lag:], values[:-lag], out=equal[start : start + m - lag])
            start += m - lag
        repeat: npt.NDArray[np.bool_] = np.logical_or.reduce(equal, axis=0)
        return repeat
    ordered = np.sort(values, axis=0)
    found: npt.NDArray[np.bool_] = np.logical_or.reduce(ordered[1:] == ordered[:-1], axis=0)
    return found


def _floyd_shuffled(available: IdArray, m: int, rng: np.random.Generator) -> IdArray:
    """Floyd's subset algorithm vectorised over rows (loop over the m steps), then shuffled.

    available: (R,) int64 A >= 1. Returns (R, m) int64: min(m, A) distinct values of [0, A)
    in uniformly random order, then 0 as padding.
    """
    rows = available.shape[0]
    take = np.minimum(available, m)
    chosen = np.zeros((rows, m), dtype=np.int64)
    # Floyd: for j = A - t .. A - 1 draw x in [0, j]; take x unless already taken, then j.
    for step in range(m):
        j = available - take + step  # only meaningful where step < take
        u = rng.random(rows)
        x = np.minimum((u * (j + 1)).astype(np.int64), j)
        taken = (chosen[:, :step] == x[:, None]).any(axis=1)
        chosen[:, step] = np.where(taken, j, x)
    # Floyd picks a uniform subset but not a uniform order: shuffle the real entries.
    filled = np.arange(m) < take[:, None]
    keys = np.where(filled, rng.random((rows, m)), np.inf)
    order = np.argsort(keys, axis=1, kind="stable")
    shuffled = np.take_along_axis(chosen, order, axis=1)
    result: IdArray = np.where(filled, shuffled, 0)
    return result
