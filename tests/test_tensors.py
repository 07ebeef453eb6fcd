"""numpy <-> Tensor proto and <-> JSON: exact round trips, strict decoding."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from esans_sampler.contract._proto.esans.v1 import sampler_pb2
from esans_sampler.contract.tensors import from_json, from_tensor, to_json, to_tensor
from esans_sampler.errors import InvalidInputError

ARRAYS = [
    np.arange(12, dtype=np.int64).reshape(3, 4) - 6,
    np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    np.arange(6, dtype=np.int32).reshape(1, 2, 3),
    np.array([0.1, -1.5, 3.25e-30, 1e30], dtype=np.float32),
    np.zeros((0, 5), dtype=np.float32),
    np.array(7, dtype=np.int32),  # 0-d
    np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_proto_round_trip_is_exact(array: np.ndarray) -> None:
    tensor = sampler_pb2.Tensor.FromString(to_tensor(array).SerializeToString())
    decoded = from_tensor(tensor)
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_json_round_trip_is_exact(array: np.ndarray) -> None:
    decoded = from_json(json.loads(json.dumps(to_json(array), allow_nan=False)))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_wire_bytes_are_little_endian_whatever_the_input_order() -> None:
    native = np.array([1, 256], dtype=np.int32)
    big = native.astype(">i4")
    assert to_tensor(big).data == to_tensor(native).data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert to_tensor(np.asfortranarray(np.ones((2, 3), np.float32))).shape == [2, 3]


def test_non_finite_floats_are_null_in_json() -> None:
    value = to_json(np.array([[0.5, -np.inf], [np.nan, np.inf]], dtype=np.float32))
    assert value == {"dtype": "float32", "shape": [2, 2], "data": [0.5, None, None, None]}
    json.dumps(value, allow_nan=False)  # valid strict JSON
    back = from_json({"dtype": "float32", "shape": [2], "data": [1.0, None]}, null=-math.inf)
    np.testing.assert_array_equal(back, np.array([1.0, -np.inf], dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.bool_, np.uint8])
def test_dtypes_without_a_wire_form_are_refused(dtype: type) -> None:
    with pytest.raises(InvalidInputError, match="no wire form"):
        to_tensor(np.zeros(2, dtype=dtype))


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (
            sampler_pb2.Tensor(dtype=sampler_pb2.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 8),
            "dtype",
        ),
        (sampler_pb2.Tensor(dtype=sampler_pb2.DTYPE_INT64, shape=[2], data=b"\0" * 8), "16 bytes"),
        (sampler_pb2.Tensor(dtype=sampler_pb2.DTYPE_INT32, shape=[-1], data=b""), "negative"),
    ],
)
def test_malformed_tensors_are_refused(tensor: sampler_pb2.Tensor, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        from_tensor(tensor)


def test_malformed_json_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="unknown dtype"):
        from_json({"dtype": "float64", "shape": [1], "data": [1.0]})
    with pytest.raises(InvalidInputError, match="do not fill"):
        from_json({"dtype": "int32", "shape": [3], "data": [1, 2]})
