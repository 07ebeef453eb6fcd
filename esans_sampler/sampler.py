"""ESANS semantic-aware negative sampling (sec. 3.3.3, eq. 9-10), vectorised over the batch.

For each positive in fine cell (p, s):

* simple negatives: ``m_c`` primary clusters drawn with replacement from P(. | p) (eq. 9,
  never p, never an empty cluster), then ``m_o`` items drawn uniformly with replacement from
  each drawn cluster (eq. 10). Slot probability q = P(c | p) / |c|.
* hard negatives: ``m_h`` items drawn uniformly without replacement from cluster p minus
  fine cell (p, s); the positive lies in (p, s), so it is never returned, and neither is any
  item sharing its fine cell (the false negatives). When only A < m_h such items exist, all
  A are returned in random order, ``hard_counts`` says A and the rest is padding. The slots
  are exchangeable, so each holds a given item with probability q = 1 / A.

Every draw is exact: ``log q`` is the log-probability that this slot holds this item.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from esans_sampler.cluster_choice import AliasTable, cluster_choice_matrix, validate_gamma
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.errors import FailedPreconditionError, InvalidInputError

IdArray = npt.NDArray[np.int64]
CodeArray = npt.NDArray[np.int32]
LogQArray = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]

# Rejection rounds of the hard draw before the remaining rows go to Floyd's algorithm.
_HARD_REJECTION_ROUNDS = 3
# Up to this many hard slots, repeats are found by comparing all slot pairs; beyond, by sorting.
_PAIRWISE_REPEAT_CHECK_MAX = 16
_CHOICE_CACHE_SIZE = 8
_RECORD = np.dtype((np.void, 16))
_ROW_SUM_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class NegativeSample:
    """Negatives for a batch of B positives, with the exact log sampling probability of each.

    positive_ids, positive_rows: (B,) int64 ids and catalogue rows of the positives.
    positive_primary, positive_secondary: (B,) int32 codes of the positives.
    simple_ids, simple_rows: (B, m_c, m_o) int64 simple negatives and their catalogue rows.
    simple_clusters: (B, m_c) int32 drawn primary cluster (-1 for samplers without clusters).
    simple_log_q: (B, m_c, m_o) float32 log-probability that the slot holds its item.
    hard_ids, hard_rows: (B, m_h) int64 hard negatives, -1 past ``hard_counts``.
    hard_counts: (B,) int32 number of real hard negatives in each row.
    hard_log_q: (B, m_h) float32 log-probability of each hard slot, -inf on padding.
    sampler: name of the sampler that drew them.
    """

    positive_ids: IdArray
    positive_rows: IdArray
    positive_primary: CodeArray
    positive_secondary: CodeArray
    simple_ids: IdArray
    simple_rows: IdArray
    simple_clusters: CodeArray
    simple_log_q: LogQArray
    hard_ids: IdArray
    hard_rows: IdArray
    hard_counts: CodeArray
    hard_log_q: LogQArray
    sampler: str

    @property
    def B(self) -> int:
        return int(self.simple_ids.shape[0])

    @property
    def m_c(self) -> int:
        return int(self.simple_ids.shape[1])

    @property
    def m_o(self) -> int:
        return int(self.simple_ids.shape[2])

    @property
    def m_h(self) -> int:
        return int(self.hard_ids.shape[1])


class NegativeSampler(Protocol):
    """What every sampler offers: ESANS and the UNS / PNS / MNS baselines."""

    @property
    def name(self) -> str: ...

    def sample(
        self,
        positive_ids: npt.ArrayLike,
        rng: np.random.Generator,
        m_c: int = 2,
        m_o: int = 5,
        m_h: int = 5,
        gamma: float | None = None,
    ) -> NegativeSample: ...


def validate_sample_sizes(m_c: int, m_o: int, m_h: int) -> None:
    """Raise :class:`InvalidInputError` unless m_c >= 1, m_o >= 1 and m_h >= 0 are integers."""
    for name, value, low in (("m_c", m_c, 1), ("m_o", m_o, 1), ("m_h", m_h, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")


def as_positive_ids(positive_ids: npt.ArrayLike) -> IdArray:
    """Positive ids as a (B,) int64 array; raises :class:`InvalidInputError` otherwise."""
    ids = np.asarray(positive_ids)
    if ids.ndim != 1:
        raise InvalidInputError(f"positive_ids must be 1-D, got shape {ids.shape}")
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.dtype.kind not in "iu":
        raise InvalidInputError(f"positive_ids must be integers, got {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def empty_hard_part(batch: int, m_h: int) -> tuple[IdArray, IdArray, CodeArray, LogQArray]:
    """Hard ids, rows, counts and log q of a sampler that draws no hard negatives."""
    padding = np.full((batch, m_h), -1, dtype=np.int64)
    return (
        padding,
        padding.copy(),
        np.zeros(batch, dtype=np.int32),
        np.full((batch, m_h), -np.inf, dtype=np.float32),
    )


@dataclass(frozen=True, eq=False)
class _ChoiceTables:
    """A cluster-choice matrix, its alias tables and the simple-slot log q of each (p, c).

    simple_log_q_flat[p * K_p + c] = log P(c | p) - log |c|, float32.
    """

    matrix: FloatArray
    table: AliasTable
    simple_log_q_flat: LogQArray


class EsansSampler:
    """Semantic-aware simple and hard negatives over a :class:`ClusterIndex`.

    primary_codewords: (K_p, d) primary codebook. ``gamma`` is the default sharpness of the
    cluster choice (eq. 9); ``cluster_choice`` may pass its (K_p, K_p) matrix precomputed
    (for example from a codebook artifact). Other gammas are computed on demand and the last
    few kept. Safe to share between threads (the only mutable state is a lock-guarded cache)
    as long as each thread passes its own Generator. Besides the index it holds about 20
    bytes per item: each CSR position's (row, id) side by side, so a drawn item costs one
    memory read, and the fine cell of each catalogue row.
    """

    name = "esans"

    def __init__(
        self,
        index: ClusterIndex,
        primary_codewords: npt.ArrayLike,
        gamma: float = 1.0,
        cluster_choice: npt.ArrayLike | None = None,
    ) -> None:
        codewords = np.asarray(primary_codewords, dtype=np.float64)
        if codewords.ndim != 2 or codewords.shape[0] != index.num_primary:
            raise InvalidInputError(
                f"primary_codewords must be ({index.num_primary}, d), got {codewords.shape}"
            )
        sizes = index.cluster_sizes
        non_empty = int((sizes > 0).sum())
        if non_empty < 2:
            raise FailedPreconditionError(
                f"ESANS needs at least 2 non-empty primary clusters to draw simple negatives "
                f"from another cluster; this codebook has {non_empty} of {index.num_primary}"
            )
        self.index = index
        self.gamma = validate_gamma(gamma)
        self._codewords = codewords
        self._num_primary = index.num_primary
        # Lookup tables for the hot path: the fine cell of every catalogue row, the (row, id)
        # of every CSR position side by side (one memory read per drawn item), and per-cluster
        # and per-fine-cell sizes and offsets.
        self._fine_of_row = (
            index.primary.astype(np.int64) * index.num_secondary + index.secondary
        ).astype(np.int32 if index.num_primary * index.num_secondary < 2**31 else np.int64)
        records = np.stack((index.ordered_rows, index.ordered_ids), axis=1)
        self._ordered_records = records.view(_RECORD).ravel()
        self._cluster_size = sizes.astype(np.float64)
        self._log_cluster_size = np.log(np.maximum(sizes, 1)).astype(np.float64)
        cell_start = index.fine_offsets[:-1]
        self._cell_size = np.diff(index.fine_offsets)
        self._cluster_start_of_fine = np.repeat(index.cluster_offsets[:-1], index.num_secondary)
        self._cell_offset_in_cluster = cell_start - self._cluster_start_of_fine
        self._hard_available = np.repeat(sizes, index.num_secondary) - self._cell_size
        # Hard slots are exchangeable: each holds a given candidate with probability 1 / A.
        self._hard_log_q = -np.log(np.maximum(self._hard_available, 1)).astype(np.float32)
        self._cache: OrderedDict[float, _ChoiceTables] = OrderedDict()
        self._lock = threading.Lock()
        if cluster_choice is None:
            matrix = cluster_choice_matrix(codewords, sizes, self.gamma)
        else:
            matrix = self._checked_matrix(cluster_choice)
        self._default = self._tables(matrix)

    def cluster_choice(self, gamma: float | None = None) -> FloatArray:
        """The (K_p, K_p) float64 matrix whose row p is P(. | p) (eq. 9) for ``gamma``."""
        return self._choice(gamma).matrix

    def sample(
        self,
        positive_ids: npt.ArrayLike,
        rng: np.random.Generator,
        m_c: int = 2,
        m_o: int = 5,
        m_h: int = 5,
        gamma: float | None = None,
    ) -> NegativeSample:
        """Simple (B, m_c, m_o) and hard (B, m_h) negatives for positive_ids (B,) int64.

        Raises :class:`UnknownItemError` for ids not in the index and
        :class:`InvalidInputError` for bad sizes or gamma. Deterministic given ``rng``'s state.
        """
        validate_sample_sizes(m_c, m_o, m_h)
        choice = self._choice(gamma)
        ids = as_positive_ids(positive_ids)
        index = self.index
        rows = index.rows_of(ids)
        fine = self._fine_of_row[rows].astype(np.int64)
        primary64 = fine // index.num_secondary
        secondary = (fine - primary64 * index.num_secondary).astype(np.int32)
        batch = ids.shape[0]

        # Simple negatives. Clusters: m_c alias draws from row p of P (eq. 9).
        row_starts = np.repeat(primary64 * self._num_primary, m_c)
        clusters = choice.table.draw_flat(row_starts, rng)
        # Items: m_o uniform draws inside each drawn cluster (eq. 10), via its CSR range.
        # floor(u * n) < n for every double u < 1 and integer n < 2**53: no clamp needed.
        u = rng.random((batch * m_c, m_o))
        u *= self._cluster_size[clusters][:, None]
        position = u.astype(np.int64)
        position += index.cluster_offsets[clusters][:, None]
        simple_rows, simple_ids = self._rows_and_ids(position)
        simple_rows = simple_rows.reshape(batch, m_c, m_o)
        simple_ids = simple_ids.reshape(batch, m_c, m_o)
        # q = P(c | p) / |c|, the same for the m_o slots of a drawn cluster.
        slot_log_q = choice.simple_log_q_flat[row_starts + clusters]
        simple_log_q = np.repeat(slot_log_q, m_o).reshape(batch, m_c, m_o)

        hard_ids, hard_rows, hard_counts, hard_log_q = self._hard(fine, m_h, rng)
        return NegativeSample(
            positive_ids=ids,
            positive_rows=rows,
            positive_primary=primary64.astype(np.int32),
            positive_secondary=secondary,
            simple_ids=simple_ids,
            simple_rows=simple_rows,
            simple_clusters=clusters.astype(np.int32).reshape(batch, m_c),
            simple_log_q=simple_log_q,
            hard_ids=hard_ids,
            hard_rows=hard_rows,
            hard_counts=hard_counts,
            hard_log_q=hard_log_q,
            sampler=self.name,
        )

    def _rows_and_ids(self, position: IdArray) -> tuple[IdArray, IdArray]:
        """Catalogue rows and ids at CSR positions (any shape), read as one record each."""
        records = self._ordered_records[position].view(np.int64)
        pairs = records.reshape(*position.shape, 2)
        return pairs[..., 0].copy(), pairs[..., 1].copy()

    def _hard(
        self, fine: IdArray, m_h: int, rng: np.random.Generator
    ) -> tuple[IdArray, IdArray, CodeArray, LogQArray]:
        """Uniform draws without replacement from cluster p minus fine cell (p, s).

        Cluster p is one CSR range and fine cell (p, s) a sub-range of it, so the candidates
        are the two ranges around the cell: A = |p| - |(p, s)| of them.
        """
        batch = fine.shape[0]
        if m_h == 0 or batch == 0:
            return empty_hard_part(batch, m_h)
        available = self._hard_available[fine]
        # Work slot-major, (m_h, B), so that per-row values broadcast along contiguous rows.
        picks, counts = _draw_distinct_slot_major(available, m_h, rng)
        # Candidate k sits at cluster start + k, shifted past the fine cell once k reaches it.
        position = picks + self._cluster_start_of_fine[fine]
        position += np.where(picks >= self._cell_offset_in_cluster[fine], self._cell_size[fine], 0)
        per_row_log_q = self._hard_log_q[fine]
        if counts.min() == m_h:  # every row full: no padding to apply
            hard_rows, hard_ids = self._rows_and_ids(np.ascontiguousarray(position.T))
            hard_log_q = np.repeat(per_row_log_q, m_h).reshape(batch, m_h)
            return hard_ids, hard_rows, counts.astype(np.int32), hard_log_q
        filled = np.arange(m_h)[:, None] < counts
        slot_rows, slot_ids = self._rows_and_ids(np.where(filled, position, 0))
        hard_rows = np.where(filled, slot_rows, -1).T.copy()
        hard_ids = np.where(filled, slot_ids, -1).T.copy()
        hard_log_q = np.where(filled, per_row_log_q, np.float32(-np.inf)).T.copy()
        return hard_ids, hard_rows, counts.astype(np.int32), hard_log_q

    def _choice(self, gamma: float | None) -> _ChoiceTables:
        if gamma is None:
            return self._default
        value = validate_gamma(gamma)
        if value == self.gamma:
            return self._default
        with self._lock:
            cached = self._cache.get(value)
            if cached is not None:
                self._cache.move_to_end(value)
                return cached
        tables = self._tables(
            cluster_choice_matrix(self._codewords, self.index.cluster_sizes, value)
        )
        with self._lock:
            self._cache[value] = tables
            self._cache.move_to_end(value)
            while len(self._cache) > _CHOICE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return tables

    def _tables(self, matrix: FloatArray) -> _ChoiceTables:
        with np.errstate(divide="ignore"):
            log_p = np.log(matrix)
        # log q of a simple slot holding an item of cluster c for a positive in p (eq. 9-10).
        slot_log_q = (log_p - self._log_cluster_size[None, :]).astype(np.float32)
        return _ChoiceTables(
            matrix=matrix, table=AliasTable.build(matrix), simple_log_q_flat=slot_log_q.ravel()
        )

    def _checked_matrix(self, cluster_choice: npt.ArrayLike) -> FloatArray:
        """A precomputed choice matrix, checked against eq. 9's structural rules."""
        matrix = np.array(cluster_choice, dtype=np.float64)
        k = self._num_primary
        if matrix.shape != (k, k):
            raise InvalidInputError(f"cluster_choice must be ({k}, {k}), got {matrix.shape}")
        if not np.isfinite(matrix).all() or (matrix < 0.0).any():
            raise InvalidInputError("cluster_choice must be finite and >= 0")
        if np.diagonal(matrix).any():
            raise InvalidInputError("cluster_choice must be 0 on the diagonal (never p itself)")
        empty = self.index.cluster_sizes == 0
        if matrix[:, empty].any():
            raise InvalidInputError("cluster_choice gives probability to empty clusters")
        sums = matrix.sum(axis=1)
        if not np.allclose(sums[~empty], 1.0, atol=_ROW_SUM_TOLERANCE):
            raise InvalidInputError("cluster_choice rows of non-empty clusters must sum to 1")
        return matrix


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
    picks, counts = _draw_distinct_slot_major(available, m, rng)
    return np.ascontiguousarray(picks.T), counts


