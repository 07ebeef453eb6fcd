"""The ``esans.v1`` request, response and codebook-info types, and their codecs.

Both servers and both clients use these types and conversions, so a field is named once, in
``proto/esans/v1/sampler.proto``: which request fields are optional, which response fields
are tensors and which codebook-info fields exist are all read from the generated
descriptors. The binary response encoder and decoder are :mod:`.wire`; tensors as JSON are
:mod:`.tensors`; the error classes and their gRPC codes and HTTP statuses are
:mod:`esans_sampler.errors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import FieldDescriptor

from esans_sampler.contract._proto.esans.v1 import sampler_pb2
from esans_sampler.contract.tensors import from_json, to_json
from esans_sampler.contract.wire import (
    EMBEDDING_SCALAR_NAMES,
    EMBEDDING_TENSOR_NAMES,
    RESPONSE_TENSOR_NAMES,
    WireFormatError,
    decode_sample_response,
    encode_sample_response,
)
from esans_sampler.errors import EsansError, InvalidInputError
from esans_sampler.kinds import ESANS, SAMPLER_KINDS

FloatArray = npt.NDArray[np.float32]

_REQUEST = sampler_pb2.SampleNegativesRequest.DESCRIPTOR
_INFO = sampler_pb2.GetCodebookInfoResponse.DESCRIPTOR
# The request's proto3 ``optional`` scalars: absent means "the server's default".
OPTIONAL_REQUEST_FIELDS = tuple(
    f.name for f in _REQUEST.fields if f.has_presence and f.message_type is None
)
# Response tensors added after the first v1 release: an older server leaves them out, and
# a client reads their absence as None.
ADDED_RESPONSE_TENSORS = ("simple_secondary", "hard_secondary")
SAMPLE_METHOD = "/esans.v1.NegativeSampler/SampleNegatives"
INFO_METHOD = "/esans.v1.NegativeSampler/GetCodebookInfo"
_KIND_PREFIX = "SAMPLER_KIND_"
_JSON_TYPES: dict[int, type] = {
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_ENUM: str,
}


# ----------------------------------------------------------------------------- sampler kinds


def kind_to_proto(kind: str) -> sampler_pb2.SamplerKind:
    """The ``SamplerKind`` enum value of ``"esans"``, ``"uniform"``, ..."""
    value = sampler_pb2.SamplerKind.Value(_KIND_PREFIX + kind.upper())
    return cast("sampler_pb2.SamplerKind", value)


def kind_from_proto(value: int) -> str:
    """``"esans"`` for ``SAMPLER_KIND_ESANS`` (and UNSPECIFIED); an unknown number comes back
    as ``"SamplerKind(N)"``, which the sampler refuses by name."""
    try:
        name = sampler_pb2.SamplerKind.Name(value)
    except ValueError:
        return f"SamplerKind({value})"
    return kind_from_name(name)


def kind_from_name(name: str) -> str:
    """``"esans"`` for ``"SAMPLER_KIND_ESANS"``, ``"ESANS"`` or ``"esans"`` (UNSPECIFIED too)."""
    kind = name.strip().upper().removeprefix(_KIND_PREFIX).lower()
    return ESANS if kind == "unspecified" else kind


def kind_to_json(kind: str) -> str:
    """The proto enum name, as JSON responses spell the sampler: ``"SAMPLER_KIND_ESANS"``."""
    return _KIND_PREFIX + kind.upper()


# ----------------------------------------------------------------------------- request


@dataclass(frozen=True, eq=False)
class SampleRequest:
    """One ``SampleNegatives`` request, transport-free. None means "the server's default".

    positive_ids: (B,) item ids. sampler: one of :data:`~esans_sampler.kinds.SAMPLER_KINDS`.
    codebook_version: None or "" = the active version. seed: None = fresh randomness.
    gamma is ignored by the baseline samplers (they draw no clusters).
    """

    positive_ids: npt.NDArray[Any]
    m_c: int | None = None
    m_o: int | None = None
    m_h: int | None = None
    gamma: float | None = None
    eta: float | None = None
    hard_lambda: float | None = None
    sampler: str = ESANS
    codebook_version: str | None = None
    seed: int | None = None
    return_embeddings: bool = False
    # Per-row exclusions (CSR): row r excludes exclude_ids[exclude_offsets[r]:...[r + 1]].
    exclude_ids: npt.NDArray[Any] | None = None
    exclude_offsets: npt.NDArray[Any] | None = None

    def exclusion_fields(self) -> dict[str, Any]:
        """The exclusion lists, when the request has them."""
        if self.exclude_ids is None or self.exclude_offsets is None:
            return {}
        return {
            "exclude_ids": np.asarray(self.exclude_ids).tolist(),
            "exclude_offsets": np.asarray(self.exclude_offsets).tolist(),
        }

    def optional_fields(self) -> dict[str, Any]:
        """The optional fields the caller set."""
        values = {name: getattr(self, name) for name in OPTIONAL_REQUEST_FIELDS}
        return {name: value for name, value in values.items() if value is not None}


def json_request_fields() -> dict[str, tuple[Any, Any]]:
    """``name: (JSON type, default)`` of the HTTP body, read from the proto: the server's body
    model. The sampler is named in JSON (``"esans"`` or ``"SAMPLER_KIND_ESANS"``)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for f in _REQUEST.fields:
        kind = _JSON_TYPES.get(f.type, int)
        if f.is_repeated:
            required = f.name == "positive_ids"
            fields[f.name] = (list[kind], ... if required else [])  # type: ignore[valid-type]
        elif f.has_presence:
            fields[f.name] = (kind | None, None)
        elif f.type == FieldDescriptor.TYPE_ENUM:
            fields[f.name] = (str, ESANS)
        else:
            fields[f.name] = (kind, kind())
    return fields


