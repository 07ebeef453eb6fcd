"""What a trainer imports to call the service: gRPC and HTTP clients returning numpy arrays.

Both clients retry UNAVAILABLE (and connection failures) with exponential backoff, apply a
per-call deadline, and raise the same :mod:`esans_sampler.errors` classes the server raised,
so ``except InvalidInputError`` works whichever transport is used.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import numpy as np
import numpy.typing as npt

from esans_sampler import errors
from esans_sampler.errors import DeadlineExceededError, error_for
from esans_sampler.kinds import SAMPLER_KINDS
from esans_sampler.sampler import as_positive_ids, validate_sample_sizes

T = TypeVar("T")

# Large enough for B=4096 with embeddings at d=512; the server sets the same limit.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


@dataclass(frozen=True)
class SampledEmbeddings:
    """Embeddings from the codebook's snapshot and the EDIS virtual negatives built on them.

    positive (B, d); simple (B, m_c, m_o, d); hard (B, m_h, d); virtual_simple (B, m_c, T, d);
    simple_weights (B, m_c, T, m_o) with ``virtual_simple == simple_weights @ simple``;
    virtual_hard (B, m_h, d). Rows past ``hard_counts`` are zero.
    """

    positive: npt.NDArray[np.float32]
    simple: npt.NDArray[np.float32]
    hard: npt.NDArray[np.float32]
    virtual_simple: npt.NDArray[np.float32]
    simple_weights: npt.NDArray[np.float32]
    virtual_hard: npt.NDArray[np.float32]
    eta: float
    hard_lambda: float


@dataclass(frozen=True)
class SampleResponse:
    """One ``SampleNegatives`` answer as numpy arrays (shapes as in the proto).

    simple_ids (B, m_c, m_o) int64, simple_clusters (B, m_c) int32, simple_log_q float32;
    hard_ids (B, m_h) int64 (-1 past hard_counts), hard_counts (B,) int32, hard_log_q
    float32 (-inf past hard_counts); positive_primary / positive_secondary (B,) int32.
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
    embeddings: SampledEmbeddings | None = None

    @property
    def hard_valid(self) -> npt.NDArray[np.bool_]:
        """(B, m_h) True where a hard slot holds a real negative."""
        m_h = self.hard_ids.shape[1]
        mask: npt.NDArray[np.bool_] = np.arange(m_h)[None, :] < self.hard_counts[:, None]
        return mask


