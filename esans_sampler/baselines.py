"""Baseline negative samplers the paper compares ESANS with: UNS, PNS and MNS.

They share ESANS's interface and :class:`NegativeSample` layout: the ``m_c * m_o`` negatives
of each positive fill ``simple_*`` (B, m_c, m_o), ``simple_clusters`` is -1 (no clusters are
drawn) and the hard part is empty (counts 0, every slot padded). None of them ever returns
the positive itself, and each slot carries the exact log-probability that it holds its item.
``gamma`` is accepted for interface compatibility and ignored.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from esans_sampler import kinds
from esans_sampler.cluster_choice import AliasTable
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.errors import FailedPreconditionError, InvalidInputError
from esans_sampler.exclusions import (
    Exclusions,
    allowed_rows,
    finish_explicitly,
    redraw_excluded,
    uniform_remaining,
)
from esans_sampler.sampler import (
    IdArray,
    NegativeSample,
    as_positive_ids,
    empty_hard_part,
    validate_sample_sizes,
)

# PNS redraws slots that hit the positive this many times, then draws the rest exactly by
# inverse CDF with the positive removed (only reached when the positive is very popular).
_PNS_REDRAW_ROUNDS = 8


class UniformSampler:
    """UNS: each slot uniform over the catalogue minus the positive, q = 1 / (N - 1).

    A slot draws j uniformly from [0, N - 1) and shifts it past the positive's row.
    """

    name = kinds.UNIFORM

    def __init__(self, index: ClusterIndex) -> None:
        _require_two_items(index)
        self.index = index
        self._log_q = np.float32(-np.log(index.num_items - 1))

    def sample(
        self,
        positive_ids: npt.ArrayLike,
        rng: np.random.Generator,
        m_c: int = 2,
        m_o: int = 5,
        m_h: int = 5,
        gamma: float | None = None,
        exclude: Exclusions | None = None,
    ) -> NegativeSample:
        """(B, m_c, m_o) uniform negatives for positive_ids (B,) int64; empty hard part.
        With ``exclude``, q = 1 / (N - 1 - |E_r minus the positive|)."""
        validate_sample_sizes(m_c, m_o, m_h)
        ids = as_positive_ids(positive_ids)
        rows = self.index.rows_of(ids)
        drawn = _uniform_excluding(rows, m_c * m_o, self.index.num_items, rng)
        if exclude is None or exclude.rows.size == 0:
            log_q = np.full(drawn.shape, self._log_q, dtype=np.float32)
        else:
            remaining = uniform_remaining(rows, exclude, self.index.num_items)
            _exclude_uniform(drawn, rows, exclude, np.arange(drawn.size), rng)
            log_q = np.broadcast_to(-np.log(remaining)[:, None], drawn.shape).astype(np.float32)
        return _baseline_sample(self.index, self.name, ids, rows, drawn, log_q, m_c, m_o, m_h)


class PopularitySampler:
    """PNS: p_i proportional to (count_i + 1) ** alpha, the positive excluded.

    counts: (N,) per catalogue row. Slots are drawn from p by an alias table and slots that
    hit the positive are redrawn, so a slot holds item i != pos with probability
    q = p_i / (1 - p_pos).
    """

    name = kinds.POPULARITY

    def __init__(self, index: ClusterIndex, counts: npt.ArrayLike, alpha: float = 0.75) -> None:
        _require_two_items(index)
        freq = np.asarray(counts, dtype=np.float64)
        if freq.shape != (index.num_items,):
            raise InvalidInputError(f"counts must be ({index.num_items},), got {freq.shape}")
        if not np.isfinite(freq).all() or (freq < 0.0).any():
            raise InvalidInputError("counts must be finite and >= 0")
        if isinstance(alpha, bool) or not np.isfinite(alpha) or alpha < 0.0:
            raise InvalidInputError(f"alpha must be finite and >= 0, got {alpha!r}")
        self.index = index
        self.alpha = float(alpha)
        log_w = self.alpha * np.log1p(freq)  # log (count + 1) ** alpha
        weights = np.exp(log_w - log_w.max())
        self._weights = weights
        self._log_weights = np.log(weights)
        self._table = AliasTable.build(weights)
        self._cdf = np.cumsum(weights)
        # Mass before and after each row, summed without it, so that the mass of "every item
        # but the positive" is exact even when the positive holds nearly all of it.
        self._mass_before = np.concatenate(([0.0], self._cdf[:-1]))
        self._mass_after = np.concatenate((np.cumsum(weights[::-1])[::-1][1:], [0.0]))

    def sample(
        self,
        positive_ids: npt.ArrayLike,
        rng: np.random.Generator,
        m_c: int = 2,
        m_o: int = 5,
        m_h: int = 5,
        gamma: float | None = None,
        exclude: Exclusions | None = None,
    ) -> NegativeSample:
        """(B, m_c, m_o) popularity negatives for positive_ids (B,) int64; empty hard part.
        With ``exclude``, q = p_i / (1 - p_pos - p(E_r minus the positive))."""
        validate_sample_sizes(m_c, m_o, m_h)
        ids = as_positive_ids(positive_ids)
        rows = self.index.rows_of(ids)
        batch, per_row = rows.shape[0], m_c * m_o
        drawn = self._table.draw_row(0, batch * per_row, rng).reshape(batch, per_row)
        for _ in range(_PNS_REDRAW_ROUNDS):
            hit = np.flatnonzero((drawn == rows[:, None]).ravel())
            if hit.size == 0:
                break
            drawn.ravel()[hit] = self._table.draw_row(0, hit.size, rng)
        else:
            hit = np.flatnonzero((drawn == rows[:, None]).ravel())
            if hit.size:
                drawn.ravel()[hit] = self._draw_excluding(rows[hit // per_row], rng)
        # q = p_i / (1 - p_pos) = w_i / (sum of the weights of every other row)
        others = self._mass_before[rows] + self._mass_after[rows]
        if exclude is not None and exclude.rows.size:
            others = self._exclude(drawn, rows, others, exclude, rng)
        log_q = self._log_weights[drawn] - np.log(others)[:, None]
        return _baseline_sample(
            self.index, self.name, ids, rows, drawn, log_q.astype(np.float32), m_c, m_o, m_h
        )

    def _exclude(
        self,
        drawn: IdArray,
        rows: IdArray,
        others: npt.NDArray[np.float64],
        exclude: Exclusions,
        rng: np.random.Generator,
    ) -> npt.NDArray[np.float64]:
        """Redraw the excluded slots of ``drawn`` in place; return each row's remaining mass."""
        not_positive = exclude.rows != rows[exclude.batch_of]
        excluded = exclude.per_row_sum(np.where(not_positive, self._weights[exclude.rows], 0.0))
        remaining = others - excluded
        for b in np.flatnonzero(remaining <= 1e-9 * others):  # cancellation: sum it exactly
            allowed = allowed_rows(exclude, int(b), int(rows[b]))
            if allowed.size == 0:
                raise InvalidInputError(
                    f"row {int(b)}'s exclusions leave nothing its sampler could return"
                )
            remaining[b] = self._weights[allowed].sum()
        left = redraw_excluded(drawn, exclude, lambda b: self._draw_excluding(rows[b], rng))
        if left.size:
            finish_explicitly(
                drawn,
                left,
                lambda b: (a := allowed_rows(exclude, b, int(rows[b])), self._weights[a]),
                rng,
            )
        return remaining

    def _draw_excluding(self, exclude: IdArray, rng: np.random.Generator) -> IdArray:
        """One draw from p restricted to rows != exclude[r], by inverse CDF: (R,) int64."""
        excluded = self._weights[exclude]
        mass_before = self._mass_before[exclude]
        target = rng.random(exclude.shape[0]) * (mass_before + self._mass_after[exclude])
        target = np.where(target >= mass_before, target + excluded, target)
        found = np.searchsorted(self._cdf, target, side="right")
        drawn: IdArray = np.minimum(found, self._weights.shape[0] - 1)
        # Rounding can land on the excluded row itself or a zero-width neighbour; both are
        # measure-zero events, moved to the nearest other row.
        clash = drawn == exclude
        drawn[clash] = np.where(exclude[clash] > 0, exclude[clash] - 1, exclude[clash] + 1)
        return drawn


