"""Codebook usage statistics: how well the codewords are used (pure numpy).

Codebook collapse (a few codewords taking most items) is the known failure of vector
quantisation, so every build reports utilisation: used codewords, perplexity of the code
usage (exp of its entropy: K for perfectly even use, 1 when one codeword takes everything)
and the spread of primary cluster sizes.
"""

from __future__ import annotations

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
    hist_counts, edges = np.histogram(primary_counts, bins=num_bins)
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
