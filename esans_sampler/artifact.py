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
same version, whatever the metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook
from esans_sampler.errors import ArtifactError, InvalidInputError, NotFoundError

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
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Canonical little-endian dtypes of every stored array, so the bytes never depend on the
# byte order, memory layout or dtype the caller happened to hold.
_F32 = np.dtype("<f4")
_F64 = np.dtype("<f8")
_I32 = np.dtype("<i4")
_I64 = np.dtype("<i8")


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
        _metadata_json(self.metadata)

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


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _metadata_json(metadata: Mapping[str, Any]) -> Any:
    """``metadata`` as plain JSON values (numpy scalars/arrays converted)."""
    try:
        return json.loads(json.dumps(metadata, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"metadata is not JSON-serialisable: {exc}") from exc


# ----------------------------------------------------------------------------- writing


def _npy_bytes(array: npt.NDArray[Any], dtype: np.dtype[Any]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array, dtype=dtype, order="C"), allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(arrays: Mapping[str, tuple[npt.NDArray[Any], np.dtype[Any]]]) -> bytes:
    """An uncompressed ``.npz`` (readable by ``np.load``) with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (array, dtype) in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(array, dtype))
    return buffer.getvalue()


def _data_files(artifact: CodebookArtifact) -> dict[str, bytes]:
    cb, index = artifact.codebook, artifact.index
    # Unicode (never object) array; only its byte order needs fixing.
    names = np.array(cb.modality_names, dtype=np.str_)
    codebook_arrays: dict[str, tuple[npt.NDArray[Any], np.dtype[Any]]] = {
        "modality_names": (names, names.dtype.newbyteorder("<")),
        "primary_codewords": (cb.primary_codewords, _F32),
        "secondary_codewords": (cb.secondary_codewords, _F32),
    }
    for m, (weight, bias) in enumerate(zip(cb.map_weights, cb.map_biases, strict=True)):
        codebook_arrays[f"map_weight_{m}"] = (weight, _F32)
        codebook_arrays[f"map_bias_{m}"] = (bias, _F32)
    files = {
        CODEBOOK_FILE: _npz_bytes(codebook_arrays),
        INDEX_FILE: _npz_bytes(
            {
                "item_ids": (index.item_ids, _I64),
                "primary": (index.primary, _I32),
                "secondary": (index.secondary, _I32),
                "ordered_rows": (index.ordered_rows, _I64),
                "cluster_offsets": (index.cluster_offsets, _I64),
                "fine_offsets": (index.fine_offsets, _I64),
                "num_primary": (np.array(index.num_primary), _I64),
                "num_secondary": (np.array(index.num_secondary), _I64),
            }
        ),
        CLUSTER_CHOICE_FILE: _npy_bytes(artifact.cluster_choice, _F64),
    }
    if artifact.embeddings is not None:
        files[EMBEDDINGS_FILE] = _npy_bytes(artifact.embeddings, _F32)
    if artifact.popularity is not None:
        files[POPULARITY_FILE] = _npy_bytes(artifact.popularity, _F64)
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
            "snapshot_dim": None if artifact.embeddings is None else artifact.embeddings.shape[1],
            "has_popularity": artifact.popularity is not None,
        },
        # Insertion order is kept (not sorted): metadata dicts such as modality widths are
        # ordered. The manifest is not hashed into the version, so this costs nothing.
        "metadata": _metadata_json(artifact.metadata),
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


def _load_npy(name: str, data: bytes) -> npt.NDArray[Any]:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{name}: not a readable .npy array ({exc})") from exc
    if not isinstance(loaded, np.ndarray):
        raise ArtifactError(f"{name}: expected a single .npy array")
    return loaded


def _load_npz(name: str, data: bytes, keys: list[str]) -> dict[str, npt.NDArray[Any]]:
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{name}: not a readable .npz archive ({exc})") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ArtifactError(f"{name}: expected an .npz archive, got a single array")
    try:
        missing = [key for key in keys if key not in npz.files]
        if missing:
            raise ArtifactError(f"{name}: lacks array(s) {missing}")
        arrays = {key: npz[key] for key in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{name}: unreadable array in .npz archive ({exc})") from exc
    finally:
        npz.close()
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # NpzFile returns raw bytes for non-.npy members
            raise ArtifactError(f"{name}: member {key!r} is not a .npy array")
    return arrays


def _typed(name: str, key: str, array: npt.NDArray[Any], kind: str, ndim: int) -> npt.NDArray[Any]:
    if array.dtype.kind != kind or array.ndim != ndim:
        raise ArtifactError(
            f"{name}: {key!r} has dtype {array.dtype} and {array.ndim} dims, expected kind "
            f"{kind!r} and {ndim} dims"
        )
    return array


def _read_codebook(data: bytes) -> Codebook:
    name = CODEBOOK_FILE
    head = _load_npz(name, data, ["modality_names", "primary_codewords", "secondary_codewords"])
    names = _typed(name, "modality_names", head["modality_names"], "U", 1)
    m = int(names.shape[0])
    per_modality = [f"map_weight_{i}" for i in range(m)] + [f"map_bias_{i}" for i in range(m)]
    maps = _load_npz(name, data, per_modality)
    try:
        return Codebook(
            modality_names=tuple(str(n) for n in names),
            map_weights=tuple(
                _typed(name, f"map_weight_{i}", maps[f"map_weight_{i}"], "f", 2) for i in range(m)
            ),
            map_biases=tuple(
                _typed(name, f"map_bias_{i}", maps[f"map_bias_{i}"], "f", 1) for i in range(m)
            ),
            primary_codewords=_typed(name, "primary_codewords", head["primary_codewords"], "f", 2),
            secondary_codewords=_typed(
                name, "secondary_codewords", head["secondary_codewords"], "f", 2
            ),
        )
    except InvalidInputError as exc:
        raise ArtifactError(f"{name}: inconsistent codebook ({exc})") from exc


def _read_index(data: bytes) -> ClusterIndex:
    name = INDEX_FILE
    keys = ["item_ids", "primary", "secondary", "ordered_rows", "cluster_offsets", "fine_offsets"]
    arrays = _load_npz(name, data, [*keys, "num_primary", "num_secondary"])
    for key in keys:
        _typed(name, key, arrays[key], "i", 1)
    k_p = int(_typed(name, "num_primary", arrays["num_primary"], "i", 0))
    k_s = int(_typed(name, "num_secondary", arrays["num_secondary"], "i", 0))
    try:
        index = ClusterIndex.build(
            arrays["item_ids"], arrays["primary"], arrays["secondary"], k_p, k_s
        )
    except InvalidInputError as exc:
        raise ArtifactError(f"{name}: inconsistent index ({exc})") from exc
    for key in ("ordered_rows", "cluster_offsets", "fine_offsets"):
        if not np.array_equal(arrays[key], getattr(index, key)):
            raise ArtifactError(
                f"{name}: stored {key!r} does not match the index rebuilt from ids and codes"
            )
    return index


def artifact_from_files(files: Mapping[str, bytes], verify: bool = True) -> CodebookArtifact:
    """Rebuild an artifact from :func:`artifact_to_files` output, refusing anything damaged.

    Sizes are always checked; with ``verify`` the sha256 of every data file is too.
    Arrays are always checked for consistency (the index is rebuilt from ids and codes and
    must equal the stored CSR arrays). Raises :class:`ArtifactError` naming the file.
    """
    manifest = manifest_of(files)
    entries: dict[str, dict[str, Any]] = manifest["files"]
    for name, entry in entries.items():
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
    codebook = _read_codebook(files[CODEBOOK_FILE])
    index = _read_index(files[INDEX_FILE])
    choice = _typed(
        CLUSTER_CHOICE_FILE,
        "cluster_choice",
        _load_npy(CLUSTER_CHOICE_FILE, files[CLUSTER_CHOICE_FILE]),
        "f",
        2,
    )
    embeddings = None
    if EMBEDDINGS_FILE in entries:
        embeddings = _typed(
            EMBEDDINGS_FILE,
            "embeddings",
            _load_npy(EMBEDDINGS_FILE, files[EMBEDDINGS_FILE]),
            "f",
            2,
        )
    popularity = None
    if POPULARITY_FILE in entries:
        popularity = _typed(
            POPULARITY_FILE,
            "popularity",
            _load_npy(POPULARITY_FILE, files[POPULARITY_FILE]),
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