class MixedSampler:
    """MNS: part of each row's negatives from the batch, the rest uniform over the catalogue.

    The first ``round(in_batch_fraction * m_c * m_o)`` slots of a row are in-batch: uniform
    over the batch positions whose id differs from the row's positive, so an item appearing
    c_x times in the batch has q = c_x / (B - c_pos). The other slots are UNS slots,
    q = 1 / (N - 1). A row whose batch holds no other id fills its in-batch slots by UNS.
    """

    name = kinds.MIXED

    def __init__(self, index: ClusterIndex, in_batch_fraction: float = 0.5) -> None:
        _require_two_items(index)
        fraction = float(in_batch_fraction)
        if not 0.0 <= fraction <= 1.0:
            raise InvalidInputError(f"in_batch_fraction must lie in [0, 1], got {fraction!r}")
        self.index = index
        self.in_batch_fraction = fraction
        self._uniform_log_q = -np.log(index.num_items - 1)

    def sample(
        self,
        positive_ids: npt.ArrayLike,
        rng: np.random.Generator,
        m_c: int = 2,
        m_o: int = 5,
        m_h: int = 5,
        gamma: float | None = None,
        exclude: Exclusions | None = None,
    ) -> NegativeSample:
        """(B, m_c, m_o) mixed negatives for positive_ids (B,) int64; empty hard part.

        With ``exclude``, in-batch slots avoid the batch positions whose id is excluded
        (q = c_x / (B - c_pos - c(E_r))) and UNS slots as :class:`UniformSampler` does; a row
        whose batch holds no allowed id fills its in-batch slots by UNS.
        """
        validate_sample_sizes(m_c, m_o, m_h)
        ids = as_positive_ids(positive_ids)
        rows = self.index.rows_of(ids)
        batch, per_row = rows.shape[0], m_c * m_o
        num_in_batch = round(self.in_batch_fraction * per_row)
        excluding = exclude is not None and exclude.rows.size > 0
        drawn = _uniform_excluding(rows, per_row, self.index.num_items, rng)
        if exclude is not None and excluding:
            uniform_log_q = -np.log(uniform_remaining(rows, exclude, self.index.num_items))
        else:
            uniform_log_q = np.full(batch, self._uniform_log_q)
        log_q = np.repeat(uniform_log_q, per_row).reshape(batch, per_row)
        in_batch = np.zeros((batch, per_row), dtype=bool)
        if num_in_batch and batch:
            # Sort the batch by id: the row's own id is one contiguous group [first, first +
            # own) of the B positions, so the others are B - own positions around it.
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            new_group = np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1]))
            group_of_sorted = np.cumsum(new_group) - 1
            group_size = np.bincount(group_of_sorted)
            group_first = np.flatnonzero(new_group)
            group_of_row = np.empty(batch, dtype=np.int64)
            group_of_row[order] = group_of_sorted
            own = group_size[group_of_row]
            others = batch - own
            first = group_first[group_of_row]

            def pick(of: IdArray) -> IdArray:
                """One in-batch draw for each batch row in ``of``: a catalogue row."""
                k = (rng.random(of.shape) * others[of]).astype(np.int64)
                k += np.where(k >= first[of], own[of], 0)
                picked: IdArray = rows[order[np.minimum(k, batch - 1)]]
                return picked

            allowed = others
            if exclude is not None and excluding:
                # Batch positions whose id is excluded leave the row's in-batch proposal.
                in_batch_rows, in_batch_count = np.unique(rows, return_counts=True)
                at = np.searchsorted(in_batch_rows, exclude.rows)
                at = np.minimum(at, in_batch_rows.size - 1)
                hits = np.where(in_batch_rows[at] == exclude.rows, in_batch_count[at], 0)
                not_positive = exclude.rows != rows[exclude.batch_of]
                allowed = others - exclude.per_row_sum(np.where(not_positive, hits, 0)).astype(
                    np.int64
                )
            use = np.flatnonzero(allowed > 0)  # others keep UNS in their in-batch slots
            slots = np.repeat(np.arange(batch), num_in_batch).reshape(batch, num_in_batch)
            drawn[use, :num_in_batch] = pick(slots[use].ravel()).reshape(-1, num_in_batch)
            in_batch[use, :num_in_batch] = True
            if exclude is not None and excluding:
                flat_in_batch = np.flatnonzero(in_batch.ravel())
                left = redraw_excluded(drawn, exclude, pick, flat_in_batch)
                if left.size:
                    finish_explicitly(
                        drawn,
                        left,
                        lambda b: (_allowed_in_batch(rows, ids, b, exclude), None),
                        rng,
                    )
            # q = c_x / allowed: c_x the positions holding the drawn id.
            batch_rows, batch_counts = np.unique(rows, return_counts=True)
            counts = batch_counts[np.searchsorted(batch_rows, drawn[use, :num_in_batch])]
            log_q[use, :num_in_batch] = np.log(counts) - np.log(allowed[use])[:, None]
        if exclude is not None and excluding:
            uniform_slots = np.flatnonzero(~in_batch.ravel())
            _exclude_uniform(drawn, rows, exclude, uniform_slots, rng)
        return _baseline_sample(
            self.index, self.name, ids, rows, drawn, log_q.astype(np.float32), m_c, m_o, m_h
        )


