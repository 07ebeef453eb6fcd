"""A living catalogue: items added and retired without retraining MSAC, and drift checks.

New items are assigned with the trained maps and codebooks (:meth:`Codebook.assign`), no
training; :func:`apply_delta` turns a base artifact and a :class:`CatalogueDelta` into a
complete new artifact (base + added - retired), with the cluster choice recomputed for the
new cluster sizes, so it publishes like any other version.

Drift: the build records the distribution of the primary quantisation error, the distance
from an item's fused embedding r_p (eq. 5) to its primary codeword. A delta reports its new
items' errors against that baseline, how much each cluster grew and the share of the
catalogue added since the build, and turns them into a plain recommendation (thresholds
below, documented in the README).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.artifact import CodebookArtifact
from esans_sampler.cluster_choice import cluster_choice_matrix
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook, l2_normalize
from esans_sampler.errors import ArtifactError, InvalidInputError

IdArray = npt.NDArray[np.int64]
CodeArray = npt.NDArray[np.int32]
F32 = npt.NDArray[np.float32]

# Rebuild when any of these is crossed (README "Keeping the catalogue fresh").
REBUILD_ERROR_RATIO = 1.25  # new items' median error over the build's median
REBUILD_ADDED_SHARE = 0.20  # items added since the build over the build's catalogue
REBUILD_CLUSTER_GROWTH = 0.50  # a cluster grown by half of its build size
DELTA_FORMAT = "esans-delta"
DELTA_MANIFEST = "delta.json"
DELTA_ARRAYS = "delta.npz"
_CHUNK_ROWS = 65_536


def primary_errors(codebook: Codebook, fused: F32, primary: CodeArray) -> F32:
    """Per item, the primary quantisation error ``||r_p - z_p||`` of its fused embedding."""
    errors: F32 = np.linalg.norm(fused - codebook.primary_codewords[primary], axis=1)
    return errors.astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class Placement:
    """Where new items land in a trained codebook: codes, primary quantisation errors and
    their MSAC snapshot rows (the L2-normalised fused embedding), computed in one pass."""

    primary: CodeArray
    secondary: CodeArray
    errors: F32
    msac_rows: F32


def place(codebook: Codebook, features: Mapping[str, npt.ArrayLike]) -> Placement:
    """Embed the items of ``features`` once, in chunks, and derive everything from that."""
    arrays = {name: np.asarray(values) for name, values in features.items()}
    n = next(iter(arrays.values())).shape[0] if arrays else 0
    primary = np.empty(n, dtype=np.int32)
    secondary = np.empty(n, dtype=np.int32)
    errors = np.empty(n, dtype=np.float32)
    rows = np.empty((n, codebook.embedding_dim), dtype=np.float32)
    for start in range(0, n, _CHUNK_ROWS):
        part = slice(start, start + _CHUNK_ROWS)
        embedded = codebook.embed({name: a[part] for name, a in arrays.items()})
        primary[part], secondary[part] = codebook.assign_embedded(embedded)
        fused = codebook.fuse(embedded)
        errors[part] = primary_errors(codebook, fused, primary[part])
        rows[part] = l2_normalize(fused)
    return Placement(primary, secondary, errors, rows)


def error_summary(errors: npt.ArrayLike) -> dict[str, float | int]:
    """count, mean and p50 / p90 / p99 of a quantisation-error sample."""
    e = np.asarray(errors, dtype=np.float64)
    if e.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(e, [50, 90, 99])
    return {"count": int(e.size), "mean": float(e.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99)}  # fmt: skip


@dataclass(frozen=True, eq=False)
class CatalogueDelta:
    """Items to add (with their codes, and snapshot rows when the base has a snapshot) and
    items to retire, against ``base_version``; ``drift`` is the report of :func:`drift_report`.
    """

    base_version: str
    added_ids: IdArray
    added_primary: CodeArray
    added_secondary: CodeArray
    retired_ids: IdArray
    added_embeddings: F32 | None = None
    added_popularity: npt.NDArray[np.float64] | None = None
    drift: dict[str, Any] = field(default_factory=dict)


def assign_delta(
    base: CodebookArtifact,
    new_ids: npt.ArrayLike,
    features: Mapping[str, npt.ArrayLike],
    retired_ids: npt.ArrayLike | None = None,
    embeddings: npt.ArrayLike | None = None,
    popularity: npt.ArrayLike | None = None,
) -> CatalogueDelta:
    """Assign ``new_ids`` with the base's trained maps and codebooks; retire ``retired_ids``.

    ``features``: per modality, the new items' raw features (n, D_m) in ``new_ids`` order.
    ``embeddings``: their snapshot rows (n, d), needed when the base's snapshot is not the
    MSAC mean embedding (otherwise that is computed). Raises :class:`InvalidInputError` for
    ids already in the catalogue (and not retired), retired ids not in it, repeated ids, or
    features and embeddings of the wrong shape.
    """
    ids = np.asarray(new_ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise InvalidInputError(
            f"new ids must be a flat integer array, got {ids.dtype} {ids.shape}"
        )
    ids = ids.astype(np.int64)
    retired = np.zeros(0, np.int64) if retired_ids is None else np.asarray(retired_ids)
    if retired.ndim != 1 or (retired.size and retired.dtype.kind not in "iu"):
        raise InvalidInputError("retired ids must be a flat integer array")
    retired = np.unique(retired.astype(np.int64))
    if np.unique(ids).size != ids.size:
        raise InvalidInputError("new ids repeat")
    known = base.index.item_ids
    missing = retired[~np.isin(retired, known)]
    if missing.size:
        raise InvalidInputError(
            f"{missing.size} retired ids are not in the catalogue: {missing[:5].tolist()}"
        )
    clash = ids[np.isin(ids, known) & ~np.isin(ids, retired)]
    if clash.size:
        raise InvalidInputError(
            f"{clash.size} new ids are already in the catalogue: {clash[:5].tolist()}; retire "
            "them in the same delta to replace them"
        )
    codebook = base.codebook
    if ids.size:
        placed = place(codebook, features)
    else:  # a delta that only retires
        no_codes, dim = np.zeros(0, np.int32), codebook.embedding_dim
        empty = np.zeros((0, dim), np.float32)
        placed = Placement(no_codes, no_codes, np.zeros(0, np.float32), empty)
    primary, secondary, errors = placed.primary, placed.secondary, placed.errors
    if primary.shape[0] != ids.shape[0]:
        raise InvalidInputError(f"features hold {primary.shape[0]} rows for {ids.size} new ids")
    snapshot = _snapshot_rows(base, placed.msac_rows, ids.size, embeddings)
    counts = None
    if popularity is not None:
        counts = np.asarray(popularity, dtype=np.float64)
        if counts.shape != ids.shape or not np.isfinite(counts).all() or (counts < 0).any():
            raise InvalidInputError("popularity must be (n,) finite counts >= 0")
    delta = CatalogueDelta(
        base_version=base.version,
        added_ids=ids,
        added_primary=primary.astype(np.int32),
        added_secondary=secondary.astype(np.int32),
        retired_ids=retired,
        added_embeddings=snapshot,
        added_popularity=counts,
    )
    return CatalogueDelta(**{**delta.__dict__, "drift": drift_report(base, delta, errors)})


def _snapshot_rows(base: CodebookArtifact, msac_rows: F32, n: int, embeddings: Any) -> F32 | None:
    if base.embeddings is None:
        return None
    dim = base.embeddings.shape[1]
    if embeddings is not None:
        rows = np.asarray(embeddings, dtype=np.float32)
        if rows.shape != (n, dim) or not np.isfinite(rows).all():
            raise InvalidInputError(
                f"embeddings must be ({n}, {dim}) finite numbers, got {rows.shape}"
            )
        return rows
    source = (base.metadata.get("embeddings") or {}).get("source", "msac")
    if source != "msac" or dim != base.codebook.embedding_dim:
        raise InvalidInputError(
            "the base artifact's embedding snapshot comes from your item tower, not MSAC: pass "
            "the new items' rows with --embeddings (an (n, d) .npy in the order of --ids)"
        )
    return msac_rows.astype(np.float32, copy=False)


def drift_report(
    base: CodebookArtifact, delta: CatalogueDelta, new_errors: npt.ArrayLike
) -> dict[str, Any]:
    """New items' quantisation error against the build's, cluster growth since the build,
    the share added since the build, and a recommendation."""
    meta = base.metadata
    build_items = int((meta.get("catalogue") or {}).get("num_items") or base.index.num_items)
    added_before = int((meta.get("delta") or {}).get("added_since_build", 0))
    added_since_build = added_before + int(delta.added_ids.size)
    build_sizes = np.asarray(meta.get("build_cluster_sizes") or base.index.cluster_sizes)
    added_per_cluster = np.bincount(delta.added_primary, minlength=base.index.num_primary)
    before = np.asarray(
        (meta.get("delta") or {}).get("added_per_cluster") or np.zeros_like(build_sizes)
    )
    since_build = before + added_per_cluster
    growth = since_build / np.maximum(build_sizes, 1)
    new = error_summary(new_errors)
    baseline = meta.get("quantisation_error")
    ratio = None
    if baseline and new.get("count") and baseline.get("p50"):
        ratio = float(new["p50"]) / float(baseline["p50"])
    earlier = meta.get("delta") or {}
    # The worst fit of any delta since the build: well-fitting items added later do not make
    # badly fitting ones served since then go away.
    ratios = [r for r in (ratio, earlier.get("error_ratio_since_build")) if r is not None]
    worst = max(ratios) if ratios else None
    reasons = []
    if worst is not None and worst > REBUILD_ERROR_RATIO and (ratio is None or ratio < worst):
        reasons.append(
            f"items added by an earlier delta sit {worst:.2f}x as far from their primary "
            f"codewords as the built ones (threshold {REBUILD_ERROR_RATIO})"
        )
    if ratio is not None and ratio > REBUILD_ERROR_RATIO:
        reasons.append(
            f"new items sit {ratio:.2f}x as far from their primary codewords as the built "
            f"ones (median; threshold {REBUILD_ERROR_RATIO})"
        )
    share = added_since_build / max(build_items, 1)
    if share > REBUILD_ADDED_SHARE:
        reasons.append(f"{share:.0%} of the catalogue was added since the build (threshold "
                       f"{REBUILD_ADDED_SHARE:.0%})")  # fmt: skip
    grown = np.flatnonzero(growth > REBUILD_CLUSTER_GROWTH)
    if grown.size:
        reasons.append(f"{grown.size} primary clusters grew by more than "
                       f"{REBUILD_CLUSTER_GROWTH:.0%} since the build")  # fmt: skip
    largest = int(np.argmax(growth)) if growth.size else 0
    return {
        "base_version": base.version,
        "added": int(delta.added_ids.size),
        "retired": int(delta.retired_ids.size),
        "added_since_build": added_since_build,
        "added_share_since_build": share,
        "added_per_cluster": since_build.astype(int).tolist(),
        "largest_cluster_growth": {
            "cluster": largest,
            "growth": float(growth[largest]) if growth.size else 0.0,
        },
        "new_error": new,
        "build_error": baseline,
        "error_ratio_p50": ratio,
        "error_ratio_since_build": worst,
        "rebuild": bool(reasons),
        "recommendation": ("rebuild the codebook (esans build): " + "; ".join(reasons))
        if reasons
        else "no rebuild needed: new items fit the trained codebooks",
    }


def apply_delta(base: CodebookArtifact, delta: CatalogueDelta) -> CodebookArtifact:
    """The complete artifact base + added - retired, with the cluster choice recomputed for
    the new cluster sizes (same gamma) and the drift recorded in its metadata."""
    if delta.base_version != base.version:
        raise ArtifactError(
            f"the delta was assigned against {delta.base_version[:16]}, not {base.version[:16]}"
        )
    index = base.index
    keep = ~np.isin(index.item_ids, delta.retired_ids)
    item_ids = np.concatenate((index.item_ids[keep], delta.added_ids))
    primary = np.concatenate((index.primary[keep], delta.added_primary))
    secondary = np.concatenate((index.secondary[keep], delta.added_secondary))
    new_index = ClusterIndex.build(
        item_ids, primary, secondary, index.num_primary, index.num_secondary
    )
    gamma = float((base.metadata.get("parameters") or {}).get("gamma", 1.0))
    choice = cluster_choice_matrix(base.codebook.primary_codewords, new_index.cluster_sizes, gamma)
    embeddings = None
    if base.embeddings is not None:
        if delta.added_embeddings is None:
            raise ArtifactError(
                "the base has an embedding snapshot but the delta has no rows for it"
            )
        embeddings = np.concatenate((base.embeddings[keep], delta.added_embeddings))
    popularity = None
    if base.popularity is not None:
        added = delta.added_popularity
        if added is None:
            added = np.zeros(delta.added_ids.size)
        popularity = np.concatenate((base.popularity[keep], added))
    metadata = dict(base.metadata)
    metadata.setdefault("build_cluster_sizes", index.cluster_sizes.astype(int).tolist())
    metadata["delta"] = {**delta.drift, "base_version": base.version}
    return CodebookArtifact(
        codebook=base.codebook,
        index=new_index,
        cluster_choice=choice,
        embeddings=embeddings,
        metadata=metadata,
        popularity=popularity,
    )


# ----------------------------------------------------------------------------- files


def delta_to_files(delta: CatalogueDelta) -> dict[str, bytes]:
    """``delta.json`` (format, base version, drift) and ``delta.npz`` (the arrays)."""
    arrays: dict[str, Any] = {
        "added_ids": delta.added_ids,
        "added_primary": delta.added_primary,
        "added_secondary": delta.added_secondary,
        "retired_ids": delta.retired_ids,
    }
    if delta.added_embeddings is not None:
        arrays["added_embeddings"] = delta.added_embeddings
    if delta.added_popularity is not None:
        arrays["added_popularity"] = delta.added_popularity
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    manifest = {"format": DELTA_FORMAT, "base_version": delta.base_version, "drift": delta.drift}
    return {
        DELTA_MANIFEST: json.dumps(manifest, sort_keys=True, indent=1).encode(),
        DELTA_ARRAYS: buffer.getvalue(),
    }


def is_delta(files: Mapping[str, bytes]) -> bool:
    return DELTA_MANIFEST in files


def delta_from_files(files: Mapping[str, bytes]) -> CatalogueDelta:
    """The delta of :func:`delta_to_files`; :class:`ArtifactError` if it is malformed."""
    try:
        manifest = json.loads(files[DELTA_MANIFEST])
        if manifest.get("format") != DELTA_FORMAT:
            raise ArtifactError(f"{DELTA_MANIFEST} is not an {DELTA_FORMAT} manifest")
        with np.load(io.BytesIO(files[DELTA_ARRAYS]), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        return CatalogueDelta(
            base_version=str(manifest["base_version"]),
            added_ids=arrays["added_ids"].astype(np.int64),
            added_primary=arrays["added_primary"].astype(np.int32),
            added_secondary=arrays["added_secondary"].astype(np.int32),
            retired_ids=arrays["retired_ids"].astype(np.int64),
            added_embeddings=arrays.get("added_embeddings"),
            added_popularity=arrays.get("added_popularity"),
            drift=dict(manifest.get("drift") or {}),
        )
    except (KeyError, ValueError, OSError) as exc:
        raise ArtifactError(f"not a readable catalogue delta: {exc}") from exc
