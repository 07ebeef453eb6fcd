"""esans_sampler.contract: one spelling of the request, response and info fields, read from
the proto, and codecs that agree with each other and with the protobuf classes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from esans_sampler.contract._proto.esans.v1 import sampler_pb2
from esans_sampler.contract.messages import (
    OPTIONAL_REQUEST_FIELDS,
    CodebookInfo,
    SampledEmbeddings,
    SampleRequest,
    SampleResponse,
    info_from_proto,
    info_to_json,
    info_to_proto,
    json_request_fields,
    kind_from_name,
    kind_from_proto,
    kind_to_json,
    kind_to_proto,
    request_from_json,
    request_from_proto,
    request_to_json,
    request_to_proto,
    response_from_bytes,
    response_from_json,
    response_to_bytes,
    response_to_json,
)
from esans_sampler.errors import EsansError
from esans_sampler.kinds import SAMPLER_KINDS


def test_json_body_has_exactly_the_proto_request_fields() -> None:
    proto = [f.name for f in sampler_pb2.SampleNegativesRequest.DESCRIPTOR.fields]
    assert list(json_request_fields()) == proto
    assert OPTIONAL_REQUEST_FIELDS == ("m_c", "m_o", "m_h", "gamma", "eta", "hard_lambda", "seed")


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_every_sampler_kind_round_trips_through_proto_and_json(kind: str) -> None:
    assert kind_from_proto(kind_to_proto(kind)) == kind
    assert kind_from_name(kind_to_json(kind)) == kind == kind_from_name(kind.upper())


def test_unspecified_kind_is_esans_and_unknown_numbers_are_named() -> None:
    assert kind_from_proto(sampler_pb2.SAMPLER_KIND_UNSPECIFIED) == "esans"
    assert kind_from_proto(99) == "SamplerKind(99)"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"m_c": 3, "m_o": 2, "m_h": 0, "seed": 7},
        {"gamma": 2.5, "eta": 0.5, "hard_lambda": -0.1, "sampler": "mixed"},
        {"codebook_version": "abcdef12", "return_embeddings": True, "sampler": "uniform"},
    ],
)
def test_request_round_trips_through_proto_and_json(options: dict[str, object]) -> None:
    request = SampleRequest(positive_ids=np.array([5, 2**40, 0], np.int64), **options)  # type: ignore[arg-type]
    via_proto = request_from_proto(
        sampler_pb2.SampleNegativesRequest.FromString(request_to_proto(request).SerializeToString())
    )
    via_json = request_from_json(request_to_json(request))
    for decoded in (via_proto, via_json):
        np.testing.assert_array_equal(decoded.positive_ids, request.positive_ids)
        for name in ("sampler", "return_embeddings", *OPTIONAL_REQUEST_FIELDS):
            assert getattr(decoded, name) == getattr(request, name), name
        assert (decoded.codebook_version or "") == (request.codebook_version or "")


def _response(embeddings: bool, secondary: bool = True) -> SampleResponse:
    rng = np.random.default_rng(0)
    b, m_c, m_o, m_h, d = 3, 2, 3, 2, 4
    t = sum(range(2, m_o + 1))
    hard_log_q = rng.normal(size=(b, m_h)).astype(np.float32)
    hard_log_q[0, 1] = -np.inf
    e = None
    if embeddings:
        e = SampledEmbeddings(
            positive=rng.normal(size=(b, d)).astype(np.float32),
            simple=rng.normal(size=(b, m_c, m_o, d)).astype(np.float32),
            hard=rng.normal(size=(b, m_h, d)).astype(np.float32),
            virtual_simple=rng.normal(size=(b, m_c, t, d)).astype(np.float32),
            simple_weights=rng.random((b, m_c, t, m_o)).astype(np.float32),
            virtual_hard=rng.normal(size=(b, m_h, d)).astype(np.float32),
            eta=0.5,
            hard_lambda=-0.25,
        )
    return SampleResponse(
        codebook_version="v" * 16,
        sampler="popularity",
        positive_primary=rng.integers(0, 9, b).astype(np.int32),
        positive_secondary=rng.integers(0, 9, b).astype(np.int32),
        simple_ids=rng.integers(0, 2**40, (b, m_c, m_o)),
        simple_clusters=rng.integers(-1, 9, (b, m_c)).astype(np.int32),
        simple_log_q=rng.normal(size=(b, m_c, m_o)).astype(np.float32),
        hard_ids=np.array([[4, -1], [5, 6], [7, 8]], np.int64),
        hard_counts=np.array([1, 2, 2], np.int32),
        hard_log_q=hard_log_q,
        simple_secondary=rng.integers(-1, 9, (b, m_c, m_o)).astype(np.int32) if secondary else None,
        hard_secondary=np.array([[3, -1], [0, 1], [2, 2]], np.int32) if secondary else None,
        embeddings=e,
    )


@pytest.mark.parametrize("secondary", [True, False], ids=["current", "older server"])
@pytest.mark.parametrize("embeddings", [False, True])
def test_response_round_trips_through_bytes_and_json(embeddings: bool, secondary: bool) -> None:
    response = _response(embeddings, secondary)
    args = (response.codebook_version, response.sampler, response, response.embeddings)
    data = response_to_bytes(*args)
    # The binary codec writes what the protobuf classes would parse.
    message = sampler_pb2.SampleNegativesResponse.FromString(data)
    assert message.codebook_version == "v" * 16
    assert message.HasField("hard_secondary") == secondary
    names = ["simple_ids", "simple_log_q", "hard_ids", "hard_counts", "hard_log_q"]
    names += ["simple_secondary", "hard_secondary"] if secondary else []
    for decoded in (response_from_bytes(data), response_from_json(response_to_json(*args))):
        assert (decoded.codebook_version, decoded.sampler) == ("v" * 16, "popularity")
        for name in names:
            got, want = getattr(decoded, name), getattr(response, name)
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got, want)
        if not secondary:  # fields an older server does not send read as None
            assert decoded.simple_secondary is None and decoded.hard_secondary is None
        assert (decoded.embeddings is None) == (not embeddings)
        if decoded.embeddings is not None and response.embeddings is not None:
            np.testing.assert_array_equal(
                decoded.embeddings.virtual_simple, response.embeddings.virtual_simple
            )
            assert decoded.embeddings.hard_lambda == -0.25


def test_malformed_responses_are_one_clear_error() -> None:
    with pytest.raises(EsansError, match="malformed SampleNegatives response"):
        response_from_bytes(b"\x2a\x05abc")
    with pytest.raises(EsansError, match="malformed SampleNegatives response"):
        response_from_json({"codebook_version": "x", "sampler": "esans"})


def test_codebook_info_has_every_proto_field_on_both_transports() -> None:
    info = CodebookInfo(
        version="a" * 64,
        active=False,
        loaded_versions=["a" * 64],
        num_items=10,
        num_primary=2,
        num_secondary=3,
        embedding_dim=0,
        modalities=["text"],
        created_at="2026-12-03T06:00:00Z",
        metadata={"k": 1},
    )
    as_json = info_to_json(info)
    as_proto = info_from_proto(
        sampler_pb2.GetCodebookInfoResponse.FromString(info_to_proto(info).SerializeToString())
    )
    assert as_json == as_proto
    assert as_json["active"] is False and as_json["stale"] is False
    assert as_json["metadata_json"] == '{"k": 1}'
    assert math.isclose(as_json["hard_candidate_share"], 0.0)