def sample_fields(
    positive_ids: npt.ArrayLike | Sequence[int],
    m_c: int | None,
    m_o: int | None,
    m_h: int | None,
    gamma: float | None,
    eta: float | None,
    hard_lambda: float | None,
    sampler: str,
    codebook_version: str,
    seed: int | None,
    return_embeddings: bool,
) -> dict[str, Any]:
    """The request as a dict, checked as the server checks it (both transports)."""
    if sampler not in SAMPLER_KINDS:
        raise errors.InvalidInputError(f"sampler must be one of {SAMPLER_KINDS}, got {sampler!r}")
    # Refuse here what the server refuses, with its messages (the core's own checks): a float
    # or out-of-range id must not be truncated or wrapped on its way to the wire.
    ids = as_positive_ids(np.ravel(positive_ids))
    if m_c is not None or m_o is not None or m_h is not None:
        validate_sample_sizes(
            1 if m_c is None else m_c, 1 if m_o is None else m_o, 0 if m_h is None else m_h
        )
    fields: dict[str, Any] = {
        "positive_ids": ids.tolist(),
        "sampler": sampler,
        "codebook_version": codebook_version,
        "return_embeddings": return_embeddings,
    }
    optional = {
        "m_c": m_c,
        "m_o": m_o,
        "m_h": m_h,
        "gamma": gamma,
        "eta": eta,
        "hard_lambda": hard_lambda,
        "seed": seed,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


class _SamplerClientBase:
    """What both transports share: the call signature, retries and the context manager."""

    timeout_s: float
    retries: int
    backoff_s: float

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def sample(
        self,
        positive_ids: npt.ArrayLike | Sequence[int],
        *,
        m_c: int | None = None,
        m_o: int | None = None,
        m_h: int | None = None,
        gamma: float | None = None,
        eta: float | None = None,
        hard_lambda: float | None = None,
        sampler: str = "esans",
        codebook_version: str = "",
        seed: int | None = None,
        return_embeddings: bool = False,
        timeout_s: float | None = None,
    ) -> SampleResponse:
        """Negatives for ``positive_ids`` (B,); unset parameters take the server defaults.

        Raises the :mod:`esans_sampler.errors` class of the server's status (e.g.
        :class:`~esans_sampler.errors.InvalidInputError` for INVALID_ARGUMENT / 422) after
        retrying UNAVAILABLE up to ``retries`` times within the deadline.
        """
        fields = sample_fields(
            positive_ids, m_c, m_o, m_h, gamma, eta, hard_lambda, sampler,
            codebook_version, seed, return_embeddings,
        )  # fmt: skip
        return self._sample(fields, self.timeout_s if timeout_s is None else timeout_s)

    def prefetch(
        self,
        batches: Iterable[npt.ArrayLike | Sequence[int]],
        depth: int = 4,
        *,
        seed: int | None = None,
        **options: Any,
    ) -> Iterator[SampleResponse]:
        """Responses for ``batches`` in order, keeping up to ``depth`` calls in flight, so the
        sampler works while the trainer trains on the previous batch.

        ``options`` are :meth:`sample`'s keywords; with ``seed``, batch i uses ``seed + i``
        (reproducible, different per batch). ``batches`` is read lazily, ``depth`` ahead.
        Errors arrive at the batch that caused them; closing the iterator early cancels the
        calls not yet started.

        >>> for ids, response in zip(batches, client.prefetch(batches)):  # doctest: +SKIP
        ...     loss = esans_loss(...)
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise errors.InvalidInputError(f"depth must be an integer >= 1, got {depth!r}")
        pending: deque[Future[SampleResponse]] = deque()
        source = iter(batches)
        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="esans-prefetch") as pool:
            try:
                for index, ids in enumerate(source):
                    call_seed = None if seed is None else seed + index
                    pending.append(pool.submit(self.sample, ids, seed=call_seed, **options))
                    if len(pending) >= depth:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def codebook_info(self, version: str = "", timeout_s: float | None = None) -> dict[str, Any]:
        """The active (or named) codebook's description, as a dict."""
        return self._codebook_info(version, self.timeout_s if timeout_s is None else timeout_s)

    def _sample(self, fields: dict[str, Any], timeout_s: float) -> SampleResponse:
        raise NotImplementedError

    def _codebook_info(self, version: str, timeout_s: float) -> dict[str, Any]:
        raise NotImplementedError

    def _with_retries(self, call: Callable[[float], T], timeout_s: float) -> T:
        """``call(remaining_seconds)``, retried on UNAVAILABLE with exponential backoff."""
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            try:
                return call(max(deadline - time.monotonic(), 0.001))
            except errors.UnavailableError:
                attempt += 1
                pause = self.backoff_s * (2 ** (attempt - 1))
                if attempt > self.retries or time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)