def _require_two_items(index: ClusterIndex) -> None:
    if index.num_items < 2:
        raise FailedPreconditionError(
            f"a negative sampler needs at least 2 catalogue items, this one has {index.num_items}"
        )


def _uniform_excluding(
    rows: IdArray, per_row: int, num_items: int, rng: np.random.Generator
) -> IdArray:
    """(B, per_row) int64 catalogue rows uniform over [0, N) minus rows[b]."""
    u = rng.random((rows.shape[0], per_row))
    u *= num_items - 1
    # floor(u * n) < n for every double u < 1 and integer n < 2**53: no clamp needed.
    drawn: IdArray = u.astype(np.int64)
    drawn += drawn >= rows[:, None]  # shift past the positive: uniform over the other N - 1
    return drawn


def _allowed_in_batch(rows: IdArray, ids: IdArray, b: int, exclude: Exclusions) -> IdArray:
    """The catalogue rows of batch positions row ``b`` may draw in-batch (one per position,
    so an id appearing c times is c times as likely)."""
    keep = (ids != ids[b]) & ~np.isin(rows, exclude.of_row(b))
    allowed: IdArray = rows[keep]
    return allowed


def _exclude_uniform(
    drawn: IdArray,
    rows: IdArray,
    exclude: Exclusions,
    slots: IdArray,
    rng: np.random.Generator,
) -> None:
    """Redraw, in place, the excluded ``slots`` (flat) of uniform draws ``drawn`` (B, K)."""
    n = exclude.num_items
    left = redraw_excluded(
        drawn, exclude, lambda b: _uniform_excluding(rows[b], 1, n, rng)[:, 0], slots
    )
    if left.size:
        finish_explicitly(
            drawn, left, lambda b: (allowed_rows(exclude, b, int(rows[b])), None), rng
        )