def request_from_proto(message: sampler_pb2.SampleNegativesRequest) -> SampleRequest:
    """The transport-free request of a ``SampleNegativesRequest`` (absent fields = None)."""
    optional = {n: getattr(message, n) for n in OPTIONAL_REQUEST_FIELDS if message.HasField(n)}
    return SampleRequest(
        positive_ids=np.array(message.positive_ids, dtype=np.int64),
        sampler=kind_from_proto(message.sampler),
        codebook_version=message.codebook_version or None,
        return_embeddings=message.return_embeddings,
        **_exclusions(message.exclude_ids, message.exclude_offsets),
        **optional,
    )


def _exclusions(ids: Any, offsets: Any) -> dict[str, Any]:
    """Both exclusion arrays when either was sent (the server checks them), else None."""
    if not len(ids) and not len(offsets):
        return {"exclude_ids": None, "exclude_offsets": None}
    return {"exclude_ids": np.array(ids), "exclude_offsets": np.array(offsets)}


def request_to_proto(request: SampleRequest) -> sampler_pb2.SampleNegativesRequest:
    """The ``SampleNegativesRequest`` of a request (the gRPC clients)."""
    return sampler_pb2.SampleNegativesRequest(
        positive_ids=np.asarray(request.positive_ids).tolist(),
        sampler=kind_to_proto(request.sampler),
        codebook_version=request.codebook_version or "",
        return_embeddings=request.return_embeddings,
        **request.exclusion_fields(),
        **request.optional_fields(),
    )


def request_from_json(body: dict[str, Any]) -> SampleRequest:
    """The request of a JSON body already checked against :func:`json_request_fields`."""
    ids = body.get("positive_ids") or []
    optional = {n: body[n] for n in OPTIONAL_REQUEST_FIELDS if body.get(n) is not None}
    return SampleRequest(
        positive_ids=np.array(ids) if ids else np.zeros(0, np.int64),
        sampler=kind_from_name(str(body.get("sampler", ESANS))),
        codebook_version=body.get("codebook_version") or None,
        return_embeddings=bool(body.get("return_embeddings", False)),
        **_exclusions(body.get("exclude_ids") or [], body.get("exclude_offsets") or []),
        **optional,
    )


def request_to_json(request: SampleRequest) -> dict[str, Any]:
    """The JSON body of a request (the HTTP client); unset optional fields are left out."""
    return {
        "positive_ids": np.asarray(request.positive_ids).tolist(),
        "sampler": request.sampler,
        "codebook_version": request.codebook_version or "",
        "return_embeddings": request.return_embeddings,
        **request.exclusion_fields(),
        **request.optional_fields(),
    }


