"""The build use case: catalogue -> trained MSAC -> codebook artifact.

Shared by ``esans build``, the demo and the benchmarks, so they all produce the same thing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler import __version__
from esans_sampler.artifact import CodebookArtifact
from esans_sampler.catalogue import Catalogue
from esans_sampler.catalogue_delta import error_summary, primary_errors
from esans_sampler.cluster_choice import cluster_choice_matrix
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook, l2_normalize, nearest_codeword
from esans_sampler.errors import CatalogueError
from esans_sampler.msac import EpochStats, MSACConfig, train_msac
from esans_sampler.stats import codebook_stats, hard_coverage

_EMBED_CHUNK_ROWS = 65_536


def errors_and_msac_snapshot(
    codebook: Codebook, catalogue: Catalogue, snapshot: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """In one pass over the catalogue: every item's primary quantisation error (the drift
    baseline of ``esans assign``) and, with ``snapshot``, its MSAC snapshot row (the
    L2-normalised mean of the aligned modality embeddings), used for server-side EDIS when the
    trainer does not supply its own item-tower outputs."""
    n = catalogue.num_items
    errors = np.empty(n, dtype=np.float32)
    rows = np.empty((n, codebook.embedding_dim), dtype=np.float32) if snapshot else None
    for start in range(0, n, _EMBED_CHUNK_ROWS):
        stop = min(start + _EMBED_CHUNK_ROWS, n)
        fused = codebook.fuse(codebook.embed(catalogue.rows(start, stop)))
        primary = nearest_codeword(fused, codebook.primary_codewords)
        errors[start:stop] = primary_errors(codebook, fused, primary)
        if rows is not None:
            rows[start:stop] = l2_normalize(fused)
    return errors, rows


def load_embedding_snapshot(path: str, num_items: int) -> npt.NDArray[np.float32]:
    """A user-supplied (N, d) item-embedding snapshot, checked against the catalogue."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"{path}: cannot read embeddings: {exc}") from exc
    if table.ndim != 2 or table.shape[0] != num_items:
        raise CatalogueError(
            f"{path}: embeddings have shape {table.shape}, expected ({num_items}, d) "
            "in the same row order as the ids file"
        )
    snapshot = np.asarray(table, dtype=np.float32)
    if not np.isfinite(snapshot).all():
        raise CatalogueError(f"{path}: embeddings contain NaN or inf")
    return snapshot


def load_popularity(path: str, num_items: int) -> npt.NDArray[np.float64]:
    """User-supplied (N,) interaction counts in catalogue row order, for the PNS baseline."""
    try:
        counts = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CatalogueError(f"{path}: cannot read popularity counts: {exc}") from exc
    if counts.shape != (num_items,) or counts.dtype.kind not in "iuf":
        raise CatalogueError(
            f"{path}: popularity counts have shape {counts.shape} and dtype {counts.dtype}, "
            f"expected ({num_items},) numbers in the same row order as the ids file"
        )
    popularity: npt.NDArray[np.float64] = counts.astype(np.float64)
    if not np.isfinite(popularity).all() or (popularity < 0).any():
        raise CatalogueError(f"{path}: popularity counts must be finite and >= 0")
    return popularity


def build_artifact(
    catalogue: Catalogue,
    config: MSACConfig,
    gamma: float = 1.0,
    embeddings: npt.NDArray[np.float32] | str | None = None,
    popularity: npt.NDArray[np.float64] | None = None,
    input_checksums: dict[str, str] | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    show_progress_bar: bool = False,
) -> CodebookArtifact:
    """Train MSAC on ``catalogue`` and package everything a sampler replica needs.

    ``embeddings``: None for no snapshot, ``"msac"`` for the MSAC snapshot
    (:func:`errors_and_msac_snapshot`), or an
    (N, d) array of the trainer's item-tower outputs in catalogue row order. ``popularity``:
    optional (N,) interaction counts, stored for the popularity (PNS) baseline.
    """
    result = train_msac(
        catalogue.modalities, config, progress=on_epoch, show_progress_bar=show_progress_bar
    )
    codebook = result.codebook
    index = ClusterIndex.build(
        catalogue.item_ids,
        result.primary,
        result.secondary,
        codebook.num_primary,
        codebook.num_secondary,
    )
    choice = cluster_choice_matrix(codebook.primary_codewords, index.cluster_sizes, gamma)
    if isinstance(embeddings, str) and embeddings != "msac":
        raise ValueError("embeddings must be None, 'msac' or an array")
    errors, msac_rows = errors_and_msac_snapshot(codebook, catalogue, isinstance(embeddings, str))
    snapshot = msac_rows if isinstance(embeddings, str) else embeddings
    metadata: dict[str, Any] = {
        "esans_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "parameters": {**asdict(config), "gamma": gamma},
        "catalogue": {
            "num_items": catalogue.num_items,
            "modalities": dict(catalogue.widths),
            "sources": dict(catalogue.sources),
            "sha256": dict(input_checksums or {}),
        },
        "stats": codebook_stats(
            result.primary, result.secondary, codebook.num_primary, codebook.num_secondary
        ).as_dict(),
        "hard_coverage": hard_coverage(index.fine_sizes).as_dict(),
        "history": [asdict(epoch) for epoch in result.history],
        "embeddings": None
        if snapshot is None
        else {
            "dim": int(snapshot.shape[1]),
            "source": "msac" if isinstance(embeddings, str) else "file",
        },
        # The baseline of drift checks (esans assign): errors and cluster sizes at build time.
        "quantisation_error": error_summary(errors),
        "build_cluster_sizes": index.cluster_sizes.astype(int).tolist(),
    }
    return CodebookArtifact(
        codebook=codebook,
        index=index,
        cluster_choice=choice,
        embeddings=snapshot,
        metadata=metadata,
        popularity=popularity,
    )
