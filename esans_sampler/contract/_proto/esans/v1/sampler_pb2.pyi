from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_KIND_UNSPECIFIED: _ClassVar[SamplerKind]
    SAMPLER_KIND_ESANS: _ClassVar[SamplerKind]
    SAMPLER_KIND_UNIFORM: _ClassVar[SamplerKind]
    SAMPLER_KIND_POPULARITY: _ClassVar[SamplerKind]
    SAMPLER_KIND_MIXED: _ClassVar[SamplerKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
SAMPLER_KIND_UNSPECIFIED: SamplerKind
SAMPLER_KIND_ESANS: SamplerKind
SAMPLER_KIND_UNIFORM: SamplerKind
SAMPLER_KIND_POPULARITY: SamplerKind
SAMPLER_KIND_MIXED: SamplerKind
DTYPE_UNSPECIFIED: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_FLOAT32: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SampleNegativesRequest(_message.Message):
    __slots__ = ("positive_ids", "m_c", "m_o", "m_h", "gamma", "eta", "hard_lambda", "sampler", "codebook_version", "seed", "return_embeddings", "exclude_ids", "exclude_offsets")
    POSITIVE_IDS_FIELD_NUMBER: _ClassVar[int]
    M_C_FIELD_NUMBER: _ClassVar[int]
    M_O_FIELD_NUMBER: _ClassVar[int]
    M_H_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    HARD_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    CODEBOOK_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETURN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    positive_ids: _containers.RepeatedScalarFieldContainer[int]
    m_c: int
    m_o: int
    m_h: int
    gamma: float
    eta: float
    hard_lambda: float
    sampler: SamplerKind
    codebook_version: str
    seed: int
    return_embeddings: bool
    exclude_ids: _containers.RepeatedScalarFieldContainer[int]
    exclude_offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, positive_ids: _Optional[_Iterable[int]] = ..., m_c: _Optional[int] = ..., m_o: _Optional[int] = ..., m_h: _Optional[int] = ..., gamma: _Optional[float] = ..., eta: _Optional[float] = ..., hard_lambda: _Optional[float] = ..., sampler: _Optional[_Union[SamplerKind, str]] = ..., codebook_version: _Optional[str] = ..., seed: _Optional[int] = ..., return_embeddings: _Optional[bool] = ..., exclude_ids: _Optional[_Iterable[int]] = ..., exclude_offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class Embeddings(_message.Message):
    __slots__ = ("positive", "simple", "hard", "virtual_simple", "simple_weights", "virtual_hard", "eta", "hard_lambda")
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    SIMPLE_FIELD_NUMBER: _ClassVar[int]
    HARD_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_SIMPLE_FIELD_NUMBER: _ClassVar[int]
    SIMPLE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_HARD_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    HARD_LAMBDA_FIELD_NUMBER: _ClassVar[int]
    positive: Tensor
    simple: Tensor
    hard: Tensor
    virtual_simple: Tensor
    simple_weights: Tensor
    virtual_hard: Tensor
    eta: float
    hard_lambda: float
    def __init__(self, positive: _Optional[_Union[Tensor, _Mapping]] = ..., simple: _Optional[_Union[Tensor, _Mapping]] = ..., hard: _Optional[_Union[Tensor, _Mapping]] = ..., virtual_simple: _Optional[_Union[Tensor, _Mapping]] = ..., simple_weights: _Optional[_Union[Tensor, _Mapping]] = ..., virtual_hard: _Optional[_Union[Tensor, _Mapping]] = ..., eta: _Optional[float] = ..., hard_lambda: _Optional[float] = ...) -> None: ...

class SampleNegativesResponse(_message.Message):
    __slots__ = ("codebook_version", "sampler", "positive_primary", "positive_secondary", "simple_ids", "simple_clusters", "simple_log_q", "hard_ids", "hard_counts", "hard_log_q", "embeddings", "simple_secondary", "hard_secondary")
    CODEBOOK_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_SECONDARY_FIELD_NUMBER: _ClassVar[int]
    SIMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    SIMPLE_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    SIMPLE_LOG_Q_FIELD_NUMBER: _ClassVar[int]
    HARD_IDS_FIELD_NUMBER: _ClassVar[int]
    HARD_COUNTS_FIELD_NUMBER: _ClassVar[int]
    HARD_LOG_Q_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    SIMPLE_SECONDARY_FIELD_NUMBER: _ClassVar[int]
    HARD_SECONDARY_FIELD_NUMBER: _ClassVar[int]
    codebook_version: str
    sampler: SamplerKind
    positive_primary: Tensor
    positive_secondary: Tensor
    simple_ids: Tensor
    simple_clusters: Tensor
    simple_log_q: Tensor
    hard_ids: Tensor
    hard_counts: Tensor
    hard_log_q: Tensor
    embeddings: Embeddings
    simple_secondary: Tensor
    hard_secondary: Tensor
    def __init__(self, codebook_version: _Optional[str] = ..., sampler: _Optional[_Union[SamplerKind, str]] = ..., positive_primary: _Optional[_Union[Tensor, _Mapping]] = ..., positive_secondary: _Optional[_Union[Tensor, _Mapping]] = ..., simple_ids: _Optional[_Union[Tensor, _Mapping]] = ..., simple_clusters: _Optional[_Union[Tensor, _Mapping]] = ..., simple_log_q: _Optional[_Union[Tensor, _Mapping]] = ..., hard_ids: _Optional[_Union[Tensor, _Mapping]] = ..., hard_counts: _Optional[_Union[Tensor, _Mapping]] = ..., hard_log_q: _Optional[_Union[Tensor, _Mapping]] = ..., embeddings: _Optional[_Union[Embeddings, _Mapping]] = ..., simple_secondary: _Optional[_Union[Tensor, _Mapping]] = ..., hard_secondary: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GetCodebookInfoRequest(_message.Message):
    __slots__ = ("codebook_version",)
    CODEBOOK_VERSION_FIELD_NUMBER: _ClassVar[int]
    codebook_version: str
    def __init__(self, codebook_version: _Optional[str] = ...) -> None: ...

class GetCodebookInfoResponse(_message.Message):
    __slots__ = ("version", "active", "loaded_versions", "num_items", "num_primary", "num_secondary", "embedding_dim", "modalities", "created_at", "metadata_json", "stale", "secondary_quantisation", "hard_candidate_share", "hard_candidate_m_h")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    NUM_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    NUM_SECONDARY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    SECONDARY_QUANTISATION_FIELD_NUMBER: _ClassVar[int]
    HARD_CANDIDATE_SHARE_FIELD_NUMBER: _ClassVar[int]
    HARD_CANDIDATE_M_H_FIELD_NUMBER: _ClassVar[int]
    version: str
    active: bool
    loaded_versions: _containers.RepeatedScalarFieldContainer[str]
    num_items: int
    num_primary: int
    num_secondary: int
    embedding_dim: int
    modalities: _containers.RepeatedScalarFieldContainer[str]
    created_at: str
    metadata_json: str
    stale: bool
    secondary_quantisation: str
    hard_candidate_share: float
    hard_candidate_m_h: int
    def __init__(self, version: _Optional[str] = ..., active: _Optional[bool] = ..., loaded_versions: _Optional[_Iterable[str]] = ..., num_items: _Optional[int] = ..., num_primary: _Optional[int] = ..., num_secondary: _Optional[int] = ..., embedding_dim: _Optional[int] = ..., modalities: _Optional[_Iterable[str]] = ..., created_at: _Optional[str] = ..., metadata_json: _Optional[str] = ..., stale: _Optional[bool] = ..., secondary_quantisation: _Optional[str] = ..., hard_candidate_share: _Optional[float] = ..., hard_candidate_m_h: _Optional[int] = ...) -> None: ...
