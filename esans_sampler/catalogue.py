"""Item catalogues: item ids plus one frozen feature matrix per modality (R_m, N x D_m).

Two on-disk layouts are read:

* ``.npy`` files, one for the ids and one per modality, opened memory-mapped so a catalogue
  larger than RAM is streamed batch by batch (:meth:`Catalogue.rows`);
* one Parquet file with an integer id column and one ``list<float>`` (or
  ``fixed_size_list<float>``) column per modality, read into memory.

Every loader ends with :func:`validate_catalogue`, which raises :class:`CatalogueError`
naming the offending file and the problem, so a bad input fails before any training starts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esans_sampler.errors import CatalogueError, InvalidInputError

IdArray = npt.NDArray[np.int64]
FeatureArray = npt.NDArray[np.floating[Any]]
FloatArray = npt.NDArray[np.float32]

IDS_KEY = "ids"
"""Key of the id file in :attr:`Catalogue.sources`; reserved, so no modality may use it."""

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_MAX_NAMED = 5
_HASH_CHUNK = 1 << 20
_INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Catalogue:
    """Item ids and the per-modality feature matrices, all in catalogue row order.

    item_ids: (N,) int64 (the loaders convert any integer dtype).
    modalities: name -> (N, D_m) float16/32/64, possibly an ``np.memmap``; insertion order
    is the modality order used everywhere else (codebook, artifact).
    sources: for :data:`IDS_KEY` and for each modality name, the file it was read from.
    """

    item_ids: IdArray
    modalities: dict[str, FeatureArray]
    sources: dict[str, str]

    @property
    def num_items(self) -> int:
        return int(self.item_ids.shape[0])

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(self.modalities)

    @property
    def widths(self) -> dict[str, int]:
        """D_m of each modality, in modality order."""
        return {name: int(a.shape[1]) for name, a in self.modalities.items()}

    @property
    def feature_bytes(self) -> int:
        """Total size in bytes of the modality matrices (as stored, before any cast)."""
        return int(sum(a.nbytes for a in self.modalities.values()))

    def source(self, key: str) -> str:
        """The file ``key`` (a modality name or :data:`IDS_KEY`) came from, for messages."""
        return self.sources.get(key, f"<{key}>")

    def rows(self, start: int, stop: int) -> list[FloatArray]:
        """Rows ``start:stop`` of every modality, each a fresh (stop - start, D_m) float32.

        Only that range is read and cast, so memory-mapped float64/float16 files are
        streamed. ``stop`` is clamped to ``num_items`` like a slice bound.
        """
        if start < 0 or stop < start:
            raise InvalidInputError(f"invalid row range [{start}, {stop})")
        stop = min(stop, self.num_items)
        start = min(start, stop)
        return [np.array(a[start:stop], dtype=np.float32) for a in self.modalities.values()]


def validate_catalogue(catalogue: Catalogue, chunk_rows: int = 65_536) -> None:
    """Raise :class:`CatalogueError` unless ``catalogue`` is usable as ESANS input.

    Checks names, shapes, dtypes, row counts, unique ids and finiteness. Finiteness is
    checked ``chunk_rows`` rows at a time, so memory-mapped matrices are streamed.
    """
    if chunk_rows < 1:
        raise InvalidInputError(f"chunk_rows must be >= 1, got {chunk_rows}")
    ids_src = catalogue.source(IDS_KEY)
    if not catalogue.modalities:
        raise CatalogueError(f"{ids_src}: the catalogue has no modality (M = 0); give at least one")
    for name in catalogue.modalities:
        check_modality_name(name)

    ids = catalogue.item_ids
    if ids.ndim != 1:
        raise CatalogueError(f"{ids_src}: item ids must be 1-D, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise CatalogueError(f"{ids_src}: item ids must be integers, got dtype {ids.dtype}")
    n = ids.shape[0]
    if n == 0:
        raise CatalogueError(f"{ids_src}: the catalogue is empty (0 items)")
    if ids.dtype == np.uint64 and int(ids.max()) > _INT64_MAX:
        raise CatalogueError(f"{ids_src}: item ids must fit in int64, max is {int(ids.max())}")

    for name, feats in catalogue.modalities.items():
        src = catalogue.source(name)
        if feats.ndim != 2:
            raise CatalogueError(
                f"{src}: modality {name!r} must be 2-D (items x features), got shape {feats.shape}"
            )
        if not np.issubdtype(feats.dtype, np.floating):
            raise CatalogueError(
                f"{src}: modality {name!r} must hold real floats, got dtype {feats.dtype}"
            )
        if feats.shape[1] == 0:
            raise CatalogueError(f"{src}: modality {name!r} has width 0")
        if feats.shape[0] != n:
            raise CatalogueError(
                f"{src}: modality {name!r} has {feats.shape[0]} rows but the ids file "
                f"{ids_src} has {n} items"
            )

    _check_unique(ids, ids_src)

    for name, feats in catalogue.modalities.items():
        for start in range(0, n, chunk_rows):
            chunk = np.asarray(feats[start : start + chunk_rows])
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                raise CatalogueError(
                    f"{catalogue.source(name)}: modality {name!r} contains NaN or inf, first at "
                    f"row {row} (item id {int(ids[row])})"
                )


def check_modality_name(name: str) -> None:
    """Raise :class:`CatalogueError` unless ``name`` matches ``[A-Za-z0-9_.-]+`` and is not
    the reserved :data:`IDS_KEY`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CatalogueError(
            f"invalid modality name {name!r}: use letters, digits, '_', '.' or '-' only"
        )
    if name == IDS_KEY:
        raise CatalogueError(f"modality name {IDS_KEY!r} is reserved for the item-id file")


