"""Per-row exclusions applied to one ESANS draw (see :mod:`esans_sampler.exclusions`).

Simple negatives of row r (primary cluster p): a drawn cluster c whose items are all
excluded is drawn again from P(. | p), and an excluded item is drawn again uniformly inside
its cluster, so a slot holds item i of cluster c with probability

    q' = P(c | p) / (1 - P(F_r | p)) / (|c| - |E_r in c|),

F_r being the clusters E_r empties. Hard negatives: uniform without replacement from cluster
p minus the fine cell minus E_r, A' = A - |E_r among the candidates|, q' = 1 / A'. A row whose
hard draw hit E_r is drawn again from its explicit candidate list; a draw that missed E_r is
already uniform over the remaining candidates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from esans_sampler.errors import InvalidInputError
from esans_sampler.exclusions import REJECTION_ROUNDS, Exclusions

if TYPE_CHECKING:
    from esans_sampler.sampler import EsansSampler

IdArray = npt.NDArray[np.int64]
# Up to this many (row, cluster) pairs, excluded items are counted in a dense array.
_DENSE_COUNTS_MAX = 1 << 22
FloatArray = npt.NDArray[np.float64]
CodeArray = npt.NDArray[np.int32]


class EsansExclusion:
    """The exclusions of one batch, bound to the sampler that draws it."""

    def __init__(
        self,
        sampler: EsansSampler,
        exclude: Exclusions,
        primary: npt.NDArray[np.integer],
        fine: npt.NDArray[np.integer],
        rng: np.random.Generator,
    ) -> None:
        self._s, self._exclude, self._rng = sampler, exclude, rng
        self._primary = primary.astype(np.int64)
        self._fine = fine.astype(np.int64)
        index = sampler.index
        b = exclude.batch_of
        excluded_primary = index.primary[exclude.rows].astype(np.int64)
        excluded_fine = (
            excluded_primary * index.num_secondary + index.secondary[exclude.rows]
        ).astype(np.int64)
        own_cluster = excluded_primary == self._primary[b]
        # Simple draws never come from the row's own cluster: count the others per (row, c).
        k = index.num_primary
        pairs = b[~own_cluster] * k + excluded_primary[~own_cluster]
        if exclude.batch * k <= _DENSE_COUNTS_MAX:
            dense = np.bincount(pairs, minlength=exclude.batch * k)
            self._keys = np.flatnonzero(dense)
            self._counts = dense[self._keys]
        else:
            self._keys, self._counts = np.unique(pairs, return_counts=True)
        # Hard candidates: the own cluster minus the fine cell.
        hard = own_cluster & (excluded_fine != self._fine[b])
        self._hard_excluded = np.bincount(b[hard], minlength=exclude.batch)

    def _excluded_in(self, batch_rows: IdArray, clusters: IdArray) -> IdArray:
        """|E_r in c| for each (row, cluster) pair."""
        if self._keys.size == 0:
            return np.zeros(batch_rows.shape, dtype=np.int64)
        query = batch_rows * self._s.index.num_primary + clusters
        at = np.minimum(np.searchsorted(self._keys, query), self._keys.size - 1)
        found: IdArray = np.where(self._keys[at] == query, self._counts[at], 0)
        return found

    def simple(
        self,
        choice: Any,
        clusters: IdArray,
        row_starts: IdArray,
        position: IdArray,
        slot_log_q: npt.NDArray[np.floating[Any]],
    ) -> npt.NDArray[np.floating[Any]]:
        """Redraw, in place, emptied clusters (``clusters`` (B * m_c,)) and excluded items
        (``position`` (m_o, B * m_c) CSR positions); return the renormalised log q per draw."""
        s, rng = self._s, self._rng
        sizes = s.index.cluster_sizes
        offsets = s.index.cluster_offsets
        draws = clusters.shape[0]
        batch = self._exclude.batch
        m_c = draws // max(batch, 1)
        row_of_draw = np.arange(draws) // m_c
        # Emptied clusters, and the cluster-choice mass they take from their row (float64,
        # from the matrix itself).
        num_primary = s.index.num_primary
        key_row, key_cluster = np.divmod(self._keys, num_primary)
        emptied = self._counts >= sizes[key_cluster]
        p_emptied = choice.matrix[self._primary[key_row], key_cluster]
        taken = np.bincount(key_row[emptied], weights=p_emptied[emptied], minlength=batch)
        remaining = np.maximum(choice.matrix[self._primary].sum(axis=1) - taken, 0.0)
        dead = np.flatnonzero(remaining <= 0.0)
        if dead.size:
            raise InvalidInputError(
                f"row {int(dead[0])}'s exclusions empty every cluster its simple negatives "
                "may come from"
            )
        mass_left = remaining / choice.matrix[self._primary].sum(axis=1)
        redrawn = np.flatnonzero(self._excluded_in(row_of_draw, clusters) >= sizes[clusters])
        changed = redrawn
        for _ in range(REJECTION_ROUNDS):
            if redrawn.size == 0:
                break
            clusters[redrawn] = choice.table.draw_flat_with(
                row_starts[redrawn], rng.random(redrawn.size)
            )
            still = self._excluded_in(row_of_draw[redrawn], clusters[redrawn])
            redrawn = redrawn[still >= sizes[clusters[redrawn]]]
        for draw in redrawn:  # rows whose choice sits mostly on emptied clusters: exactly
            b = int(row_of_draw[draw])
            weights = choice.matrix[self._primary[b]].copy()
            weights[key_cluster[emptied & (key_row == b)]] = 0.0
            clusters[draw] = rng.choice(num_primary, p=weights / weights.sum())
        if changed.size:  # new clusters: new items for every slot of those draws
            u = rng.random((position.shape[0], changed.size)) * sizes[clusters[changed]]
            position[:, changed] = offsets[clusters[changed]] + u.astype(np.int64)
            slot_log_q = choice.simple_log_q_flat.take(row_starts + clusters)
        # Excluded items: drawn again inside the same cluster.
        draw_of_slot = np.broadcast_to(np.arange(draws), position.shape).ravel()
        flat = position.reshape(-1)
        row_of_slot = row_of_draw[draw_of_slot]
        slots = np.flatnonzero(self._exclude.contains(row_of_slot, s.index.ordered_rows[flat]))
        for _ in range(REJECTION_ROUNDS):
            if slots.size == 0:
                break
            c = clusters[draw_of_slot[slots]]
            flat[slots] = offsets[c] + (rng.random(slots.size) * sizes[c]).astype(np.int64)
            hit = self._exclude.contains(row_of_slot[slots], s.index.ordered_rows[flat[slots]])
            slots = slots[hit]
        for slot in slots:  # nearly emptied clusters: from the explicit remainder
            cluster = int(clusters[draw_of_slot[slot]])
            flat[slot] = rng.choice(self._remaining(int(row_of_slot[slot]), cluster))
        excluded = self._excluded_in(row_of_draw, clusters)
        size = sizes[clusters].astype(np.float64)
        renormalised: npt.NDArray[np.floating[Any]] = (
            slot_log_q - np.log(mass_left)[row_of_draw] + np.log(size) - np.log(size - excluded)
        ).astype(slot_log_q.dtype)
        return renormalised

    def _remaining(self, b: int, c: int) -> IdArray:
        """CSR positions of cluster c not excluded for row b."""
        index = self._s.index
        start, stop = index.cluster_offsets[c], index.cluster_offsets[c + 1]
        positions = np.arange(start, stop)
        keep = ~self._exclude.contains(np.full(positions.size, b), index.ordered_rows[start:stop])
        remaining: IdArray = positions[keep]
        return remaining

    def hard(
        self,
        position: IdArray,
        counts: CodeArray,
        filled: npt.NDArray[np.bool_] | None,
        log_q: npt.NDArray[np.float32],
    ) -> tuple[CodeArray, npt.NDArray[np.bool_] | None, npt.NDArray[np.float32]]:
        """Redraw, in place, rows of ``position`` (m_h, B) whose hard draw hit an excluded
        item; return the new counts, filled slots and log q (1 / A' per row)."""
        m_h, batch = position.shape
        if m_h == 0 or batch == 0:
            return counts, filled, log_q
        s, index = self._s, self._s.index
        is_filled = np.ones((m_h, batch), dtype=bool) if filled is None else filled
        rows = np.broadcast_to(np.arange(batch), position.shape)
        hit = self._exclude.contains(rows.ravel(), index.ordered_rows[position.ravel()])
        hit = hit.reshape(position.shape) & is_filled
        affected = np.flatnonzero(hit.any(axis=0))
        counts = counts.copy()
        is_filled = is_filled.copy()
        cell = s._cell_table.take(self._fine, axis=0)
        remaining = cell[:, 3] - self._hard_excluded
        # Rows that keep m_h: refill the hit slots, each from the candidates neither
        # excluded nor held by the row's other slots. The allowed slots of a uniform draw of
        # distinct candidates are uniform over the allowed ones, so the refilled tuple is
        # uniform over distinct allowed candidates. Other rows go to the explicit draw.
        refill = affected[remaining[affected] >= m_h]
        explicit = [int(b) for b in affected[remaining[affected] < m_h]]
        for slot in range(m_h):
            pending = refill[hit[slot, refill]]
            for _ in range(REJECTION_ROUNDS):
                if pending.size == 0:
                    break
                c = cell[pending]
                k = (self._rng.random(pending.size) * c[:, 3]).astype(np.int64) + c[:, 0]
                k += (k >= c[:, 1]) * c[:, 2]  # past the fine cell
                clash = (position[:, pending] == k).any(axis=0)
                clash |= self._exclude.contains(pending, index.ordered_rows[k])
                position[slot, pending[~clash]] = k[~clash]
                pending = pending[clash]
            explicit += [int(b) for b in pending]
        for b in dict.fromkeys(explicit):
            candidates = self._hard_candidates(int(b))
            k = min(m_h, candidates.size)
            position[:, b] = 0
            position[:k, b] = self._rng.choice(candidates, size=k, replace=False)
            counts[b] = k
            is_filled[:, b] = np.arange(m_h) < k
        shrunk = np.flatnonzero(self._hard_excluded)
        if shrunk.size:
            log_q = log_q.copy()
            log_q[shrunk] = -np.log(np.maximum(remaining[shrunk], 1)).astype(np.float32)[:, None]
        return counts, (None if is_filled.all() else is_filled), log_q

    def _hard_candidates(self, b: int) -> IdArray:
        """CSR positions of row b's hard candidates that are not excluded."""
        index = self._s.index
        p, f = int(self._primary[b]), int(self._fine[b])
        start, stop = index.cluster_offsets[p], index.cluster_offsets[p + 1]
        cell_start, cell_stop = index.fine_offsets[f], index.fine_offsets[f + 1]
        positions = np.concatenate((np.arange(start, cell_start), np.arange(cell_stop, stop)))
        keep = ~self._exclude.contains(np.full(positions.size, b), index.ordered_rows[positions])
        candidates: IdArray = positions[keep]
        return candidates
