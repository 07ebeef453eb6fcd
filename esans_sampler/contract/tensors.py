"""Arrays on the wire: numpy <-> ``esans.v1.Tensor`` (gRPC) and <-> JSON dicts (HTTP).

A ``Tensor`` is row-major little-endian raw bytes of its ``dtype`` with its ``shape``. The
JSON form is ``{"dtype": "int64" | "int32" | "float32", "shape": [...], "data": [...]}``
with ``data`` the flat row-major values; non-finite floats (``-inf`` log q of padding) are
``null``, since JSON has no infinities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.contract._proto.esans.v1 import sampler_pb2
from esans_sampler.errors import InvalidInputError

# Canonical little-endian wire dtypes, by proto enum and by JSON name.
_WIRE_DTYPES: dict[sampler_pb2.DType, np.dtype[Any]] = {
    sampler_pb2.DTYPE_INT64: np.dtype("<i8"),
    sampler_pb2.DTYPE_INT32: np.dtype("<i4"),
    sampler_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
}
_JSON_NAMES: dict[sampler_pb2.DType, str] = {
    sampler_pb2.DTYPE_INT64: "int64",
    sampler_pb2.DTYPE_INT32: "int32",
    sampler_pb2.DTYPE_FLOAT32: "float32",
}
_BY_JSON_NAME = {name: enum for enum, name in _JSON_NAMES.items()}


def _wire_enum(dtype: np.dtype[Any]) -> sampler_pb2.DType:
    for enum, wire in _WIRE_DTYPES.items():
        if dtype.kind == wire.kind and dtype.itemsize == wire.itemsize:
            return enum
    raise InvalidInputError(f"dtype {dtype} has no wire form; use int64, int32 or float32")


def to_tensor(array: npt.ArrayLike) -> sampler_pb2.Tensor:
    """``array`` (int64, int32 or float32, any shape) as a new ``Tensor``."""
    tensor = sampler_pb2.Tensor()
    fill_tensor(tensor, array)
    return tensor


def fill_tensor(target: sampler_pb2.Tensor, array: npt.ArrayLike) -> None:
    """Write ``array`` into ``target`` (a field of a message being built): no extra copy,
    unlike assigning a finished ``Tensor``, which protobuf copies."""
    arr = np.asarray(array)
    enum = _wire_enum(arr.dtype)
    target.dtype = enum
    del target.shape[:]
    target.shape.extend(arr.shape)
    target.data = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[enum]).tobytes()


def from_tensor(tensor: sampler_pb2.Tensor) -> npt.NDArray[Any]:
    """The array a ``Tensor`` holds, in native byte order (read-only, no copy on x86/ARM).

    Raises :class:`InvalidInputError` for an unknown dtype, a negative dimension or a byte
    count that does not match the shape.
    """
    wire = _WIRE_DTYPES.get(tensor.dtype)
    if wire is None:
        raise InvalidInputError(f"tensor dtype {tensor.dtype} is not int64, int32 or float32")
    shape = tuple(int(n) for n in tensor.shape)
    if any(n < 0 for n in shape):
        raise InvalidInputError(f"tensor shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * wire.itemsize
    data = tensor.data  # each read of a bytes field copies it (upb): read it once
    if len(data) != expected:
        raise InvalidInputError(
            f"tensor of shape {list(shape)} and dtype {wire.name} needs {expected} bytes, "
            f"got {len(data)}"
        )
    array = np.frombuffer(data, dtype=wire).reshape(shape)
    return array.astype(wire.newbyteorder("="), copy=False)


def to_json(array: npt.ArrayLike) -> dict[str, Any]:
    """``array`` as ``{"dtype", "shape", "data"}`` with non-finite floats as ``None``."""
    arr = np.asarray(array)
    enum = _wire_enum(arr.dtype)
    flat = np.ascontiguousarray(arr).ravel()
    data: list[Any]
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        boxed = flat.astype(object)
        boxed[~np.isfinite(flat)] = None
        data = boxed.tolist()
    else:
        data = flat.tolist()
    return {"dtype": _JSON_NAMES[enum], "shape": list(arr.shape), "data": data}


def from_json(value: dict[str, Any], null: float = math.nan) -> npt.NDArray[Any]:
    """The array of a :func:`to_json` dict; ``None`` entries of float arrays become ``null``.

    Pass ``null=-math.inf`` for the log q tensors, whose only non-finite value is ``-inf``.
    """
    enum = _BY_JSON_NAME.get(value.get("dtype", ""))
    if enum is None:
        raise InvalidInputError(
            f"unknown dtype {value.get('dtype')!r}; known: {list(_BY_JSON_NAME)}"
        )
    shape = tuple(int(n) for n in value.get("shape", ()))
    raw = value.get("data", [])
    dtype = _WIRE_DTYPES[enum].newbyteorder("=")
    if dtype.kind == "f":
        raw = [null if x is None else x for x in raw]
    flat = np.asarray(raw, dtype=dtype)
    if flat.size != math.prod(shape):
        raise InvalidInputError(f"{flat.size} values do not fill shape {list(shape)}")
    return flat.reshape(shape)