class SamplerClient(_SamplerClientBase):
    """gRPC client of ``esans.v1.NegativeSampler``.

    >>> with SamplerClient("localhost:50051") as client:  # doctest: +SKIP
    ...     response = client.sample([101, 202, 303], seed=7)
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        import grpc

        from service._proto.esans.v1 import sampler_pb2, sampler_pb2_grpc

        self._grpc = grpc
        self._pb2 = sampler_pb2
        self._channel = grpc.insecure_channel(target, options=channel_options(max_message_bytes))
        self._stub = sampler_pb2_grpc.NegativeSamplerStub(self._channel)  # type: ignore[no-untyped-call]
        # SampleNegatives replies are read by service.wire straight into numpy (no parse copy).
        self._sample_raw = self._channel.unary_unary(
            SAMPLE_METHOD,
            request_serializer=sampler_pb2.SampleNegativesRequest.SerializeToString,
            response_deserializer=None,
        )
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout_s: float) -> Any:
        def once(remaining: float) -> Any:
            try:
                return method(request, timeout=remaining)
            except self._grpc.RpcError as exc:
                raise error_for(exc.code().name, exc.details() or str(exc)) from exc

        return self._with_retries(once, timeout_s)

    def _sample(self, fields: dict[str, Any], timeout_s: float) -> SampleResponse:
        request = grpc_request(self._pb2, fields)
        return response_from_bytes(self._call(self._sample_raw, request, timeout_s))

    def _codebook_info(self, version: str, timeout_s: float) -> dict[str, Any]:
        request = self._pb2.GetCodebookInfoRequest(codebook_version=version)
        return info_dict(self._call(self._stub.GetCodebookInfo, request, timeout_s))


def info_dict(reply: Any) -> dict[str, Any]:
    """A ``GetCodebookInfoResponse`` as a dict with every field, false and zero ones too, in
    its proto type (int, bool, float, str, list); not protobuf's JSON mapping, which turns
    int64 into strings and drops defaults."""
    return {
        field.name: list(getattr(reply, field.name))
        if field.is_repeated
        else getattr(reply, field.name)
        for field in reply.DESCRIPTOR.fields
    }


SAMPLE_METHOD = "/esans.v1.NegativeSampler/SampleNegatives"
INFO_METHOD = "/esans.v1.NegativeSampler/GetCodebookInfo"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options of both clients: message limits in both directions."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def grpc_request(pb2: Any, fields: dict[str, Any]) -> Any:
    """The ``SampleNegativesRequest`` of :func:`sample_fields` (both gRPC clients)."""
    kind = pb2.SamplerKind.Value(f"SAMPLER_KIND_{fields['sampler'].upper()}")
    return pb2.SampleNegativesRequest(**{**fields, "sampler": kind})


def response_from_bytes(data: bytes) -> SampleResponse:
    """A ``SampleNegatives`` reply, read from its wire bytes straight into numpy."""
    from service._proto.esans.v1 import sampler_pb2
    from service.wire import (
        EMBEDDING_TENSOR_NAMES,
        RESPONSE_TENSOR_NAMES,
        WireFormatError,
        decode_sample_response,
    )

    try:
        reply = decode_sample_response(data)
        t = reply.tensors
        embeddings = None
        if reply.embeddings is not None:
            e = reply.embeddings
            embeddings = SampledEmbeddings(
                **{name: e[name] for name in EMBEDDING_TENSOR_NAMES},
                eta=reply.eta,
                hard_lambda=reply.hard_lambda,
            )
        kind = sampler_pb2.SamplerKind.Name(reply.sampler_kind)
        return SampleResponse(
            codebook_version=reply.codebook_version,
            sampler=kind.removeprefix("SAMPLER_KIND_").lower(),
            **{name: t[name] for name in RESPONSE_TENSOR_NAMES},
            embeddings=embeddings,
        )
    except (WireFormatError, KeyError, ValueError) as exc:
        raise errors.EsansError(f"malformed SampleNegatives response: {exc}") from exc


class HttpSamplerClient(_SamplerClientBase):
    """HTTP/JSON client of ``POST /v1/sample`` and ``GET /v1/codebook``, same results."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.05,
    ) -> None:
        import httpx

        self._httpx = httpx
        self._client = httpx.Client(base_url=base_url, timeout=timeout_s)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, timeout_s: float, **kwargs: Any) -> dict[str, Any]:
        def once(remaining: float) -> dict[str, Any]:
            try:
                reply = self._client.request(method, path, timeout=remaining, **kwargs)
            except self._httpx.TimeoutException as exc:
                raise DeadlineExceededError(f"{method} {path} timed out") from exc
            except self._httpx.TransportError as exc:
                raise errors.UnavailableError(f"{method} {path}: {exc}") from exc
            body: dict[str, Any] = reply.json()
            if reply.status_code >= 400:
                error = body.get("error", {})
                raise error_for(error.get("code", ""), error.get("message", reply.text))
            return body

        return self._with_retries(once, timeout_s)

    def _sample(self, fields: dict[str, Any], timeout_s: float) -> SampleResponse:
        return _response_from_json(self._request("POST", "/v1/sample", timeout_s, json=fields))

    def _codebook_info(self, version: str, timeout_s: float) -> dict[str, Any]:
        return self._request("GET", "/v1/codebook", timeout_s, params={"version": version})


def _response_from_json(body: dict[str, Any]) -> SampleResponse:
    from service.tensors import from_json

    def arr(value: dict[str, Any]) -> Any:
        return from_json(value, null=-np.inf)

    embeddings = None
    if body.get("embeddings"):
        e = body["embeddings"]
        embeddings = SampledEmbeddings(
            positive=arr(e["positive"]),
            simple=arr(e["simple"]),
            hard=arr(e["hard"]),
            virtual_simple=arr(e["virtual_simple"]),
            simple_weights=arr(e["simple_weights"]),
            virtual_hard=arr(e["virtual_hard"]),
            eta=float(e["eta"]),
            hard_lambda=float(e["hard_lambda"]),
        )
    return SampleResponse(
        codebook_version=body["codebook_version"],
        sampler=str(body["sampler"]).upper().removeprefix("SAMPLER_KIND_").lower(),
        positive_primary=arr(body["positive_primary"]),
        positive_secondary=arr(body["positive_secondary"]),
        simple_ids=arr(body["simple_ids"]),
        simple_clusters=arr(body["simple_clusters"]),
        simple_log_q=arr(body["simple_log_q"]),
        hard_ids=arr(body["hard_ids"]),
        hard_counts=arr(body["hard_counts"]),
        hard_log_q=arr(body["hard_log_q"]),
        embeddings=embeddings,
    )