def check_sampler(kind: str) -> None:
    """Refuse a sampler name no server knows (clients check before sending)."""
    if kind not in SAMPLER_KINDS:
        raise InvalidInputError(f"sampler must be one of {SAMPLER_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------- response


@dataclass(frozen=True, eq=False)
class SampledEmbeddings:
    """Embeddings from the codebook's snapshot and the EDIS virtual negatives built on them.

    positive (B, d); simple (B, m_c, m_o, d); hard (B, m_h, d); virtual_simple (B, m_c, T, d);
    simple_weights (B, m_c, T, m_o) with ``virtual_simple == simple_weights @ simple``;
    virtual_hard (B, m_h, d); all float32, T = 2 + ... + m_o. Rows past ``hard_counts`` are
    zero.
    """

    positive: FloatArray
    simple: FloatArray
    hard: FloatArray
    virtual_simple: FloatArray
    simple_weights: FloatArray
    virtual_hard: FloatArray
    eta: float
    hard_lambda: float


@dataclass(frozen=True, eq=False)
class SampleResponse:
    """One ``SampleNegatives`` answer as numpy arrays (shapes as in the proto).

    simple_ids (B, m_c, m_o) int64, simple_clusters (B, m_c) int32, simple_log_q float32;
    hard_ids (B, m_h) int64 (-1 past hard_counts), hard_counts (B,) int32, hard_log_q
    float32 (-inf past hard_counts); positive_primary / positive_secondary (B,) int32;
    simple_secondary (B, m_c, m_o) / hard_secondary (B, m_h) int32, -1 for baselines and past
    hard_counts, None from a server older than these fields.
    """

    codebook_version: str
    sampler: str
    positive_primary: npt.NDArray[np.int32]
    positive_secondary: npt.NDArray[np.int32]
    simple_ids: npt.NDArray[np.int64]
    simple_clusters: npt.NDArray[np.int32]
    simple_log_q: npt.NDArray[np.float32]
    hard_ids: npt.NDArray[np.int64]
    hard_counts: npt.NDArray[np.int32]
    hard_log_q: npt.NDArray[np.float32]
    simple_secondary: npt.NDArray[np.int32] | None = None
    hard_secondary: npt.NDArray[np.int32] | None = None
    embeddings: SampledEmbeddings | None = None

    @property
    def hard_valid(self) -> npt.NDArray[np.bool_]:
        """(B, m_h) True where a hard slot holds a real negative."""
        m_h = self.hard_ids.shape[1]
        mask: npt.NDArray[np.bool_] = np.arange(m_h)[None, :] < self.hard_counts[:, None]
        return mask


def response_to_bytes(
    codebook_version: str, sampler: str, tensors: Any, embeddings: SampledEmbeddings | None
) -> bytes:
    """The serialised ``SampleNegativesResponse``, written from the numpy buffers.

    ``tensors``: any object with an attribute per response tensor field (a
    :class:`~esans_sampler.sampler.NegativeSample`, a :class:`SampleResponse`).
    """
    return encode_sample_response(
        codebook_version,
        kind_to_proto(sampler),
        _present_tensors(tensors),
        None if embeddings is None else _embedding_tensors(embeddings),
        _embedding_scalars(embeddings),
    )


def response_from_bytes(data: bytes) -> SampleResponse:
    """A serialised ``SampleNegativesResponse``, read straight into numpy views."""
    try:
        reply = decode_sample_response(data)
        embeddings = None
        if reply.embeddings is not None:
            fields: dict[str, Any] = {**reply.embeddings, **reply.scalars}
            embeddings = SampledEmbeddings(**fields)
        return SampleResponse(
            codebook_version=reply.codebook_version,
            sampler=kind_from_proto(reply.sampler_kind),
            embeddings=embeddings,
            **reply.tensors,
        )
    except (WireFormatError, TypeError, ValueError) as exc:
        raise EsansError(f"malformed SampleNegatives response: {exc}") from exc


def response_to_json(
    codebook_version: str, sampler: str, tensors: Any, embeddings: SampledEmbeddings | None
) -> dict[str, Any]:
    """The JSON twin of ``SampleNegativesResponse`` (``embeddings`` null when not asked);
    ``tensors`` as in :func:`response_to_bytes`."""
    body: dict[str, Any] = {
        "codebook_version": codebook_version,
        "sampler": kind_to_json(sampler),
        **{name: to_json(array) for name, array in _present_tensors(tensors).items()},
        "embeddings": None,
    }
    if embeddings is not None:
        body["embeddings"] = {
            **{name: to_json(array) for name, array in _embedding_tensors(embeddings).items()},
            **_embedding_scalars(embeddings),
        }
    return body


def response_from_json(body: dict[str, Any]) -> SampleResponse:
    """A :func:`response_to_json` body as arrays (``null`` log q back to ``-inf``)."""
    try:
        embeddings = None
        if body.get("embeddings"):
            e = body["embeddings"]
            fields: dict[str, Any] = {name: from_json(e[name]) for name in EMBEDDING_TENSOR_NAMES}
            fields |= {name: float(e[name]) for name in EMBEDDING_SCALAR_NAMES}
            embeddings = SampledEmbeddings(**fields)
        return SampleResponse(
            codebook_version=str(body["codebook_version"]),
            sampler=kind_from_name(str(body["sampler"])),
            embeddings=embeddings,
            **{
                name: from_json(body[name], null=-np.inf)
                for name in RESPONSE_TENSOR_NAMES
                if name in body or name not in ADDED_RESPONSE_TENSORS
            },
        )
    except (KeyError, TypeError, ValueError, InvalidInputError) as exc:
        raise EsansError(f"malformed SampleNegatives response: {exc!r}") from exc


def _present_tensors(tensors: Any) -> dict[str, npt.ArrayLike]:
    """The response tensors of ``tensors`` by name; an added one it lacks (a response
    relayed from an older server) is left out, as that server left it out. Any other is
    required (AttributeError)."""
    present = {
        name: getattr(tensors, name, None)
        if name in ADDED_RESPONSE_TENSORS
        else getattr(tensors, name)
        for name in RESPONSE_TENSOR_NAMES
    }
    return {name: array for name, array in present.items() if array is not None}


def _embedding_tensors(embeddings: SampledEmbeddings) -> dict[str, npt.ArrayLike]:
    return {name: getattr(embeddings, name) for name in EMBEDDING_TENSOR_NAMES}


def _embedding_scalars(embeddings: SampledEmbeddings | None) -> dict[str, float]:
    return {
        n: 0.0 if embeddings is None else getattr(embeddings, n) for n in EMBEDDING_SCALAR_NAMES
    }


# ----------------------------------------------------------------------------- codebook info


@dataclass(frozen=True)
class CodebookInfo:
    """What a caller may know about one loaded codebook version."""

    version: str
    active: bool
    loaded_versions: list[str]
    num_items: int
    num_primary: int
    num_secondary: int
    embedding_dim: int  # 0 = no embedding snapshot
    modalities: list[str]
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict)
    stale: bool = False
    secondary_quantisation: str = ""
    hard_candidate_share: float = 0.0  # items with >= hard_candidate_m_h hard candidates
    hard_candidate_m_h: int = 0

    @property
    def metadata_json(self) -> str:
        return json.dumps(self.metadata, sort_keys=True)


def info_to_json(info: CodebookInfo) -> dict[str, Any]:
    """The ``GetCodebookInfoResponse`` fields of ``info``, by proto name (both servers)."""
    return {f.name: getattr(info, f.name) for f in _INFO.fields}


def info_to_proto(info: CodebookInfo) -> sampler_pb2.GetCodebookInfoResponse:
    return sampler_pb2.GetCodebookInfoResponse(**info_to_json(info))


def info_from_proto(reply: sampler_pb2.GetCodebookInfoResponse) -> dict[str, Any]:
    """A ``GetCodebookInfoResponse`` as the same dict the HTTP API returns: every field, false
    and zero ones too, in its proto type (not protobuf's JSON mapping, which turns int64 into
    strings and drops defaults)."""
    return {
        f.name: list(getattr(reply, f.name)) if f.is_repeated else getattr(reply, f.name)
        for f in _INFO.fields
    }