def _check_unique(ids: npt.NDArray[np.integer[Any]], src: str) -> None:
    sorted_ids = np.sort(ids, kind="stable")
    dup_mask = sorted_ids[1:] == sorted_ids[:-1]
    if dup_mask.any():
        dups = np.unique(sorted_ids[1:][dup_mask])
        shown = ", ".join(str(int(i)) for i in dups[:_MAX_NAMED])
        more = f" and {dups.size - _MAX_NAMED} more" if dups.size > _MAX_NAMED else ""
        raise CatalogueError(f"{src}: item ids must be unique; duplicated: {shown}{more}")


def _normalised(catalogue: Catalogue) -> Catalogue:
    """``catalogue`` with its (already validated) ids as an in-memory int64 array."""
    ids = np.array(catalogue.item_ids, dtype=np.int64)
    return replace(catalogue, item_ids=ids)


def _load_npy(path: Path) -> npt.NDArray[Any]:
    if not path.is_file():
        raise CatalogueError(f"{path}: file not found")
    try:
        loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CatalogueError(f"{path}: not a readable .npy array ({exc})") from exc
    if not isinstance(loaded, np.ndarray):
        # np.load returns an NpzFile for zip archives; close it before refusing.
        close = getattr(loaded, "close", None)
        if callable(close):
            close()
        raise CatalogueError(f"{path}: expected a single .npy array, got an .npz archive")
    return loaded


def load_npy_catalogue(ids_path: str | Path, modality_paths: Mapping[str, str | Path]) -> Catalogue:
    """Catalogue from ``ids_path`` ((N,) integers) and one (N, D_m) float ``.npy`` per modality.

    Modality files are memory-mapped read-only (``np.memmap``); ids are loaded as int64.
    The modality order is the order of ``modality_paths``.
    """
    for name in modality_paths:
        check_modality_name(name)
    ids_file = Path(ids_path)
    ids = _load_npy(ids_file)
    modalities: dict[str, FeatureArray] = {}
    sources = {IDS_KEY: str(ids_file)}
    for name, raw_path in modality_paths.items():
        path = Path(raw_path)
        modalities[name] = _load_npy(path)
        sources[name] = str(path)
    catalogue = Catalogue(item_ids=ids, modalities=modalities, sources=sources)
    validate_catalogue(catalogue)
    return _normalised(catalogue)


