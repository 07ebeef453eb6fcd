"""Per-cluster CSR indexes over the catalogue: the structure the samplers draw from.

Rows of the catalogue are ordered by (primary, secondary). ``cluster_offsets[p]`` ..
``cluster_offsets[p + 1]`` is primary cluster ``p`` in that order and, inside it,
``fine_offsets[p * K_s + s]`` .. ``fine_offsets[p * K_s + s + 1]`` is the fine cell (p, s).
So "cluster p without fine cell (p, s)" is two contiguous ranges, which is what lets the
hard-negative draw stay vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from esans_sampler.errors import InvalidInputError, UnknownItemError

IdArray = npt.NDArray[np.int64]
CodeArray = npt.NDArray[np.int32]

# A dense id -> row table is used when ids span at most this many slots per item.
_DENSE_LOOKUP_SPAN_FACTOR = 4


@dataclass(frozen=True)
class ClusterIndex:
    """CSR layout of the catalogue by primary cluster and fine cell.

    item_ids, primary, secondary: (N,) in catalogue order.
    ordered_ids: (N,) int64 item ids in (primary, secondary) order.
    ordered_rows: (N,) int64 catalogue row of each entry of ``ordered_ids``.
    cluster_offsets: (K_p + 1,) int64; fine_offsets: (K_p * K_s + 1,) int64.
    """

    item_ids: IdArray
    primary: CodeArray
    secondary: CodeArray
    num_primary: int
    num_secondary: int
    ordered_ids: IdArray
    ordered_rows: IdArray
    cluster_offsets: IdArray
    fine_offsets: IdArray
    _lookup: _IdLookup = field(repr=False, compare=False)

    @classmethod
    def build(
        cls,
        item_ids: npt.ArrayLike,
        primary: npt.ArrayLike,
        secondary: npt.ArrayLike,
        num_primary: int,
        num_secondary: int,
    ) -> ClusterIndex:
        ids = np.ascontiguousarray(item_ids, dtype=np.int64)
        p = np.ascontiguousarray(primary, dtype=np.int32)
        s = np.ascontiguousarray(secondary, dtype=np.int32)
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidInputError("item_ids must be a non-empty 1-D array")
        if p.shape != ids.shape or s.shape != ids.shape:
            raise InvalidInputError(f"codes {p.shape}/{s.shape} do not match item_ids {ids.shape}")
        if num_primary < 1 or num_secondary < 1:
            raise InvalidInputError("num_primary and num_secondary must be >= 1")
        if p.min() < 0 or p.max() >= num_primary:
            raise InvalidInputError(f"primary codes must lie in [0, {num_primary})")
        if s.min() < 0 or s.max() >= num_secondary:
            raise InvalidInputError(f"secondary codes must lie in [0, {num_secondary})")
        fine = p.astype(np.int64) * num_secondary + s
        order = np.argsort(fine, kind="stable").astype(np.int64)
        fine_counts = np.bincount(fine, minlength=num_primary * num_secondary)
        fine_offsets = np.zeros(num_primary * num_secondary + 1, dtype=np.int64)
        np.cumsum(fine_counts, out=fine_offsets[1:])
        cluster_offsets = np.ascontiguousarray(fine_offsets[::num_secondary])
        return cls(
            item_ids=ids,
            primary=p,
            secondary=s,
            num_primary=num_primary,
            num_secondary=num_secondary,
            ordered_ids=ids[order],
            ordered_rows=order,
            cluster_offsets=cluster_offsets,
            fine_offsets=fine_offsets,
            _lookup=_IdLookup.build(ids),
        )

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def cluster_sizes(self) -> IdArray:
        """(K_p,) int64 number of items in each primary cluster."""
        return np.diff(self.cluster_offsets)

    @property
    def fine_sizes(self) -> IdArray:
        """(K_p, K_s) int64 number of items in each fine cell."""
        return np.diff(self.fine_offsets).reshape(self.num_primary, self.num_secondary)

    def rows_of(self, ids: npt.ArrayLike) -> IdArray:
        """Catalogue rows (B,) int64 of ``ids``; raises :class:`UnknownItemError` if absent."""
        return self._lookup.rows_of(np.asarray(ids, dtype=np.int64))


@dataclass(frozen=True)
class _IdLookup:
    """id -> catalogue row, as a dense table for compact id ranges, else by binary search.

    ``dense_rows[id - min_id]`` is the row of ``id``, -1 for an id in the range that is not
    in the catalogue (only when ``dense_has_gaps``).
    """

    min_id: int
    dense_rows: IdArray | None
    dense_has_gaps: bool
    sorted_ids: IdArray
    sorted_rows: IdArray

    @classmethod
    def build(cls, ids: IdArray) -> _IdLookup:
        sorted_rows = np.argsort(ids, kind="stable").astype(np.int64)
        sorted_ids = ids[sorted_rows]
        duplicated = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if duplicated.size:
            raise InvalidInputError(
                f"item ids must be unique; duplicated: {np.unique(duplicated)[:10].tolist()}"
            )
        min_id, max_id = int(sorted_ids[0]), int(sorted_ids[-1])
        span = max_id - min_id + 1
        dense_rows: IdArray | None = None
        if span <= _DENSE_LOOKUP_SPAN_FACTOR * ids.size:
            dense_rows = np.full(span, -1, dtype=np.int64)
            dense_rows[ids - min_id] = np.arange(ids.size, dtype=np.int64)
        return cls(min_id, dense_rows, span > ids.size, sorted_ids, sorted_rows)

    def rows_of(self, query: IdArray) -> IdArray:
        if query.size == 0:
            return np.zeros(query.shape, dtype=np.int64)
        if self.dense_rows is not None:
            offset = query - self.min_id
            # One unsigned comparison catches ids below min_id (they wrap to huge) and above.
            if offset.view(np.uint64).max() >= self.dense_rows.shape[0]:
                self._raise_unknown(query)
            rows: IdArray = self.dense_rows.take(offset)
            if self.dense_has_gaps and rows.min() < 0:
                self._raise_unknown(query)
            return rows
        last = self.sorted_ids.shape[0] - 1
        pos = np.minimum(self.sorted_ids.searchsorted(query), last)
        if not np.array_equal(self.sorted_ids.take(pos), query):
            self._raise_unknown(query)
        found: IdArray = self.sorted_rows.take(pos)
        return found

    def _raise_unknown(self, query: IdArray) -> NoReturn:
        known = np.isin(query, self.sorted_ids, kind="sort")
        unknown = np.unique(query[~known])
        raise UnknownItemError(unknown[:10].tolist(), int(unknown.size))
