"""Which other primary cluster a simple negative comes from (eq. 9), and how to draw it fast.

For a positive in primary cluster ``p`` the choice distribution over clusters ``i`` is

    s(i, p) = (cos(z_p[i], z_p[p]) + 1) / 2              (inner product, mapped to [0, 1])
    d(i, p) = max(1 - s(i, p), 1e-3)
    Q(i)    = d(i, p) ** -gamma   for i != p and cluster i non-empty, else 0
    P(i)    = Q(i) / sum_j Q(j)                           (eq. 9)

``cluster_choice_matrix`` builds every row ``P(. | p)`` at once; :class:`AliasTable` turns
rows of weights into Walker/Vose alias tables so that each draw costs O(1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from esans_sampler.errors import InvalidInputError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Floor on the cluster distance d(i, p), so that a near-duplicate codeword (d -> 0) gets a
# large but finite weight d ** -gamma.
MIN_CLUSTER_DISTANCE = 1e-3
# Beyond this, d ** -gamma already puts all the mass on the closest cluster(s), and
# -gamma * log d overflows float64 near 1e306.
MAX_GAMMA = 1_000.0
_NORM_EPS = 1e-12
_RECORD = np.dtype((np.void, 16))


def validate_gamma(gamma: float) -> float:
    """``gamma`` as a float; raises :class:`InvalidInputError` unless in [0, MAX_GAMMA]."""
    try:
        value = float(gamma)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"gamma must be a number, got {gamma!r}") from exc
    if not (np.isfinite(value) and 0.0 <= value <= MAX_GAMMA):
        raise InvalidInputError(f"gamma must lie in [0, {MAX_GAMMA:g}], got {gamma!r}")
    return value


def cluster_choice_matrix(
    primary_codewords: npt.ArrayLike, cluster_sizes: npt.ArrayLike, gamma: float
) -> FloatArray:
    """Row ``p`` is the cluster-choice distribution P(. | p) of eq. 9: (K_p, K_p) float64.

    primary_codewords: (K_p, d) primary codebook; cluster_sizes: (K_p,) items per cluster.
    The diagonal and the columns of empty clusters are 0; every other row sums to 1, except a
    row with no valid cluster at all (no non-empty cluster besides ``p``), which is all zero.
    """
    gamma = validate_gamma(gamma)
    codewords = np.asarray(primary_codewords, dtype=np.float64)
    sizes = np.asarray(cluster_sizes)
    if codewords.ndim != 2 or codewords.shape[0] < 1 or codewords.shape[1] < 1:
        raise InvalidInputError(f"primary_codewords must be (K_p, d), got {codewords.shape}")
    if not np.isfinite(codewords).all():
        raise InvalidInputError("primary_codewords contain NaN or infinite values")
    num_clusters = codewords.shape[0]
    if sizes.shape != (num_clusters,):
        raise InvalidInputError(f"cluster_sizes must be ({num_clusters},), got {sizes.shape}")
    if (sizes < 0).any():
        raise InvalidInputError("cluster_sizes must be >= 0")

    norms = np.linalg.norm(codewords, axis=1, keepdims=True)
    unit = codewords / np.maximum(norms, _NORM_EPS)
    cosine = np.clip(unit @ unit.T, -1.0, 1.0)
    similarity = (cosine + 1.0) / 2.0  # inner product mapped to [0, 1]
    distance = np.maximum(1.0 - similarity, MIN_CLUSTER_DISTANCE)

    valid = np.broadcast_to(sizes > 0, (num_clusters, num_clusters)).copy()
    np.fill_diagonal(valid, False)  # i != p (eq. 9)
    # log Q = -gamma log d; normalising in log space keeps large gamma from overflowing.
    log_q = np.where(valid, -gamma * np.log(distance), -np.inf)
    row_max = log_q.max(axis=1, keepdims=True)
    has_valid = valid.any(axis=1, keepdims=True)
    weights = np.where(valid, np.exp(log_q - np.where(has_valid, row_max, 0.0)), 0.0)
    totals = weights.sum(axis=1, keepdims=True)
    matrix: FloatArray = np.divide(
        weights, totals, out=np.zeros_like(weights), where=totals > 0.0
    )  # eq. 9: P = Q / sum Q
    return matrix


def effective_clusters(matrix: npt.ArrayLike) -> FloatArray:
    """exp(entropy) of each row of a choice matrix: (K_p,) float64; 0 for an all-zero row.

    A row spread evenly over n clusters scores n; a row dominated by one close cluster
    scores near 1.
    """
    probs = np.asarray(matrix, dtype=np.float64)
    if probs.ndim != 2:
        raise InvalidInputError(f"matrix must be 2-D, got shape {probs.shape}")
    safe = np.where(probs > 0.0, probs, 1.0)
    entropy = -(probs * np.log(safe)).sum(axis=1)
    result: FloatArray = np.where(probs.sum(axis=1) > 0.0, np.exp(entropy), 0.0)
    return result


@dataclass(frozen=True, eq=False)
class AliasTable:
    """Walker/Vose alias tables for R discrete distributions over K outcomes each.

    prob: (R, K) float64 chance of keeping column k; alias: (R, K) int64 outcome taken
    otherwise; valid: (R,) bool, False for a row whose weights were all zero (it cannot be
    drawn from). Drawing outcome k from row r: pick a column uniformly, keep it with
    probability ``prob[r, k]``, else take ``alias[r, k]``.
    """

    prob: FloatArray
    alias: IntArray
    valid: npt.NDArray[np.bool_]
    # (prob, alias) of each flat cell side by side, so a draw reads one 16-byte record.
    _records: npt.NDArray[np.void] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        pairs = np.empty((self.prob.size, 2), dtype=np.float64)
        pairs[:, 0] = self.prob.ravel()
        pairs[:, 1] = self.alias.ravel().view(np.float64)  # raw bits, read back as int64
        object.__setattr__(self, "_records", pairs.view(_RECORD).ravel())

    @classmethod
    def build(cls, weights: npt.ArrayLike) -> AliasTable:
        """Tables for (K,) or (R, K) non-negative weights (each row need not sum to 1)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim == 1:
            w = w[None, :]
        if w.ndim != 2 or w.shape[1] < 1:
            raise InvalidInputError(f"weights must be (K,) or (R, K) with K >= 1, got {w.shape}")
        if not np.isfinite(w).all() or (w < 0.0).any():
            raise InvalidInputError("weights must be finite and >= 0")
        num_rows, num_outcomes = w.shape
        prob = np.ones((num_rows, num_outcomes), dtype=np.float64)
        alias = np.broadcast_to(np.arange(num_outcomes, dtype=np.int64), w.shape).copy()
        totals = w.sum(axis=1)
        valid = totals > 0.0
        for r in np.flatnonzero(valid):
            _fill_row(w[r] * (num_outcomes / totals[r]), prob[r], alias[r])
        return cls(prob=prob, alias=alias, valid=valid)

    @property
    def num_rows(self) -> int:
        return int(self.prob.shape[0])

    @property
    def num_outcomes(self) -> int:
        return int(self.prob.shape[1])

    def probabilities(self) -> FloatArray:
        """The distributions the tables encode, recomputed from them: (R, K) float64."""
        num_rows, k = self.prob.shape
        out: FloatArray = self.prob / k
        flat_rows = np.repeat(np.arange(num_rows), k)
        np.add.at(out, (flat_rows, self.alias.ravel()), (1.0 - self.prob.ravel()) / k)
        out[~self.valid] = 0.0
        return out

    def draw(self, rows: npt.ArrayLike, rng: np.random.Generator) -> IntArray:
        """One outcome from each listed row: rows (n,) int -> (n,) int64 outcomes."""
        r = np.asarray(rows)
        if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
            raise InvalidInputError(f"rows must be a 1-D integer array, got {r.dtype} {r.shape}")
        r = r.astype(np.int64, copy=False)
        if r.size and (r.min() < 0 or r.max() >= self.num_rows):
            raise InvalidInputError(f"rows must lie in [0, {self.num_rows})")
        if not self.valid[r].all():
            bad = np.unique(r[~self.valid[r]])[:10].tolist()
            raise InvalidInputError(f"rows {bad} have no outcome with positive weight")
        return self.draw_unchecked(r, rng)

    def draw_row(self, row: int, size: int, rng: np.random.Generator) -> IntArray:
        """``size`` independent outcomes from one row: (size,) int64."""
        if not 0 <= row < self.num_rows or not self.valid[row]:
            raise InvalidInputError(f"row {row} is out of range or has no positive weight")
        return self.draw_flat(np.full(size, row * self.num_outcomes, dtype=np.int64), rng)

    def draw_unchecked(self, rows: IntArray, rng: np.random.Generator) -> IntArray:
        """:meth:`draw` without validation, for callers whose rows are valid by construction."""
        return self.draw_flat(rows * self.num_outcomes, rng)

    def draw_flat(self, row_starts: IntArray, rng: np.random.Generator) -> IntArray:
        """Unchecked draws given ``row_starts`` = rows * K: (n,) int64 -> (n,) int64 outcomes.

        For hot paths that need ``rows * K`` themselves (e.g. to look up per-pair tables).
        """
        return self.draw_flat_with(row_starts, rng.random(int(row_starts.shape[0])))

    def draw_flat_with(self, row_starts: IntArray, u: FloatArray) -> IntArray:
        """:meth:`draw_flat` consuming given uniforms ``u`` (n,) float64 in [0, 1), overwritten.

        For callers that draw every uniform of a batch in one generator call.
        """
        k = self.num_outcomes
        u *= k
        # floor(u * k) < k for every double u < 1 and integer k < 2**53: no clamp needed.
        col = u.astype(np.int64)
        records = self._records.take(row_starts + col).view(np.float64).reshape(-1, 2)
        # One uniform serves both choices: its integer part picks the column, the fraction
        # (uniform on [0, 1) and independent of the column) decides between the column and
        # its alias.
        u -= col
        keep = u < records[:, 0]
        drawn: IntArray = np.where(keep, col, records.view(np.int64)[:, 1])
        return drawn


