"""The wire codec: responses written from numpy buffers, read back as views; the protobuf
classes are the reference (same bytes out, same arrays in)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import build_random_artifact

from esans_sampler.artifact import artifact_to_files
from esans_sampler.contract._proto.esans.v1 import sampler_pb2
from esans_sampler.contract.messages import SampleRequest
from esans_sampler.contract.tensors import fill_tensor, from_tensor
from esans_sampler.contract.wire import WireFormatError, decode_sample_response
from esans_service.core import SampleResult, SamplingService
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.grpc_server import response_bytes
from esans_service.registry import CodebookRegistry
from esans_service.settings import Settings
from esans_service.store import CodebookStore

SAMPLE = (
    "positive_primary", "positive_secondary", "simple_ids", "simple_clusters", "simple_log_q",
    "hard_ids", "hard_counts", "hard_log_q", "simple_secondary", "hard_secondary",
)  # fmt: skip
EMBEDDINGS = ("positive", "simple", "hard", "virtual_simple", "simple_weights", "virtual_hard")
KINDS = {
    "esans": sampler_pb2.SAMPLER_KIND_ESANS,
    "uniform": sampler_pb2.SAMPLER_KIND_UNIFORM,
    "popularity": sampler_pb2.SAMPLER_KIND_POPULARITY,
    "mixed": sampler_pb2.SAMPLER_KIND_MIXED,
}


def reference_message(result: SampleResult) -> sampler_pb2.SampleNegativesResponse:
    """The response built field by field with the generated protobuf classes."""
    message = sampler_pb2.SampleNegativesResponse(
        codebook_version=result.codebook_version, sampler=KINDS[result.sampler]
    )
    for name in SAMPLE:
        fill_tensor(getattr(message, name), getattr(result.sample, name))
    if result.embeddings is not None:
        for name in EMBEDDINGS:
            fill_tensor(getattr(message.embeddings, name), getattr(result.embeddings, name))
        message.embeddings.eta = result.embeddings.eta
        message.embeddings.hard_lambda = result.embeddings.hard_lambda
    return message


@pytest.fixture(scope="module")
def service(redis_server: EmbeddedRedis) -> Iterator[SamplingService]:
    client = redis_server.client()
    store = CodebookStore(client, namespace="wire")
    artifact = build_random_artifact(seed=5, metadata={"popularity": list(range(1, 201))})
    store.publish(artifact_to_files(artifact), activate=True)
    registry = CodebookRegistry(store)
    registry.refresh()
    try:
        yield SamplingService(registry, Settings())
    finally:
        client.close()


CASES = [
    {"return_embeddings": True},
    {"return_embeddings": True, "m_h": 0, "m_o": 2},
    {"return_embeddings": True, "eta": 0.0, "hard_lambda": -0.0},
    {"return_embeddings": True, "hard_lambda": -0.5, "m_c": 3},
    {"sampler": "uniform"},
    {"sampler": "popularity", "return_embeddings": True},
    {"sampler": "mixed", "m_h": 0},
]


@pytest.mark.parametrize("fields", CASES)
def test_encoding_is_byte_identical_to_protobuf(
    service: SamplingService, fields: dict[str, Any]
) -> None:
    ids = service.registry.get().artifact.index.item_ids[:24]
    result = service.sample(SampleRequest(positive_ids=ids, seed=3, **fields))
    assert response_bytes(result) == reference_message(result).SerializeToString()


@pytest.mark.parametrize("fields", CASES)
def test_decoding_matches_protobuf(service: SamplingService, fields: dict[str, Any]) -> None:
    ids = service.registry.get().artifact.index.item_ids[:24]
    message = reference_message(service.sample(SampleRequest(positive_ids=ids, seed=3, **fields)))
    decoded = decode_sample_response(message.SerializeToString())
    assert decoded.codebook_version == message.codebook_version
    assert decoded.sampler_kind == message.sampler
    for name in SAMPLE:
        want = from_tensor(getattr(message, name))
        got = decoded.tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
    if message.HasField("embeddings"):
        assert decoded.embeddings is not None
        for name in EMBEDDINGS:
            np.testing.assert_array_equal(
                decoded.embeddings[name], from_tensor(getattr(message.embeddings, name))
            )
        assert decoded.scalars["eta"] == message.embeddings.eta
        assert decoded.scalars["hard_lambda"] == message.embeddings.hard_lambda
    else:
        assert decoded.embeddings is None


def test_unknown_fields_and_unpacked_shapes_are_read() -> None:
    """A newer server may add fields (the contract only grows); protobuf may also send a
    repeated scalar unpacked. Both must decode."""
    message = sampler_pb2.SampleNegativesResponse(codebook_version="v1")
    fill_tensor(message.simple_ids, np.arange(6, dtype=np.int64).reshape(2, 3))
    fill_tensor(message.embeddings.positive, np.ones((2, 4), dtype=np.float32))
    data = message.SerializeToString()
    unknown = (
        b"\x98\x06\x05"  # field 99, varint
        + b"\x9a\x06\x03abc"  # field 99, length-delimited
        + b"\x9d\x06\x00\x00\x80\x3f"  # field 99, fixed32
        + b"\x99\x06" + b"\x00" * 8  # field 99, fixed64
    )  # fmt: skip
    decoded = decode_sample_response(data + unknown)
    assert decoded.codebook_version == "v1"
    np.testing.assert_array_equal(decoded.tensors["simple_ids"], np.arange(6).reshape(2, 3))
    assert decoded.embeddings is not None and decoded.embeddings["positive"].shape == (2, 4)
    # hard_counts as Tensor{dtype: INT32, shape: 2 unpacked, data: 8 bytes} under field 9
    tensor = b"\x08\x02" + b"\x10\x02" + b"\x1a\x08" + np.array([1, 2], "<i4").tobytes()
    decoded = decode_sample_response(b"\x4a" + bytes([len(tensor)]) + tensor)
    np.testing.assert_array_equal(decoded.tensors["hard_counts"], [1, 2])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x0a\x05ab", "runs past the end"),
        (b"\x0a", "truncated"),
        (b"\x0f", "unsupported wire type"),
        (b"\x2a\x04\x08\x09\x10\x01", "dtype 9"),
        (b"\x2a\x07\x08\x01\x10\x02\x1a\x01\x00", "needs 16 bytes, got 1"),
        (b"\x08" + b"\xff" * 11, "overlong"),
    ],
)
def test_malformed_bytes_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode_sample_response(data)


def test_decoded_arrays_are_views_of_the_received_bytes() -> None:
    message = sampler_pb2.SampleNegativesResponse()
    fill_tensor(message.embeddings.virtual_simple, np.ones((64, 2, 14, 64), dtype=np.float32))
    data = message.SerializeToString()
    view = decode_sample_response(data).embeddings["virtual_simple"]  # type: ignore[index]
    assert not view.flags.writeable and not view.flags.owndata
    assert np.shares_memory(view, np.frombuffer(data, dtype=np.uint8))