def load_parquet_catalogue(
    path: str | Path,
    id_column: str = "item_id",
    modality_columns: Sequence[str] | None = None,
) -> Catalogue:
    """Catalogue from one Parquet file, read into memory.

    ``id_column`` holds integer ids; each modality column holds ``list<float>``,
    ``large_list<float>`` or ``fixed_size_list<float>`` values of one constant length.
    ``modality_columns=None`` takes every other column, in file order. Column names are
    the modality names.
    """
    file = Path(path)
    src = str(file)
    if not file.is_file():
        raise CatalogueError(f"{src}: file not found")
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as exc:
        raise CatalogueError(f"{src}: not a readable Parquet file ({exc})") from exc
    names = list(schema.names)
    if id_column not in names:
        raise CatalogueError(f"{src}: no id column {id_column!r}; columns are {names}")
    if modality_columns is None:
        columns = [c for c in names if c != id_column]
    else:
        columns = list(modality_columns)
        missing = [c for c in columns if c not in names]
        if missing:
            raise CatalogueError(f"{src}: no column(s) {missing}; columns are {names}")
        if id_column in columns:
            raise CatalogueError(f"{src}: id column {id_column!r} cannot also be a modality")
    if not columns:
        raise CatalogueError(f"{src}: the catalogue has no modality (M = 0); give at least one")
    for name in columns:
        check_modality_name(name)
    try:
        table = pq.read_table(file, columns=[id_column, *columns])
    except (pa.ArrowException, OSError) as exc:
        raise CatalogueError(f"{src}: not a readable Parquet file ({exc})") from exc
    if table.num_rows == 0:
        raise CatalogueError(f"{src}: the catalogue is empty (0 items)")

    ids = _parquet_ids(table.column(id_column), id_column, src)
    modalities = {name: _parquet_matrix(table.column(name), name, src) for name in columns}
    sources = {IDS_KEY: src, **dict.fromkeys(columns, src)}
    catalogue = Catalogue(item_ids=ids, modalities=modalities, sources=sources)
    validate_catalogue(catalogue)
    return _normalised(catalogue)


def _first_null(column: pa.ChunkedArray) -> int:
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return int(np.argmin(valid))


def _parquet_ids(column: pa.ChunkedArray, name: str, src: str) -> IdArray:
    if not pa.types.is_integer(column.type):
        raise CatalogueError(f"{src}: id column {name!r} must be integers, got {column.type}")
    if column.null_count:
        raise CatalogueError(f"{src}: id column {name!r} has a null at row {_first_null(column)}")
    ids: npt.NDArray[Any] = column.to_numpy()
    return ids


def _parquet_matrix(column: pa.ChunkedArray, name: str, src: str) -> FeatureArray:
    kind = column.type
    is_list = (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )
    if not is_list or not pa.types.is_floating(kind.value_type):
        raise CatalogueError(
            f"{src}: modality column {name!r} must be a list of floats, got {kind}"
        )
    if column.null_count:
        raise CatalogueError(
            f"{src}: modality column {name!r} has a null list at row {_first_null(column)}"
        )
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    width = int(lengths[0])
    ragged = lengths != width
    if ragged.any():
        row = int(np.argmax(ragged))
        raise CatalogueError(
            f"{src}: modality column {name!r} is ragged: row 0 has {width} values but row "
            f"{row} has {int(lengths[row])}; every row of a modality needs the same length"
        )
    values = pc.list_flatten(column.combine_chunks())
    if values.null_count:
        raise CatalogueError(f"{src}: modality column {name!r} contains null values")
    flat: npt.NDArray[Any] = values.to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), width)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    file = Path(path)
    digest = hashlib.sha256()
    try:
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise CatalogueError(f"{file}: file not found") from exc
    return digest.hexdigest()


def write_npy_catalogue(
    directory: str | Path, item_ids: npt.ArrayLike, features: Mapping[str, npt.ArrayLike]
) -> dict[str, Path]:
    """Write ``ids.npy`` and one ``NAME.npy`` per modality into ``directory`` (created).

    Arrays are written as given (dtypes kept, contents not validated, so tests can write
    bad catalogues too). Returns :data:`IDS_KEY` and each modality name -> path written.
    """
    for name in features:
        check_modality_name(name)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {IDS_KEY: out / f"{IDS_KEY}.npy"}
    np.save(paths[IDS_KEY], np.asarray(item_ids), allow_pickle=False)
    for name, array in features.items():
        paths[name] = out / f"{name}.npy"
        np.save(paths[name], np.asarray(array), allow_pickle=False)
    return paths
