"""The codebook artifact: everything a sampler replica needs, in safe, checksummed files.

An artifact is a small set of named files (so the service can keep the very same bytes in
Redis or on disk):

``codebook.npz``        modality names, map weights/biases per modality, codewords;
``index.npz``           item ids, codes and the CSR arrays of :class:`ClusterIndex`;
``cluster_choice.npy``  (K_p, K_p) float64 cluster-choice distribution (sec. 3.3.3);
``embeddings.npy``      optional (N, d) float32 item-embedding snapshot for EDIS;
``popularity.npy``      optional (N,) float64 interaction counts, for the PNS baseline;
``manifest.json``       format, per-file sha256 and size, metadata and the version.

Only ``.npy``/``.npz`` (loaded with ``allow_pickle=False``) and JSON are used. The data
files are written byte-for-byte deterministically (canonical dtypes, C order, fixed zip
timestamps), so the version - a SHA-256 over the sorted (file name, file sha256) pairs -
identifies the content: the same codebook, index, distribution and snapshot always get the
same version, whatever the metadata. The byte-level encoding of each file is
``artifact_codec.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.artifact_codec import (
    F32,
    F64,
    codebook_npz_bytes,
    index_npz_bytes,
    load_npy,
    metadata_json,
    npy_bytes,
    read_codebook,
    read_index,
    typed,
)
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook
from esans_sampler.errors import ArtifactError, NotFoundError

FORMAT_NAME = "esans-codebook"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CODEBOOK_FILE = "codebook.npz"
INDEX_FILE = "index.npz"
CLUSTER_CHOICE_FILE = "cluster_choice.npy"
EMBEDDINGS_FILE = "embeddings.npy"
POPULARITY_FILE = "popularity.npy"
REQUIRED_FILES = (CODEBOOK_FILE, INDEX_FILE, CLUSTER_CHOICE_FILE)
DATA_FILES = (*REQUIRED_FILES, EMBEDDINGS_FILE, POPULARITY_FILE)
SHORT_VERSION_CHARS = 16

_ROW_SUM_ATOL = 1e-6


@dataclass(frozen=True, eq=False)  # identity equality: fields hold arrays
class CodebookArtifact:
    """A trained codebook with its catalogue index, ready to be saved or served.

    codebook: maps and codewords (K_p primary, K_s secondary).
    index: catalogue layout by (primary, secondary); same K_p and K_s as the codebook.
    cluster_choice: (K_p, K_p) float64, each row a distribution (sums to 1) or all zeros.
    embeddings: (N, d) float32 item embeddings in catalogue row order, or None.
    popularity: (N,) float64 non-negative interaction counts in catalogue row order (the
    popularity baseline draws by them), or None.
    metadata: JSON-serialisable dict (build parameters, stats, input checksums, ...);
    numpy scalars and arrays are accepted and stored as JSON numbers and lists.
    """

    codebook: Codebook
    index: ClusterIndex
    cluster_choice: npt.NDArray[np.float64]
    embeddings: npt.NDArray[np.float32] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    popularity: npt.NDArray[np.float64] | None = None
    _digest: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cb, index = self.codebook, self.index
        if (cb.num_primary, cb.num_secondary) != (index.num_primary, index.num_secondary):
            raise ArtifactError(
                f"codebook has K_p={cb.num_primary}, K_s={cb.num_secondary} but the index has "
                f"K_p={index.num_primary}, K_s={index.num_secondary}"
            )
        _check_cluster_choice(self.cluster_choice, cb.num_primary)
        if self.embeddings is not None:
            _check_embeddings(self.embeddings, index.num_items)
        if self.popularity is not None:
            _check_popularity(self.popularity, index.num_items)
        if not isinstance(self.metadata, dict):
            raise ArtifactError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        metadata_json(self.metadata)

    @property
    def digest(self) -> str:
        """Full hex SHA-256 content digest; equal to :attr:`version`."""
        if not self._digest:
            self._digest.append(_version_of(_data_files(self)))
        return self._digest[0]

    @property
    def version(self) -> str:
        """The content version: the 64-hex-char digest (see :func:`artifact_to_files`)."""
        return self.digest

    @property
    def short_version(self) -> str:
        """The first 16 hex characters of :attr:`version`, for display."""
        return self.version[:SHORT_VERSION_CHARS]

    @property
    def num_items(self) -> int:
        return self.index.num_items

    @property
    def has_embeddings(self) -> bool:
        return self.embeddings is not None


def _check_cluster_choice(choice: npt.NDArray[Any], num_primary: int) -> None:
    src = CLUSTER_CHOICE_FILE
    if not isinstance(choice, np.ndarray) or choice.shape != (num_primary, num_primary):
        shape = getattr(choice, "shape", None)
        raise ArtifactError(
            f"{src}: cluster choice must be ({num_primary}, {num_primary}), {shape}"
        )
    if not np.issubdtype(choice.dtype, np.floating):
        raise ArtifactError(f"{src}: cluster choice must be float, got dtype {choice.dtype}")
    if not np.isfinite(choice).all() or (choice < 0).any():
        raise ArtifactError(f"{src}: cluster choice must be finite and non-negative")
    sums = choice.sum(axis=1, dtype=np.float64)
    bad = ~(np.isclose(sums, 1.0, rtol=0.0, atol=_ROW_SUM_ATOL) | (sums == 0.0))
    if bad.any():
        row = int(np.argmax(bad))
        raise ArtifactError(
            f"{src}: every cluster-choice row must sum to 1 (or be all zero); row {row} sums "
            f"to {sums[row]:.9g}"
        )


def _check_popularity(popularity: npt.NDArray[Any], num_items: int) -> None:
    src = POPULARITY_FILE
    if not isinstance(popularity, np.ndarray) or popularity.shape != (num_items,):
        shape = getattr(popularity, "shape", None)
        raise ArtifactError(f"{src}: popularity must be ({num_items},), got shape {shape}")
    if popularity.dtype != np.float64:
        raise ArtifactError(f"{src}: popularity must be float64, got dtype {popularity.dtype}")
    if not np.isfinite(popularity).all() or (popularity < 0).any():
        raise ArtifactError(f"{src}: popularity counts must be finite and >= 0")


def _check_embeddings(embeddings: npt.NDArray[Any], num_items: int) -> None:
    src = EMBEDDINGS_FILE
    if not isinstance(embeddings, np.ndarray) or embeddings.ndim != 2:
        shape = getattr(embeddings, "shape", None)
        raise ArtifactError(f"{src}: embeddings must be a 2-D (N, d) array, got shape {shape}")
    if embeddings.dtype != np.float32:
        raise ArtifactError(f"{src}: embeddings must be float32, got dtype {embeddings.dtype}")
    if embeddings.shape[0] != num_items or embeddings.shape[1] == 0:
        raise ArtifactError(
            f"{src}: embeddings have shape {embeddings.shape}, expected ({num_items}, d>0): "
            "one row per catalogue item"
        )
    if not np.isfinite(embeddings).all():
        raise ArtifactError(f"{src}: embeddings contain NaN or inf")


# ----------------------------------------------------------------------------- writing


def _data_files(artifact: CodebookArtifact) -> dict[str, bytes]:
    files = {
        CODEBOOK_FILE: codebook_npz_bytes(artifact.codebook),
        INDEX_FILE: index_npz_bytes(artifact.index),
        CLUSTER_CHOICE_FILE: npy_bytes(artifact.cluster_choice, F64),
    }
    if artifact.embeddings is not None:
        files[EMBEDDINGS_FILE] = npy_bytes(artifact.embeddings, F32)
    if artifact.popularity is not None:
        files[POPULARITY_FILE] = npy_bytes(artifact.popularity, F64)
    return files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _version_from_hashes(hashes: Mapping[str, str]) -> str:
    """SHA-256 over the lines ``"{name}:{sha256}\\n"`` of the data files, sorted by name."""
    listing = "".join(f"{name}:{hashes[name]}\n" for name in sorted(hashes))
    return _sha256(listing.encode("ascii"))


def _version_of(files: Mapping[str, bytes]) -> str:
    return _version_from_hashes({name: _sha256(data) for name, data in files.items()})


def artifact_to_files(artifact: CodebookArtifact) -> dict[str, bytes]:
    """The artifact as file name -> bytes: the data files plus ``manifest.json``.

    The manifest holds ``format``/``format_version``, ``files`` (name -> sha256, size),
    ``version`` (full hex SHA-256 over the sorted ``"name:sha256\\n"`` lines of the data
    files), ``short_version`` (its first 16 characters), ``summary`` and ``metadata``.
    """
    files = _data_files(artifact)
    hashes = {name: _sha256(data) for name, data in files.items()}
    version = _version_from_hashes(hashes)
    if not artifact._digest:
        artifact._digest.append(version)
    cb, index = artifact.codebook, artifact.index
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "version": version,
        "short_version": version[:SHORT_VERSION_CHARS],
        "files": {
            name: {"sha256": hashes[name], "size": len(files[name])} for name in sorted(files)
        },
        "summary": {
            "num_items": index.num_items,
            "modality_names": list(cb.modality_names),
            "input_dims": list(cb.input_dims),
            "embedding_dim": cb.embedding_dim,
            "num_primary": cb.num_primary,
            "num_secondary": cb.num_secondary,
            "secondary": cb.secondary_mode,
            "snapshot_dim": None if artifact.embeddings is None else artifact.embeddings.shape[1],
            "has_popularity": artifact.popularity is not None,
        },
        # Insertion order is kept (not sorted): metadata dicts such as modality widths are
        # ordered. The manifest is not hashed into the version, so this costs nothing.
        "metadata": metadata_json(artifact.metadata),
    }
    files[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    return files


# ----------------------------------------------------------------------------- reading


def manifest_of(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The parsed, structurally checked ``manifest.json`` of ``files`` (no data hashing)."""
    raw = files.get(MANIFEST)
    if raw is None:
        raise ArtifactError(f"{MANIFEST} is missing: not a codebook artifact")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{MANIFEST}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{MANIFEST}: expected a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(
            f"{MANIFEST}: unknown format {manifest.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{MANIFEST}: unsupported format_version {manifest.get('format_version')!r}; this "
            f"release reads format_version {FORMAT_VERSION}"
        )
    entries = manifest.get("files")
    if not isinstance(entries, dict):
        raise ArtifactError(f"{MANIFEST}: 'files' must be an object")
    for name, entry in entries.items():
        if name not in DATA_FILES:
            raise ArtifactError(f"{MANIFEST}: unexpected file {name!r}; known: {DATA_FILES}")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
        ):
            raise ArtifactError(f"{MANIFEST}: entry for {name} needs a sha256 and a size")
    for name in REQUIRED_FILES:
        if name not in entries:
            raise ArtifactError(f"{MANIFEST}: does not list required file {name}")
    if not isinstance(manifest.get("metadata"), dict):
        raise ArtifactError(f"{MANIFEST}: 'metadata' must be an object")
    expected = _version_from_hashes({name: entry["sha256"] for name, entry in entries.items()})
    if manifest.get("version") != expected:
        raise ArtifactError(
            f"{MANIFEST}: version {manifest.get('version')!r} does not match its file list"
        )
    return manifest


