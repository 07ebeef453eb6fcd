"""The artifact's file codec: deterministic ``.npy``/``.npz`` bytes and their safe reading.

Writing is byte-for-byte deterministic: arrays are stored in canonical little-endian dtypes
(:data:`F32`, :data:`F64`, :data:`I32`, :data:`I64`) and C order, and ``.npz`` archives are
uncompressed with fixed zip timestamps, so equal content always gives equal bytes (the
artifact version hashes them). Reading uses ``np.load(..., allow_pickle=False)`` only and
turns every malformed input into an :class:`ArtifactError` naming the file. The file
layout (which arrays go into which file) is ``artifact.py``'s; this module only encodes.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.codebook import Codebook
from esans_sampler.errors import ArtifactError, InvalidInputError

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Canonical little-endian dtypes of every stored array, so the bytes never depend on the
# byte order, memory layout or dtype the caller happened to hold.
F32 = np.dtype("<f4")
F64 = np.dtype("<f8")
I32 = np.dtype("<i4")
I64 = np.dtype("<i8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def metadata_json(metadata: Mapping[str, Any]) -> Any:
    """``metadata`` as plain JSON values (numpy scalars/arrays converted)."""
    try:
        return json.loads(json.dumps(metadata, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"metadata is not JSON-serialisable: {exc}") from exc


# ----------------------------------------------------------------------------- writing


def npy_bytes(array: npt.NDArray[Any], dtype: np.dtype[Any]) -> bytes:
    """``array`` as deterministic ``.npy`` bytes in ``dtype``, C order."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array, dtype=dtype, order="C"), allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(arrays: Mapping[str, tuple[npt.NDArray[Any], np.dtype[Any]]]) -> bytes:
    """An uncompressed ``.npz`` (readable by ``np.load``) with fixed timestamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, (array, dtype) in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, npy_bytes(array, dtype))
    return buffer.getvalue()


def codebook_npz_bytes(codebook: Codebook) -> bytes:
    """The ``.npz`` bytes of a codebook: modality names, codewords, one map per modality."""
    cb = codebook
    # Unicode (never object) array; only its byte order needs fixing.
    names = np.array(cb.modality_names, dtype=np.str_)
    arrays: dict[str, tuple[npt.NDArray[Any], np.dtype[Any]]] = {
        "modality_names": (names, names.dtype.newbyteorder("<")),
        "primary_codewords": (cb.primary_codewords, F32),
        "secondary_codewords": (cb.secondary_codewords, F32),
    }
    for m, (weight, bias) in enumerate(zip(cb.map_weights, cb.map_biases, strict=True)):
        arrays[f"map_weight_{m}"] = (weight, F32)
        arrays[f"map_bias_{m}"] = (bias, F32)
    return npz_bytes(arrays)


def index_npz_bytes(index: ClusterIndex) -> bytes:
    """The ``.npz`` bytes of a cluster index: ids, codes, CSR arrays and K_p, K_s."""
    return npz_bytes(
        {
            "item_ids": (index.item_ids, I64),
            "primary": (index.primary, I32),
            "secondary": (index.secondary, I32),
            "ordered_rows": (index.ordered_rows, I64),
            "cluster_offsets": (index.cluster_offsets, I64),
            "fine_offsets": (index.fine_offsets, I64),
            "num_primary": (np.array(index.num_primary), I64),
            "num_secondary": (np.array(index.num_secondary), I64),
        }
    )


# ----------------------------------------------------------------------------- reading


def load_npy(name: str, data: bytes) -> npt.NDArray[Any]:
    """The single array of ``.npy`` bytes (file ``name``, for errors)."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{name}: not a readable .npy array ({exc})") from exc
    if not isinstance(loaded, np.ndarray):
        raise ArtifactError(f"{name}: expected a single .npy array")
    return loaded


def load_npz(name: str, data: bytes, keys: list[str]) -> dict[str, npt.NDArray[Any]]:
    """The arrays ``keys`` of ``.npz`` bytes; :class:`ArtifactError` if one is missing."""
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


def typed(name: str, key: str, array: npt.NDArray[Any], kind: str, ndim: int) -> npt.NDArray[Any]:
    """``array`` unchanged if its dtype kind and ndim are as expected, else ArtifactError."""
    if array.dtype.kind != kind or array.ndim != ndim:
        raise ArtifactError(
            f"{name}: {key!r} has dtype {array.dtype} and {array.ndim} dims, expected kind "
            f"{kind!r} and {ndim} dims"
        )
    return array


def read_codebook(name: str, data: bytes) -> Codebook:
    """The :class:`Codebook` stored by :func:`codebook_npz_bytes` in file ``name``."""
    head = load_npz(name, data, ["modality_names", "primary_codewords", "secondary_codewords"])
    names = typed(name, "modality_names", head["modality_names"], "U", 1)
    m = int(names.shape[0])
    per_modality = [f"map_weight_{i}" for i in range(m)] + [f"map_bias_{i}" for i in range(m)]
    maps = load_npz(name, data, per_modality)
    try:
        return Codebook(
            modality_names=tuple(str(n) for n in names),
            map_weights=tuple(
                typed(name, f"map_weight_{i}", maps[f"map_weight_{i}"], "f", 2) for i in range(m)
            ),
            map_biases=tuple(
                typed(name, f"map_bias_{i}", maps[f"map_bias_{i}"], "f", 1) for i in range(m)
            ),
            primary_codewords=typed(name, "primary_codewords", head["primary_codewords"], "f", 2),
            secondary_codewords=typed(
                name,
                "secondary_codewords",
                head["secondary_codewords"],
                "f",
                3 if head["secondary_codewords"].ndim == 3 else 2,
            ),
        )
    except InvalidInputError as exc:
        raise ArtifactError(f"{name}: inconsistent codebook ({exc})") from exc


def read_index(name: str, data: bytes) -> ClusterIndex:
    """The :class:`ClusterIndex` stored by :func:`index_npz_bytes`, rebuilt and checked."""
    keys = ["item_ids", "primary", "secondary", "ordered_rows", "cluster_offsets", "fine_offsets"]
    arrays = load_npz(name, data, [*keys, "num_primary", "num_secondary"])
    for key in keys:
        typed(name, key, arrays[key], "i", 1)
    k_p = int(typed(name, "num_primary", arrays["num_primary"], "i", 0))
    k_s = int(typed(name, "num_secondary", arrays["num_secondary"], "i", 0))
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