def _fill_row(scaled: FloatArray, prob: FloatArray, alias: IntArray) -> None:
    """Alias table of one row whose weights ``scaled`` sum to K, written into prob/alias.

    Vectorised sweep form of Vose's method. Small outcomes (weight < 1) are topped up, in
    order, by the current large outcome; when a large one drops below 1 it becomes small and
    is topped up by the next large one. With D_i the cumulative deficit (1 - w) of the first
    i small outcomes and C_j the cumulative excess (w - 1) of the first j large ones, small
    outcome i is topped up by the first large j with C_j >= D_{i-1}, and large j drops below
    1 right after the first small i with D_i > C_j, keeping 1 + C_j - D_i of its own column.
    """
    small = np.flatnonzero(scaled < 1.0)
    large = np.flatnonzero(scaled >= 1.0)
    if small.size == 0 or large.size == 0:
        return  # every weight is exactly 1 (or rounding left nothing to pair): keep all
    deficit = np.cumsum(1.0 - scaled[small])
    excess = np.cumsum(scaled[large] - 1.0)
    before = np.concatenate(([0.0], deficit[:-1]))
    donor = np.minimum(np.searchsorted(excess, before, side="left"), large.size - 1)
    prob[small] = scaled[small]
    alias[small] = large[donor]
    exhausted_after = np.searchsorted(deficit, excess, side="right")
    # The last large outcome keeps its whole column (exactly so without rounding error).
    exhausted = exhausted_after < small.size
    exhausted[-1] = False
    which = np.flatnonzero(exhausted)
    kept = 1.0 + excess[which] - deficit[exhausted_after[which]]
    prob[large[which]] = np.clip(kept, 0.0, 1.0)
    alias[large[which]] = large[which + 1]