def check_files(files: Mapping[str, bytes], verify: bool = True) -> None:
    """Raise :class:`ArtifactError` naming the first file that is missing, of the wrong
    size or (with ``verify``) whose sha256 differs from the manifest's."""
    manifest = manifest_of(files)
    for name, entry in manifest["files"].items():
        data = files.get(name)
        if data is None:
            raise ArtifactError(f"{name}: file is missing from the artifact")
        if len(data) != entry["size"]:
            raise ArtifactError(
                f"{name}: size {len(data)} bytes but the manifest says {entry['size']} "
                "(truncated or padded)"
            )
        if verify and _sha256(data) != entry["sha256"]:
            raise ArtifactError(f"{name}: checksum mismatch, the file is corrupted")


def artifact_from_files(files: Mapping[str, bytes], verify: bool = True) -> CodebookArtifact:
    """Rebuild an artifact from :func:`artifact_to_files` output, refusing anything damaged.

    Sizes are always checked; with ``verify`` the sha256 of every data file is too.
    Arrays are always checked for consistency (the index is rebuilt from ids and codes and
    must equal the stored CSR arrays). Raises :class:`ArtifactError` naming the file.
    """
    manifest = manifest_of(files)
    entries: dict[str, dict[str, Any]] = manifest["files"]
    check_files(files, verify=verify)
    codebook = read_codebook(CODEBOOK_FILE, files[CODEBOOK_FILE])
    index = read_index(INDEX_FILE, files[INDEX_FILE])
    choice = typed(
        CLUSTER_CHOICE_FILE,
        "cluster_choice",
        load_npy(CLUSTER_CHOICE_FILE, files[CLUSTER_CHOICE_FILE]),
        "f",
        2,
    )
    embeddings = None
    if EMBEDDINGS_FILE in entries:
        embeddings = typed(
            EMBEDDINGS_FILE,
            "embeddings",
            load_npy(EMBEDDINGS_FILE, files[EMBEDDINGS_FILE]),
            "f",
            2,
        )
    popularity = None
    if POPULARITY_FILE in entries:
        popularity = typed(
            POPULARITY_FILE,
            "popularity",
            load_npy(POPULARITY_FILE, files[POPULARITY_FILE]),
            "f",
            1,
        )
    artifact = CodebookArtifact(
        codebook=codebook,
        index=index,
        cluster_choice=choice,
        embeddings=embeddings,
        metadata=manifest["metadata"],
        popularity=popularity,
    )
    artifact._digest.append(manifest["version"])
    return artifact


