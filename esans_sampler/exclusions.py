"""Per-row exclusions: items a row's negatives must never be (e.g. the user's own history).

A request may name, for each row r, a set E_r of catalogue items. Every sampler then draws
from its usual proposal q_r restricted to the items outside E_r: a slot that lands in E_r is
drawn again from the same proposal (rejection), which keeps every remaining item's
probability proportional to its original one. The served log q is therefore exact,
renormalised over what remains:

    q'_r(i) = q_r(i) / (1 - q_r(E_r))  for i not in E_r,  0 for i in E_r.

Each sampler computes its own normaliser (a count for uniform draws, a weight sum for
popularity draws, a cluster-choice mass and cluster remainder for ESANS). After a bounded
number of rejection rounds, what is left (a row whose exclusions hold nearly all of its
proposal's mass) is drawn exactly from an explicit list of the allowed items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.errors import InvalidInputError, UnknownItemError

IdArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

REJECTION_ROUNDS = 32


@dataclass(frozen=True, eq=False)
class Exclusions:
    """Per batch row, a sorted set of excluded catalogue rows (CSR over the batch).

    offsets: (B + 1,) int64; rows: (n,) int64, unique within each batch row; batch_of: (n,)
    the batch row of each entry; keys: the sorted lookup keys of (batch row, row) pairs.
    """

    offsets: IdArray
    rows: IdArray
    batch_of: IdArray
    num_items: int
    keys: IdArray  # batch_of * num_items + rows, sorted

    @classmethod
    def build(
        cls, index: ClusterIndex, batch: int, ids: npt.ArrayLike, offsets: npt.ArrayLike
    ) -> Exclusions:
        """From a request's ``exclude_ids`` and ``exclude_offsets`` (row r's ids are
        ``ids[offsets[r]:offsets[r + 1]]``).

        Raises:
            InvalidInputError: offsets of the wrong length, not starting at 0, decreasing, or
                not ending at the number of ids.
            InvalidInputError: an excluded id is not in the catalogue (it names them).
        """
        flat, bounds = checked_csr(batch, ids, offsets)
        try:
            rows = index.rows_of(flat) if flat.size else np.zeros(0, np.int64)
        except UnknownItemError as exc:
            shown = ", ".join(str(i) for i in exc.unknown_ids)
            raise InvalidInputError(
                f"{exc.total_unknown} exclude_ids are not in the codebook: {shown}"
                f"{' ...' if exc.total_unknown > len(exc.unknown_ids) else ''}; drop them, or "
                "pin the codebook version they come from"
            ) from exc
        batch_of = np.repeat(np.arange(batch, dtype=np.int64), np.diff(bounds))
        # Grouped by batch row already: the stable sort (timsort) merges those runs quickly.
        keys = np.sort(batch_of * index.num_items + rows, kind="stable")
        if keys.size:
            keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        batch_of, rows = np.divmod(keys, index.num_items)
        starts = np.searchsorted(batch_of, np.arange(batch + 1))
        return cls(starts.astype(np.int64), rows, batch_of, index.num_items, keys)

    @property
    def batch(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def contains(self, batch_rows: IdArray, rows: IdArray) -> BoolArray:
        """Whether each ``rows[k]`` is excluded for batch row ``batch_rows[k]``."""
        keys = self.keys
        query = batch_rows * self.num_items + rows
        at = np.minimum(np.searchsorted(keys, query), max(keys.shape[0] - 1, 0))
        if keys.shape[0] == 0:
            return np.zeros(query.shape, dtype=bool)
        found: BoolArray = keys[at] == query
        return found

    def per_row_sum(self, values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """(B,) sums of ``values`` (one per excluded entry) by batch row."""
        sums: npt.NDArray[np.float64] = np.bincount(
            self.batch_of, weights=values, minlength=self.batch
        ).astype(np.float64)
        return sums

    def of_row(self, b: int) -> IdArray:
        return self.rows[self.offsets[b] : self.offsets[b + 1]]


def redraw_excluded(
    drawn: IdArray,
    exclusions: Exclusions,
    draw: Callable[[IdArray], IdArray],
    slots: IdArray | None = None,
    rounds: int = REJECTION_ROUNDS,
) -> IdArray:
    """Redraw, in place, the slots of ``drawn`` (B, K) catalogue rows that are excluded for
    their batch row, with ``draw(batch_rows) -> rows`` from the row's own proposal, until
    none is or ``rounds`` have passed. ``slots``: the flat slots to consider (all by
    default). Returns the flat slots still excluded (usually none)."""
    flat = drawn.reshape(-1)
    per_row = drawn.shape[1]
    if slots is None:
        slots = np.arange(flat.shape[0])
    slots = slots[exclusions.contains(slots // per_row, flat[slots])]
    for _ in range(rounds):
        if slots.size == 0:
            break
        flat[slots] = draw(slots // per_row)
        slots = slots[exclusions.contains(slots // per_row, flat[slots])]
    return slots


Allowed = Callable[[int], tuple[IdArray, npt.NDArray[np.float64] | None]]


def finish_explicitly(
    drawn: IdArray, slots: IdArray, allowed_of: Allowed, rng: np.random.Generator
) -> None:
    """Fill the flat ``slots`` of ``drawn`` (B, K) that rejection left excluded: per batch
    row b, draws with replacement from ``allowed_of(b)`` = (items, weights or None for
    uniform), the row's proposal restricted to what is not excluded."""
    flat = drawn.reshape(-1)
    per_row = drawn.shape[1]
    for b in np.unique(slots // per_row):
        mine = slots[slots // per_row == b]
        allowed, weights = allowed_of(int(b))
        if allowed.shape[0] == 0:
            raise InvalidInputError(
                f"row {int(b)}'s exclusions leave nothing its sampler could return"
            )
        p = None if weights is None else weights / weights.sum()
        flat[mine] = rng.choice(allowed, size=mine.shape[0], replace=True, p=p)


def uniform_remaining(positive_rows: IdArray, exclusions: Exclusions, num_items: int) -> IdArray:
    """(B,) items a uniform draw over the catalogue minus the positive may still return."""
    others = exclusions.rows != positive_rows[exclusions.batch_of]
    counts = np.bincount(exclusions.batch_of[others], minlength=exclusions.batch)
    remaining: IdArray = num_items - 1 - counts
    empty = np.flatnonzero(remaining <= 0)
    if empty.size:
        raise InvalidInputError(
            f"row {int(empty[0])}'s exclusions leave nothing its sampler could return"
        )
    return remaining


def allowed_rows(exclusions: Exclusions, b: int, positive_row: int) -> IdArray:
    """Catalogue rows neither excluded for batch row ``b`` nor its positive."""
    banned = np.append(exclusions.of_row(b), positive_row)
    allowed: IdArray = np.setdiff1d(np.arange(exclusions.num_items), banned)
    return allowed


def checked_csr(
    batch: int, ids: npt.ArrayLike, offsets: npt.ArrayLike
) -> tuple[npt.NDArray[Any], IdArray]:
    """Per-row exclusions in CSR form (row r: ``ids[offsets[r]:offsets[r + 1]]``): the ids as
    given and the offsets as int64, or :class:`InvalidInputError` for offsets of the wrong
    length, not starting at 0, decreasing or not ending at the number of ids, and for
    non-integers."""
    flat = np.asarray(ids)
    bounds = np.asarray(offsets)
    if flat.ndim != 1 or bounds.ndim != 1:
        raise InvalidInputError("exclude_ids and exclude_offsets must be flat lists")
    if bounds.shape[0] != batch + 1:
        raise InvalidInputError(
            f"exclude_offsets must hold B + 1 = {batch + 1} entries (row r excludes "
            f"exclude_ids[offsets[r]:offsets[r + 1]]), got {bounds.shape[0]}"
        )
    if (flat.size and flat.dtype.kind not in "iu") or bounds.dtype.kind not in "iu":
        raise InvalidInputError("exclude_ids and exclude_offsets must be integers")
    bounds = bounds.astype(np.int64)
    if bounds[0] != 0 or (np.diff(bounds) < 0).any() or bounds[-1] != flat.shape[0]:
        raise InvalidInputError(
            f"exclude_offsets must start at 0, never decrease and end at "
            f"len(exclude_ids) = {flat.shape[0]}"
        )
    return flat, bounds


def to_csr(per_row: Sequence[npt.ArrayLike]) -> tuple[IdArray, IdArray]:
    """Per-row id lists as the request's (exclude_ids, exclude_offsets); each row is checked
    and converted to int64 on its own, so rows of different dtypes never mix into floats."""
    arrays = []
    for ids in per_row:
        row = np.asarray(ids).ravel()
        if row.size and row.dtype.kind not in "iu":
            raise InvalidInputError(f"exclusions must be integer ids, got dtype {row.dtype}")
        if row.size and row.dtype.kind == "u" and row.max() > np.iinfo(np.int64).max:
            raise InvalidInputError("exclusions must fit in int64")
        arrays.append(row.astype(np.int64))
    lengths = np.array([row.size for row in arrays], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return flat, offsets


def exclusion_mask(ids: IdArray, offsets: IdArray, columns: npt.ArrayLike) -> BoolArray:
    """(B, C) bool: ``columns[c]`` is among row b's excluded ids (CSR ``ids`` / ``offsets``).

    The mask a trainer applies to batch-shared negatives, where row b also scores against
    other rows' negatives: the same exclusions the service applied to b's own draws.
    """
    cols = np.asarray(columns, dtype=np.int64)
    batch = offsets.shape[0] - 1
    distinct, inverse = np.unique(cols, return_inverse=True)
    hits = np.zeros((batch, distinct.shape[0]), dtype=bool)
    if ids.size and distinct.size:
        rows = np.repeat(np.arange(batch), np.diff(offsets))
        at = np.searchsorted(distinct, ids).clip(max=distinct.shape[0] - 1)
        found = distinct[at] == ids
        hits[rows[found], at[found]] = True
    mask: BoolArray = hits[:, inverse]
    return mask
