"""The codebooks the evaluation publishes: MSAC builds (cached), PNS exponents, summaries."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_eval.budget import Budget
from esans_eval.datasets import item_label
from esans_eval.methods import SERVICE_PNS_ALPHA
from esans_eval.negatives import BEHAVIOUR_ONLY, GLOBAL_SECONDARY
from esans_eval.prepared import Prepared
from esans_sampler.artifact import CodebookArtifact, load_artifact, save_artifact
from esans_sampler.build import build_artifact
from esans_sampler.catalogue import Catalogue, validate_catalogue
from esans_sampler.msac import MSACConfig
from esans_sampler.stats import hard_coverage

IntArray = npt.NDArray[np.int64]


def build_codebook(
    data: Prepared,
    variant: str,
    num_primary: int,
    num_secondary: int,
    budget: Budget,
    cache_dir: str | Path | None = None,
) -> CodebookArtifact:
    """MSAC on the three modalities (``full``; ``global``: with the paper's global secondary
    codebook instead of the default per-cluster one) or on behaviour only. With
    ``cache_dir``, a build is saved there, keyed by its inputs and settings, and reused."""
    names = ("behaviour",) if variant == BEHAVIOUR_ONLY else ("text", "behaviour", "metadata")
    n = data.dataset.num_items
    catalogue = Catalogue(
        item_ids=np.arange(n, dtype=np.int64),
        modalities={m: data.modalities[m] for m in names},
        sources={m: f"<{data.dataset.name} {m}>" for m in names},
    )
    validate_catalogue(catalogue)
    config = MSACConfig(
        embedding_dim=budget.msac_dim,
        num_primary=num_primary,
        num_secondary=num_secondary,
        secondary="global" if variant == GLOBAL_SECONDARY else "per_cluster",
        epochs=budget.msac_epochs,
        batch_size=256,
        kmeans_init_items=min(n, 20_000),
        seed=0,
        num_threads=budget.threads,
    )
    key = hashlib.sha256(repr((data.features_digest, names, asdict(config))).encode()).hexdigest()[
        :20
    ]
    cached = None if cache_dir is None else Path(cache_dir) / f"codebook-{key}"
    if cached is not None and cached.is_dir():
        return load_artifact(cached)
    artifact = build_artifact(catalogue, config, popularity=data.popularity)
    if cached is not None:
        save_artifact(artifact, cached, overwrite=True)
    return artifact


def popularity_artifact(artifact: CodebookArtifact, alpha: float) -> CodebookArtifact:
    """``artifact`` with counts warped so the service's PNS, (count + 1) ** 0.75, draws by
    (count + 1) ** alpha: count' = (count + 1) ** (alpha / 0.75) - 1."""
    counts = artifact.popularity
    if counts is None:
        raise ValueError("the artifact has no popularity counts")
    warped = np.power(counts + 1.0, alpha / SERVICE_PNS_ALPHA) - 1.0
    metadata = {**artifact.metadata, "pns_alpha": alpha}
    return replace(artifact, popularity=warped.astype(np.float64), metadata=metadata)


def fine_cells(artifact: CodebookArtifact) -> IntArray:
    """(I,) each item's fine cell, primary * K_s + secondary."""
    index = artifact.index
    return index.primary.astype(np.int64) * index.num_secondary + index.secondary.astype(np.int64)


def cluster_examples(
    data: Prepared, artifact: CodebookArtifact, count: int = 4, per_cluster: int = 6
) -> list[dict[str, Any]]:
    """A few primary clusters (spread over the size ranking) with their most popular titles."""
    primary = artifact.index.primary
    sizes = np.bincount(primary, minlength=artifact.codebook.num_primary)
    ranked = [int(c) for c in np.argsort(-sizes) if sizes[c] > 0]
    picks = [ranked[int(i)] for i in np.linspace(0, len(ranked) - 1, num=min(count, len(ranked)))]
    out = []
    for c in dict.fromkeys(picks):
        members = np.nonzero(primary == c)[0]
        top = members[np.argsort(-data.popularity[members], kind="stable")][:per_cluster]
        genres: dict[str, int] = {}
        for i in members:
            for g in data.dataset.item_categories[int(i)]:
                genres[g] = genres.get(g, 0) + 1
        common = sorted(genres.items(), key=lambda kv: -kv[1])[:3]
        out.append(
            {
                "cluster": c,
                "size": int(sizes[c]),
                "titles": [item_label(data.dataset, int(i)) for i in top],
                "genres": [f"{g} {n / len(members):.0%}" for g, n in common],
            }
        )
    return out


def codebook_summary(data: Prepared, artifact: CodebookArtifact) -> dict[str, Any]:
    stats = dict(artifact.metadata.get("stats", {}))
    choice = np.asarray(artifact.cluster_choice, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(choice > 0, choice * np.log(choice), 0.0), axis=1)
    sizes = np.bincount(artifact.index.primary, minlength=artifact.codebook.num_primary)
    return {
        "version": artifact.short_version,
        "modalities": list(artifact.codebook.modality_names),
        "stats": stats,
        "secondary": artifact.codebook.secondary_mode,
        "hard_coverage": hard_coverage(artifact.index.fine_sizes).as_dict(),
        "effective_clusters_median": float(np.median(np.exp(ent[sizes > 0]))),
        "examples": cluster_examples(data, artifact),
    }
