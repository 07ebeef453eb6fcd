"""Codebook usage statistics: how well the codewords are used (pure numpy).

Codebook collapse (a few codewords taking most items) is the known failure of vector
quantisation, so every build reports utilisation: used codewords, perplexity of the code
usage (exp of its entropy: K for perfectly even use, 1 when one codeword takes everything)
and the spread of primary cluster sizes. Hard negatives need fine structure inside each
primary cluster, so :func:`hard_coverage` reports the fine cells per cluster and the share of
items that have at least m_h hard-negative candidates.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.errors import InvalidInputError


def usage_perplexity(counts: npt.ArrayLike) -> float:
    """``exp(entropy)`` of the usage distribution given per-codeword counts; 0.0 if all zero."""
    c = np.asarray(counts, dtype=np.float64).ravel()
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


@dataclass(frozen=True)
class CodebookStats:
    """Utilisation of the primary and secondary codebooks over a catalogue.

    ``cluster_size_*`` describe the sizes (items) of the K_p primary clusters, empty ones
    included: ``cluster_size_bin_edges`` (B + 1,) and ``cluster_size_counts`` (B,) are their
    histogram; ``empty_clusters`` counts primary clusters with no item. Perplexities are
    ``exp(entropy)`` of the code usage; ``fine_*`` refer to the (primary, secondary) cells.
    """

    num_items: int
    num_primary: int
    num_secondary: int
    primary_used: int
    primary_perplexity: float
    secondary_used: int
    secondary_perplexity: float
    fine_cells_used: int
    fine_perplexity: float
    empty_clusters: int
    cluster_size_min: int
    cluster_size_median: float
    cluster_size_max: int
    cluster_size_bin_edges: tuple[float, ...]
    cluster_size_counts: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def integer_histogram(
    values: npt.NDArray[np.int64], num_bins: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Counts and integer edges of at most ``num_bins`` bins over integer ``values``.

    Bin i holds ``edges[i] <= v < edges[i + 1]``; the last edge is ``max + 1``, so every bin
    is a whole range of integers and equal values make one bin, not ten empty ones.
    """
    lo, hi = int(values.min()), int(values.max()) + 1
    edges = np.unique(np.round(np.linspace(lo, hi, min(num_bins, hi - lo) + 1)).astype(np.int64))
    counts, _ = np.histogram(values, bins=edges)
    return counts.astype(np.int64), edges


def histogram_label(lo: float, hi: float) -> str:
    """``"first-last"`` for the integers in [lo, hi), ``"first"`` when there is one (older
    artifacts stored float edges, whose bins may hold no integer: then ``"lo-hi"`` as is)."""
    first, last = math.ceil(lo), math.ceil(hi) - 1
    if last < first:
        return f"{lo:g}-{hi:g}"
    return str(first) if last == first else f"{first}-{last}"


