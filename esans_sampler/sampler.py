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

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from esans_sampler import kinds
from esans_sampler.cluster_choice import AliasTable, cluster_choice_matrix, validate_gamma
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.draws import fill_distinct
from esans_sampler.errors import FailedPreconditionError, InvalidInputError
from esans_sampler.esans_exclusion import EsansExclusion
from esans_sampler.exclusions import Exclusions

IdArray = npt.NDArray[np.int64]
CodeArray = npt.NDArray[np.int32]
LogQArray = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]

_CHOICE_CACHE_SIZE = 8
# Columns of the per-fine-cell table of EsansSampler.
_CELL_CLUSTER_START, _CELL_START, _CELL_SIZE, _CELL_AVAILABLE = range(4)
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
    simple_secondary, hard_secondary: (B, m_c, m_o) and (B, m_h) int32 secondary codes of the
    negatives, -1 for baselines and on padding: with the primary (the drawn cluster, the
    positive's), a negative's fine cell.
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
    simple_secondary: CodeArray
    hard_secondary: CodeArray
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
        exclude: Exclusions | None = None,
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
    if ids.dtype.kind == "u" and ids.max() > np.iinfo(np.int64).max:
        raise InvalidInputError(
            f"positive_ids must fit in int64, got {ids.max()} (ids are signed 64-bit)"
        )
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
    as long as each thread passes its own Generator. Besides the index it holds about 12
    bytes per item (20 when the ids span 2**32 or more): each CSR position's (row, id) side
    by side, so a drawn item costs one memory read, and the fine cell of each catalogue row.
    """

    name = kinds.ESANS

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
        # of every CSR position side by side (one memory read per drawn item), and per fine
        # cell, side by side, what the hard draw needs.
        self._fine_of_row: npt.NDArray[np.integer] = (
            index.primary.astype(np.int64) * index.num_secondary + index.secondary
        ).astype(np.int32 if index.num_primary * index.num_secondary < 2**31 else np.int64)
        self._records, self._record_field, self._id_base = _position_records(index)
        # The secondary code of every CSR position, in the narrowest type (1 MB for 1M items
        # at K_s <= 256): read by position, it costs a fraction of a gather by catalogue row.
        code_type = np.uint8 if index.num_secondary <= 256 else np.int32
        self._secondary_at = index.secondary.take(index.ordered_rows).astype(code_type)
        self._cluster_size = sizes.astype(np.float64)
        self._cluster_offsets = np.ascontiguousarray(index.cluster_offsets[:-1])
        self._log_cluster_size = np.log(np.maximum(sizes, 1)).astype(np.float64)
        cell_start = index.fine_offsets[:-1]
        cell_size = np.diff(index.fine_offsets)
        hard_available = np.repeat(sizes, index.num_secondary) - cell_size
        # Columns _CELL_*: cluster start, cell start, cell size and A = |p| - |(p, s)|.
        self._cell_table = np.stack(
            (
                np.repeat(index.cluster_offsets[:-1], index.num_secondary),
                cell_start,
                cell_size,
                hard_available,
            ),
            axis=1,
        )
        # The smallest A of a cell that can hold a positive: above m_h, no row is ever short.
        self._min_hard_available = int(hard_available[cell_size > 0].min())
        # Hard slots are exchangeable: each holds a given candidate with probability 1 / A.
        self._hard_log_q = -np.log(np.maximum(hard_available, 1)).astype(np.float32)
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
        exclude: Exclusions | None = None,
    ) -> NegativeSample:
        """Simple (B, m_c, m_o) and hard (B, m_h) negatives for positive_ids (B,) int64.

        With ``exclude``, no slot holds an item excluded for its row, and log q is
        renormalised over what remains (see :mod:`esans_sampler.exclusions`). Raises
        :class:`UnknownItemError` for ids not in the index and :class:`InvalidInputError` for
        bad sizes or gamma. Deterministic given ``rng``'s state.
        """
        validate_sample_sizes(m_c, m_o, m_h)
        choice = self._choice(gamma)
        ids = as_positive_ids(positive_ids)
        rows = self.index.rows_of(ids)
        fine = self._fine_of_row.take(rows)
        primary, secondary = np.divmod(fine, self.index.num_secondary)
        batch = ids.shape[0]
        draws = batch * m_c
        items = draws * m_o
        # Every uniform of the batch in one generator call: clusters, items, hard slots.
        u = rng.random(draws + items + batch * m_h)
        # CSR positions of every simple, then every hard slot, read in one gather at the end.
        position = np.empty(items + batch * m_h, dtype=np.int64)

        # Simple negatives. Clusters: m_c alias draws from row p of P (eq. 9).
        row_starts = np.repeat(np.multiply(primary, self._num_primary, dtype=np.int64), m_c)
        clusters = choice.table.draw_flat_with(row_starts, u[:draws])
        # Items: m_o uniform draws inside each drawn cluster (eq. 10), via its CSR range; laid
        # out slot-major, (m_o, B * m_c), so per-cluster values broadcast along rows.
        # floor(u * n) < n for every double u < 1 and integer n < 2**53: no clamp needed.
        u_items = u[draws : draws + items].reshape(m_o, draws)
        u_items *= self._cluster_size.take(clusters)
        simple_position = position[:items].reshape(m_o, draws)
        np.copyto(simple_position, u_items, casting="unsafe")  # floor: u * n >= 0
        simple_position += self._cluster_offsets.take(clusters)
        # q = P(c | p) / |c|, the same for the m_o slots of a drawn cluster.
        slot_log_q = choice.simple_log_q_flat.take(row_starts + clusters)

        hard_position = position[items:].reshape(m_h, batch)
        hard_counts, filled = self._hard(fine, u[draws + items :], hard_position, rng)
        hard_log_q = np.repeat(self._hard_log_q.take(fine), m_h).reshape(batch, m_h)
        if exclude is not None and exclude.rows.size:
            excluding = EsansExclusion(self, exclude, primary, fine, rng)
            slot_log_q = excluding.simple(choice, clusters, row_starts, simple_position, slot_log_q)
            hard_counts, filled, hard_log_q = excluding.hard(
                hard_position, hard_counts, filled, hard_log_q
            )

        # (row, id - base) of every slot, back in (B, m_c, m_o) and (B, m_h) order.
        records = self._records.take(position).view(self._record_field).reshape(-1, 2)
        simple_rows, simple_ids = self._rows_and_ids(
            records[:items].reshape(m_o, batch, m_c, 2).transpose(1, 2, 0, 3)
        )
        hard_rows, hard_ids = self._rows_and_ids(
            records[items:].reshape(m_h, batch, 2).transpose(1, 0, 2)
        )
        codes = self._secondary_at.take(position)
        simple_secondary = codes[:items].reshape(m_o, batch, m_c).transpose(1, 2, 0)
        hard_secondary = codes[items:].reshape(m_h, batch).T.astype(np.int32)
        if filled is not None:  # some rows hold fewer than m_h: pad them
            padding = ~filled.T
            hard_rows[padding] = -1
            hard_ids[padding] = -1
            hard_log_q[padding] = -np.inf
            hard_secondary[padding] = -1
        return NegativeSample(
            positive_ids=ids,
            positive_rows=rows,
            positive_primary=primary.astype(np.int32, copy=False),
            positive_secondary=secondary.astype(np.int32, copy=False),
            simple_ids=simple_ids,
            simple_rows=simple_rows,
            simple_clusters=clusters.astype(np.int32).reshape(batch, m_c),
            simple_log_q=np.repeat(slot_log_q, m_o).reshape(batch, m_c, m_o),
            hard_ids=hard_ids,
            hard_rows=hard_rows,
            hard_counts=hard_counts,
            hard_log_q=hard_log_q,
            simple_secondary=simple_secondary.astype(np.int32),
            hard_secondary=hard_secondary,
            sampler=self.name,
        )

    def _rows_and_ids(self, records: npt.NDArray[np.integer]) -> tuple[IdArray, IdArray]:
        """Catalogue rows and ids, (...) int64 each, of records (..., 2) (row, id - base)."""
        rows = np.empty(records.shape[:-1], dtype=np.int64)
        np.copyto(rows, records[..., 0])
        ids = np.empty(records.shape[:-1], dtype=np.int64)
        np.add(records[..., 1], self._id_base, out=ids)
        return rows, ids

    def _hard(
        self,
        fine: npt.NDArray[np.integer],
        u: FloatArray,
        position: IdArray,
        rng: np.random.Generator,
    ) -> tuple[CodeArray, npt.NDArray[np.bool_] | None]:
        """Uniform draws without replacement from cluster p minus fine cell (p, s).

        Writes the CSR positions (m_h, B), slot-major, into ``position``, consuming the
        uniforms ``u`` (m_h * B,). Returns the counts (B,) int32 and, when some row holds
        fewer than m_h, which slots (m_h, B) are filled (unfilled positions are 0).
        Cluster p is one CSR range and fine cell (p, s) a sub-range of it, so the candidates
        are the two ranges around the cell: A = |p| - |(p, s)| of them.
        """
        m_h, batch = position.shape
        if m_h == 0 or batch == 0:
            return np.zeros(batch, dtype=np.int32), None
        cell = self._cell_table.take(fine, axis=0)
        available = cell[:, _CELL_AVAILABLE]
        may_be_short = self._min_hard_available <= m_h
        counts = fill_distinct(position, u.reshape(m_h, batch), available, may_be_short, rng)
        # Candidate k sits at cluster start + k, shifted past the fine cell once k reaches it.
        position += cell[:, _CELL_CLUSTER_START]
        shift = position >= cell[:, _CELL_START]
        position += shift * cell[:, _CELL_SIZE]  # measured faster than add(..., where=shift)
        if counts is None:
            return np.full(batch, m_h, dtype=np.int32), None
        filled = np.arange(m_h)[:, None] < counts
        position[~filled] = 0
        return counts.astype(np.int32), filled

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


def _position_records(
    index: ClusterIndex,
) -> tuple[npt.NDArray[np.void], np.dtype[Any], np.int64]:
    """(row, id - base) of every CSR position side by side: one memory read per drawn item.

    Returns the (N,) records, the dtype of their two fields and the id base. The fields are
    uint32 when rows and id offsets fit (8-byte records: half the memory, so twice as much
    of the table stays in cache for the random reads of the draws), else int64.
    """
    ids = index.ordered_ids
    low, high = int(ids.min()), int(ids.max())
    if index.num_items <= 2**32 and high - low < 2**32:
        field: np.dtype[Any] = np.dtype(np.uint32)
        base = low
    else:
        field, base = np.dtype(np.int64), 0
    pairs = np.empty((index.num_items, 2), dtype=field)
    pairs[:, 0] = index.ordered_rows
    np.subtract(ids, base, out=pairs[:, 1], casting="unsafe")
    records = pairs.view(np.dtype((np.void, 2 * field.itemsize))).ravel()
    return records, field, np.int64(base)
