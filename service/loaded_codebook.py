"""A codebook ready to serve: a verified artifact with every sampler built on it.

:func:`load_codebook` builds the samplers (ESANS with the artifact's stored cluster choice,
UNS, MNS and, when the artifact carries counts, PNS); :func:`shared_snapshot` lets the worker
processes of a replica map one copy of the embedding snapshot. The registry keeps these.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from esans_sampler.artifact import CodebookArtifact
from esans_sampler.baselines import MixedSampler, PopularitySampler, UniformSampler
from esans_sampler.cluster_choice import validate_gamma
from esans_sampler.errors import ArtifactError, InvalidInputError
from esans_sampler.sampler import EsansSampler

POPULARITY_METADATA_KEY = "popularity"
DEFAULT_GAMMA = 1.0


@dataclass(frozen=True, eq=False)
class LoadedCodebook:
    """A verified artifact with its samplers built, ready to serve requests.

    popularity: the PNS baseline when the artifact carries per-item counts
    (``popularity.npy``, or a list under ``"popularity"`` in its metadata), else None.
    loaded_at: unix seconds.
    """

    version: str
    artifact: CodebookArtifact
    esans: EsansSampler
    uniform: UniformSampler
    mixed: MixedSampler
    popularity: PopularitySampler | None
    loaded_at: float


def _artifact_gamma(artifact: CodebookArtifact) -> float:
    """The gamma the artifact's cluster-choice matrix was built with (build metadata)."""
    parameters = artifact.metadata.get("parameters")
    gamma = parameters.get("gamma") if isinstance(parameters, dict) else None
    if gamma is None:
        return DEFAULT_GAMMA
    try:
        return validate_gamma(float(gamma))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"artifact metadata has an invalid gamma {gamma!r}: {exc}") from exc


def shared_snapshot(
    artifact: CodebookArtifact, npy_bytes: bytes, directory: Path
) -> CodebookArtifact:
    """``artifact`` with its embedding snapshot read-only memory-mapped from
    ``directory/<version>.npy``, written there (atomically) by the first process that needs
    it; every process mapping it shares the same page-cache pages."""
    path = directory / f"{artifact.version}.npy"
    if not path.exists():
        temporary = directory / f".{artifact.version}.{os.getpid()}.tmp"
        temporary.write_bytes(npy_bytes)
        os.replace(temporary, path)
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    expected = None if artifact.embeddings is None else artifact.embeddings.shape
    if mapped.shape != expected or mapped.dtype != np.float32:
        raise ArtifactError(f"{path} does not hold the snapshot of {artifact.version}")
    shared = replace(artifact, embeddings=mapped)
    shared._digest[:] = [artifact.version]  # same content: no second hash of every file
    return shared


def load_codebook(artifact: CodebookArtifact) -> LoadedCodebook:
    """Build every sampler of ``artifact`` (ESANS with its stored cluster choice, UNS, MNS
    and, when the metadata carries counts, PNS).

    Raises:
        ArtifactError: the artifact cannot be served (bad gamma or popularity counts).
        FailedPreconditionError: ESANS cannot run on it (fewer than 2 non-empty clusters).
    """
    index = artifact.index
    esans = EsansSampler(
        index,
        artifact.codebook.primary_codewords,
        gamma=_artifact_gamma(artifact),
        cluster_choice=artifact.cluster_choice,
    )
    popularity = None
    counts: Any = artifact.popularity
    if counts is None:  # artifacts of earlier builds carried the counts in their metadata
        counts = artifact.metadata.get(POPULARITY_METADATA_KEY)
    if counts is not None:
        try:
            popularity = PopularitySampler(index, np.asarray(counts, dtype=np.float64))
        except (InvalidInputError, TypeError, ValueError) as exc:
            raise ArtifactError(f"artifact popularity counts are unusable: {exc}") from exc
    return LoadedCodebook(
        version=artifact.version,
        artifact=artifact,
        esans=esans,
        uniform=UniformSampler(index),
        mixed=MixedSampler(index),
        popularity=popularity,
        loaded_at=time.time(),
    )