def _check_codes(name: str, codes: npt.ArrayLike, size: int) -> npt.NDArray[np.int64]:
    arr = np.asarray(codes)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{name} codes must be a 1-D integer array, got {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= size):
        raise InvalidInputError(
            f"{name} codes must lie in [0, {size}), got [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64, copy=False)


def codebook_stats(
    primary: npt.ArrayLike,
    secondary: npt.ArrayLike,
    num_primary: int,
    num_secondary: int,
    num_bins: int = 10,
) -> CodebookStats:
    """Utilisation statistics of the codes ``primary`` (N,) and ``secondary`` (N,).

    Args:
        primary: (N,) integer primary codes in [0, num_primary).
        secondary: (N,) integer secondary codes in [0, num_secondary).
        num_primary: K_p. num_secondary: K_s.
        num_bins: bins of the primary cluster-size histogram.
    """
    if num_primary < 1 or num_secondary < 1 or num_bins < 1:
        raise InvalidInputError("num_primary, num_secondary and num_bins must be >= 1")
    p = _check_codes("primary", primary, num_primary)
    s = _check_codes("secondary", secondary, num_secondary)
    if p.shape != s.shape:
        raise InvalidInputError(f"primary {p.shape} and secondary {s.shape} codes differ in length")
    if p.size == 0:
        raise InvalidInputError("codebook statistics need at least one item")
    primary_counts = np.bincount(p, minlength=num_primary)
    secondary_counts = np.bincount(s, minlength=num_secondary)
    fine_counts = np.bincount(p * num_secondary + s, minlength=num_primary * num_secondary)
    hist_counts, edges = integer_histogram(primary_counts, num_bins)
    return CodebookStats(
        num_items=int(p.size),
        num_primary=num_primary,
        num_secondary=num_secondary,
        primary_used=int(np.count_nonzero(primary_counts)),
        primary_perplexity=usage_perplexity(primary_counts),
        secondary_used=int(np.count_nonzero(secondary_counts)),
        secondary_perplexity=usage_perplexity(secondary_counts),
        fine_cells_used=int(np.count_nonzero(fine_counts)),
        fine_perplexity=usage_perplexity(fine_counts),
        empty_clusters=int(np.count_nonzero(primary_counts == 0)),
        cluster_size_min=int(primary_counts.min()),
        cluster_size_median=float(np.median(primary_counts)),
        cluster_size_max=int(primary_counts.max()),
        cluster_size_bin_edges=tuple(float(e) for e in edges),
        cluster_size_counts=tuple(int(c) for c in hist_counts),
    )


DEFAULT_M_H = 5  # hard negatives per positive asked for by default (m_h; the paper gives none)
# Below this share of items with m_h hard candidates, builds and inspect warn.
HARD_COVERAGE_WARNING = 0.9


@dataclass(frozen=True)
class HardCoverage:
    """How well a codebook can serve hard negatives.

    cells_per_cluster_*: used fine cells per non-empty primary cluster (min / median / max).
    share_with_m_h: share of items whose primary cluster holds at least ``m_h`` items outside
    their own fine cell, i.e. positives that get all ``m_h`` hard negatives they ask for.
    share_with_any: the same for at least one hard negative.
    """

    m_h: int
    cells_per_cluster_min: int
    cells_per_cluster_median: float
    cells_per_cluster_max: int
    share_with_m_h: float
    share_with_any: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def warning(self) -> str | None:
        """A plain-words warning when too few positives can get m_h hard negatives, else None."""
        if self.share_with_m_h >= HARD_COVERAGE_WARNING:
            return None
        return (
            f"only {self.share_with_m_h:.0%} of items have at least {self.m_h} hard-negative "
            f"candidates (items of their primary cluster outside their fine cell), and "
            f"{1 - self.share_with_any:.0%} have none; the median cluster holds "
            f"{self.cells_per_cluster_median:g} fine cell(s). Rebuild with --secondary "
            "per_cluster (the default) if this is a global secondary codebook, raise --ks, "
            "or lower --kp so that clusters are larger"
        )


def hard_coverage(fine_sizes: npt.ArrayLike, m_h: int = DEFAULT_M_H) -> HardCoverage:
    """:class:`HardCoverage` of a catalogue laid out in fine cells.

    fine_sizes: (K_p, K_s) item counts of the fine cells (``ClusterIndex.fine_sizes``).
    """
    sizes = np.asarray(fine_sizes, dtype=np.int64)
    if sizes.ndim != 2 or sizes.size == 0 or (sizes < 0).any():
        raise InvalidInputError(f"fine_sizes must be a (K_p, K_s) count matrix, got {sizes.shape}")
    if m_h < 0:
        raise InvalidInputError(f"m_h must be >= 0, got {m_h}")
    total = int(sizes.sum())
    if total == 0:
        raise InvalidInputError("hard coverage needs at least one item")
    cluster_sizes = sizes.sum(axis=1, keepdims=True)
    candidates = cluster_sizes - sizes  # per fine cell: items of the cluster outside it
    cells = np.count_nonzero(sizes, axis=1)[cluster_sizes[:, 0] > 0]
    return HardCoverage(
        m_h=m_h,
        cells_per_cluster_min=int(cells.min()),
        cells_per_cluster_median=float(np.median(cells)),
        cells_per_cluster_max=int(cells.max()),
        share_with_m_h=float(sizes[candidates >= m_h].sum() / total),
        share_with_any=float(sizes[candidates >= 1].sum() / total),
    )
