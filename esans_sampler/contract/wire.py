"""``SampleNegativesResponse`` written and read straight from numpy buffers.

A response with embeddings is megabytes of float32. Going through the generated protobuf
classes copies every tensor three times on the server (``tobytes``, the field assignment,
``SerializeToString``) and twice on the client (parsing, then each read of a bytes field).
The encoder here writes the protobuf wire format itself, joining the numpy buffers once;
the decoder returns numpy views into the received bytes. Both follow
``proto/esans/v1/sampler.proto`` through its descriptors (field numbers are looked up, not
typed in), the encoder's output equals ``SerializeToString`` of the same message byte for
byte, and the decoder skips fields it does not know, so a newer server with additive
changes still talks to an older client (tests/test_wire.py).
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_sampler.contract._proto.esans.v1 import sampler_pb2

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_DOUBLE = struct.Struct("<d")
_ZERO_DOUBLE = _DOUBLE.pack(0.0)

_RESPONSE = sampler_pb2.SampleNegativesResponse.DESCRIPTOR
_EMBEDDINGS = sampler_pb2.Embeddings.DESCRIPTOR
_TENSOR = sampler_pb2.Tensor.DESCRIPTOR
_WIRE_DTYPES: dict[int, np.dtype[Any]] = {
    sampler_pb2.DTYPE_INT64: np.dtype("<i8"),
    sampler_pb2.DTYPE_INT32: np.dtype("<i4"),
    sampler_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
}
_ENUM_BY_KIND = {(wire.kind, wire.itemsize): enum for enum, wire in _WIRE_DTYPES.items()}
_TENSOR_FIELDS = {f.number: f.name for f in _TENSOR.fields}


def _tensor_fields(message: Any) -> dict[int, str]:
    return {
        f.number: f.name
        for f in message.fields
        if f.message_type is not None and f.message_type.full_name == _TENSOR.full_name
    }


_RESPONSE_TENSORS = _tensor_fields(_RESPONSE)
_EMBEDDING_TENSORS = _tensor_fields(_EMBEDDINGS)
_RESPONSE_NAMES = {f.number: f.name for f in _RESPONSE.fields}
# The tensor fields by name, in field-number order, for the adapters on either side.
RESPONSE_TENSOR_NAMES = tuple(_RESPONSE_TENSORS.values())
EMBEDDING_TENSOR_NAMES = tuple(_EMBEDDING_TENSORS.values())
_EMBEDDING_SCALARS = {f.number: f.name for f in _EMBEDDINGS.fields if f.type == f.TYPE_DOUBLE}
EMBEDDING_SCALAR_NAMES = tuple(_EMBEDDING_SCALARS.values())

Parts = list[bytes | memoryview]


class WireFormatError(ValueError):
    """Bytes that are not a well-formed ``SampleNegativesResponse``."""


# ----------------------------------------------------------------------------- encoding


_ONE_BYTE_VARINTS = tuple(bytes((value,)) for value in range(0x80))


def _varint(value: int) -> bytes:
    if 0 <= value <= 0x7F:  # keys, enums, most shapes: one byte, and the encoder's most calls
        return _ONE_BYTE_VARINTS[value]
    if value < 0:
        value += 1 << 64  # protobuf encodes negative int64 as ten-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.cache
def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(parts: Parts, number: int, body: Parts) -> None:
    parts += [_key(number, _LENGTH), _varint(sum(map(len, body))), *body]


_TENSOR_DTYPE_KEY = _key(_TENSOR.fields_by_name["dtype"].number, _VARINT)
_TENSOR_SHAPE = _TENSOR.fields_by_name["shape"].number
_TENSOR_DATA = _TENSOR.fields_by_name["data"].number


def _tensor_body(array: npt.ArrayLike) -> Parts:
    arr = np.asarray(array)
    enum = _ENUM_BY_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if enum is None:
        raise TypeError(f"dtype {arr.dtype} has no wire form; use int64, int32 or float32")
    arr = np.ascontiguousarray(arr, dtype=_WIRE_DTYPES[enum])
    body: Parts = [_TENSOR_DTYPE_KEY, _varint(enum)]
    if arr.ndim:
        _length_delimited(body, _TENSOR_SHAPE, [b"".join(map(_varint, arr.shape))])
    if arr.nbytes:
        _length_delimited(body, _TENSOR_DATA, [arr.data.cast("B")])
    return body


def _double(parts: Parts, number: int, value: float) -> None:
    packed = _DOUBLE.pack(value)
    if packed != _ZERO_DOUBLE:  # proto3 omits exactly +0.0, keeps -0.0
        parts += [_key(number, _FIXED64), packed]


def encode_sample_response(
    codebook_version: str,
    sampler_kind: int,
    tensors: dict[str, npt.ArrayLike],
    embeddings: dict[str, npt.ArrayLike] | None,
    scalars: dict[str, float] | None = None,
) -> bytes:
    """The serialised ``SampleNegativesResponse``: ``tensors`` by response field name,
    ``embeddings`` (None: the field is absent) by ``Embeddings`` field name, with its
    ``scalars`` (eta, hard_lambda) by name."""
    parts: Parts = []
    fields = _RESPONSE.fields_by_name
    if codebook_version:
        version = codebook_version.encode()
        _length_delimited(parts, fields["codebook_version"].number, [version])
    if sampler_kind:
        parts += [_key(fields["sampler"].number, _VARINT), _varint(sampler_kind)]
    # Ascending field numbers, as SerializeToString writes (tensors come on both sides of
    # ``embeddings``, field 11).
    in_order: list[Any] = sorted(_RESPONSE.fields, key=lambda f: f.number)
    for field in in_order:
        if field.name in tensors:
            _length_delimited(parts, field.number, _tensor_body(tensors[field.name]))
        elif field.name == "embeddings" and embeddings is not None:
            body: Parts = []
            for inner in _EMBEDDINGS.fields:
                if inner.name in embeddings:
                    _length_delimited(body, inner.number, _tensor_body(embeddings[inner.name]))
                elif inner.number in _EMBEDDING_SCALARS:
                    _double(body, inner.number, (scalars or {}).get(inner.name, 0.0))
            _length_delimited(parts, field.number, body)
    return b"".join(parts)


# ----------------------------------------------------------------------------- decoding


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, stop) per field; for varints start is the value."""
    while pos < end:
        key, pos = _read_varint(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos, end)
            yield number, wire_type, value, pos
            continue
        if wire_type == _LENGTH:
            size, pos = _read_varint(data, pos, end)
            start, pos = pos, pos + size
        elif wire_type in (_FIXED64, _FIXED32):
            start, pos = pos, pos + (8 if wire_type == _FIXED64 else 4)
        else:
            raise WireFormatError(f"field {number} has unsupported wire type {wire_type}")
        if pos > end:
            raise WireFormatError(f"field {number} runs past the end of its message")
        yield number, wire_type, start, pos


