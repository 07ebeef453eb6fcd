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
from esans_sampler.catalogue_delta import error_summary, quantisation_errors
from esans_sampler.cluster_choice import cluster_choice_matrix
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook, l2_normalize
from esans_sampler.errors import CatalogueError
from esans_sampler.msac import EpochStats, MSACConfig, train_msac
from esans_sampler.stats import codebook_stats, hard_coverage

_EMBED_CHUNK_ROWS = 65_536


def msac_embeddings(codebook: Codebook, catalogue: Catalogue) -> npt.NDArray[np.float32]:
    """(N, d_m) float32 snapshot: the L2-normalised mean of the aligned modality embeddings.

    Used as the item-embedding snapshot for server-side EDIS when the trainer does not
    supply its own item-tower outputs.
    """
    out = np.empty((catalogue.num_items, codebook.embedding_dim), dtype=np.float32)
    for start in range(0, catalogue.num_items, _EMBED_CHUNK_ROWS):
        stop = min(start + _EMBED_CHUNK_ROWS, catalogue.num_items)
        embedded = codebook.embed(catalogue.rows(start, stop))
        out[start:stop] = l2_normalize(np.mean(np.stack(embedded), axis=0))
    return out


def _catalogue_errors(codebook: Codebook, catalogue: Catalogue) -> npt.NDArray[np.float32]:
    """Every item's primary quantisation error under the trained codebook."""
    errors = np.empty(catalogue.num_items, dtype=np.float32)
    for start in range(0, catalogue.num_items, _EMBED_CHUNK_ROWS):
        stop = min(start + _EMBED_CHUNK_ROWS, catalogue.num_items)
        chunk = dict(zip(codebook.modality_names, catalogue.rows(start, stop), strict=True))
        errors[start:stop] = quantisation_errors(codebook, chunk)[0]
    return errors


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

    ``embeddings``: None for no snapshot, ``"msac"`` for :func:`msac_embeddings`, or an
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
    snapshot: npt.NDArray[np.float32] | None
    if isinstance(embeddings, str):
        if embeddings != "msac":
            raise ValueError("embeddings must be None, 'msac' or an array")
        snapshot = msac_embeddings(codebook, catalogue)
    else:
        snapshot = embeddings
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
        "quantisation_error": error_summary(_catalogue_errors(codebook, catalogue)),
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