def _draw_distinct_slot_major(
    available: IdArray, m: int, rng: np.random.Generator
) -> tuple[IdArray, IdArray]:
    """:func:`draw_distinct` with picks laid out (m, B), slot-major."""
    counts = np.minimum(available, m)
    picks = _uniform_below(available, m, rng)
    redo = _has_repeat(picks)
    small = available <= m  # cannot be filled by rejection (A < m) or rarely so (A == m)
    any_small = bool(small.any())
    if any_small:
        redo |= small
    elif not redo.any():
        return picks, counts
    pending = np.flatnonzero(redo & ~small) if any_small else np.flatnonzero(redo)
    for _ in range(_HARD_REJECTION_ROUNDS - 1):
        if pending.size == 0:
            break
        draw = _uniform_below(available[pending], m, rng)
        clash = _has_repeat(draw)
        picks[:, pending[~clash]] = draw[:, ~clash]
        pending = pending[clash]
    rest = np.concatenate((np.flatnonzero(small), pending)) if any_small else pending
    if rest.size:
        picks[:, rest] = _floyd_shuffled(available[rest], m, rng).T
    return picks, counts


def _uniform_below(bound: IdArray, m: int, rng: np.random.Generator) -> IdArray:
    """(m, R) int64 independent uniform integers in [0, bound[r]) (0 where bound is 0)."""
    u = rng.random((m, bound.shape[0]))
    u *= bound
    # floor(u * n) < n for every double u < 1 and integer n < 2**53, so no clamp is needed.
    drawn: IdArray = u.astype(np.int64)
    return drawn


@functools.lru_cache(maxsize=_PAIRWISE_REPEAT_CHECK_MAX + 1)
def _slot_pairs(m: int) -> tuple[IdArray, IdArray]:
    """Every pair of slots (i < j) of m slots, as two index arrays."""
    first, second = np.triu_indices(m, k=1)
    return first.astype(np.int64), second.astype(np.int64)


def _has_repeat(values: IdArray) -> npt.NDArray[np.bool_]:
    """(R,) bool: whether column r of values (m, R) holds some value twice."""
    m = values.shape[0]
    if m <= _PAIRWISE_REPEAT_CHECK_MAX:
        first, second = _slot_pairs(m)
        repeat: npt.NDArray[np.bool_] = (values[first] == values[second]).any(axis=0)
        return repeat
    ordered = np.sort(values, axis=0)
    found: npt.NDArray[np.bool_] = (ordered[1:] == ordered[:-1]).any(axis=0)
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