def _decode_tensor(data: bytes, start: int, stop: int) -> npt.NDArray[Any]:
    dtype_enum, shape, data_span = 0, [], (start, start)
    for number, wire_type, a, b in _fields(data, start, stop):
        name = _TENSOR_FIELDS.get(number)
        if name == "dtype" and wire_type == _VARINT:
            dtype_enum = a
        elif name == "shape" and wire_type == _LENGTH:  # packed
            pos = a
            while pos < b:
                n, pos = _read_varint(data, pos, b)
                shape.append(n)
        elif name == "shape" and wire_type == _VARINT:  # unpacked, also valid protobuf
            shape.append(a)
        elif name == "data" and wire_type == _LENGTH:
            data_span = (a, b)
    wire = _WIRE_DTYPES.get(dtype_enum)
    if wire is None:
        raise WireFormatError(f"tensor dtype {dtype_enum} is not int64, int32 or float32")
    if any(n >= 1 << 63 for n in shape):
        raise WireFormatError(f"tensor shape {shape} has a negative dimension")
    count = math.prod(shape)
    if (data_span[1] - data_span[0]) != count * wire.itemsize:
        raise WireFormatError(
            f"tensor of shape {shape} and dtype {wire.name} needs {count * wire.itemsize} "
            f"bytes, got {data_span[1] - data_span[0]}"
        )
    array = np.frombuffer(data, dtype=wire, count=count, offset=data_span[0]).reshape(shape)
    return array.astype(wire.newbyteorder("="), copy=False)


@dataclass(frozen=True)
class DecodedResponse:
    """A decoded ``SampleNegativesResponse``: tensors as read-only numpy views into the bytes."""

    codebook_version: str
    sampler_kind: int
    tensors: dict[str, npt.NDArray[Any]]
    embeddings: dict[str, npt.NDArray[Any]] | None
    scalars: dict[str, float]  # the embeddings' doubles (eta, hard_lambda); 0.0 when absent


def decode_sample_response(data: bytes) -> DecodedResponse:
    """Read a serialised ``SampleNegativesResponse`` without copying its tensors.

    Raises :class:`WireFormatError` for malformed bytes.
    """
    version, kind = "", 0
    tensors: dict[str, npt.NDArray[Any]] = {}
    embeddings: dict[str, npt.NDArray[Any]] | None = None
    scalars = dict.fromkeys(EMBEDDING_SCALAR_NAMES, 0.0)
    for number, wire_type, a, b in _fields(data, 0, len(data)):
        name = _RESPONSE_NAMES.get(number)  # None: a field added after this client was built
        if number in _RESPONSE_TENSORS and wire_type == _LENGTH:
            tensors[_RESPONSE_TENSORS[number]] = _decode_tensor(data, a, b)
        elif name == "codebook_version" and wire_type == _LENGTH:
            version = data[a:b].decode("utf-8", errors="replace")
        elif name == "sampler" and wire_type == _VARINT:
            kind = a
        elif name == "embeddings" and wire_type == _LENGTH:
            embeddings, scalars = _decode_embeddings(data, a, b)
    return DecodedResponse(version, kind, tensors, embeddings, scalars)


def _decode_embeddings(
    data: bytes, start: int, stop: int
) -> tuple[dict[str, npt.NDArray[Any]], dict[str, float]]:
    tensors: dict[str, npt.NDArray[Any]] = {}
    scalars = dict.fromkeys(EMBEDDING_SCALAR_NAMES, 0.0)
    for number, wire_type, a, b in _fields(data, start, stop):
        if number in _EMBEDDING_TENSORS and wire_type == _LENGTH:
            tensors[_EMBEDDING_TENSORS[number]] = _decode_tensor(data, a, b)
        elif number in _EMBEDDING_SCALARS and wire_type == _FIXED64:
            scalars[_EMBEDDING_SCALARS[number]] = _DOUBLE.unpack_from(data, a)[0]
    return tensors, scalars