def _baseline_sample(
    index: ClusterIndex,
    name: str,
    ids: IdArray,
    rows: IdArray,
    drawn: IdArray,
    log_q: npt.NDArray[np.float32],
    m_c: int,
    m_o: int,
    m_h: int,
) -> NegativeSample:
    """Pack (B, m_c * m_o) drawn catalogue rows into a :class:`NegativeSample`."""
    batch = rows.shape[0]
    simple_rows = drawn.reshape(batch, m_c, m_o)
    hard_ids, hard_rows, hard_counts, hard_log_q = empty_hard_part(batch, m_h)
    return NegativeSample(
        positive_ids=ids,
        positive_rows=rows,
        positive_primary=index.primary[rows],
        positive_secondary=index.secondary[rows],
        simple_ids=index.item_ids[simple_rows],
        simple_rows=simple_rows,
        simple_clusters=np.full((batch, m_c), -1, dtype=np.int32),
        simple_log_q=log_q.reshape(batch, m_c, m_o),
        hard_ids=hard_ids,
        hard_rows=hard_rows,
        hard_counts=hard_counts,
        hard_log_q=hard_log_q,
        simple_secondary=np.full((batch, m_c, m_o), -1, dtype=np.int32),
        hard_secondary=np.full((batch, m_h), -1, dtype=np.int32),
        sampler=name,
    )