# ----------------------------------------------------------------------------- disk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def save_artifact(artifact: CodebookArtifact, path: str | Path, overwrite: bool = False) -> str:
    """Write the artifact files into directory ``path`` atomically; return its version.

    The files are written and fsynced in a temporary sibling directory which is then
    renamed to ``path``. An existing non-empty ``path`` is refused unless ``overwrite``,
    in which case it is replaced (moved aside, then deleted after the rename).
    """
    target = Path(path)
    if target.exists() and not overwrite and not (target.is_dir() and not any(target.iterdir())):
        raise ArtifactError(f"{target}: already exists; pass overwrite=True to replace it")
    files = artifact_to_files(artifact)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    staging = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    staging.mkdir()
    try:
        for name in sorted(files, key=lambda n: n == MANIFEST):  # manifest last
            with (staging / name).open("wb") as handle:
                handle.write(files[name])
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_dir(staging)
        moved_aside = False
        if target.exists() or target.is_symlink():
            os.rename(target, old)
            moved_aside = True
        try:
            os.rename(staging, target)
        except OSError:
            if moved_aside:
                os.rename(old, target)
            raise
        _fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if old.exists() or old.is_symlink():
        _remove(old)
    return artifact.version


def read_artifact_files(path: str | Path) -> dict[str, bytes]:
    """``manifest.json`` and the data files it lists, read from directory ``path``."""
    directory = Path(path)
    if not directory.is_dir():
        raise NotFoundError(f"{directory}: no artifact directory there")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: {MANIFEST} is missing: not a codebook artifact")
    files = {MANIFEST: manifest_path.read_bytes()}
    for name in manifest_of(files)["files"]:
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{file}: file is missing from the artifact")
        files[name] = file.read_bytes()
    return files


def load_artifact(path: str | Path, verify: bool = True) -> CodebookArtifact:
    """The artifact saved at ``path`` by :func:`save_artifact`, checked as in
    :func:`artifact_from_files`."""
    return artifact_from_files(read_artifact_files(path), verify=verify)
