"""What a trainer imports to call the service: gRPC and HTTP clients returning numpy arrays.

Both clients retry UNAVAILABLE (and connection failures) with exponential backoff, apply a
per-call deadline, and raise the same :mod:`esans_sampler.errors` classes the server raised,
so ``except InvalidInputError`` works whichever transport is used.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np
import numpy.typing as npt

from esans_sampler import errors
from esans_sampler.contract._proto.esans.v1 import sampler_pb2
from esans_sampler.contract.messages import (
    INFO_METHOD,
    SAMPLE_METHOD,
    SampledEmbeddings,
    SampleRequest,
    SampleResponse,
    check_sampler,
    info_from_proto,
    request_to_json,
    request_to_proto,
    response_from_bytes,
    response_from_json,
)
from esans_sampler.errors import DeadlineExceededError, error_for
from esans_sampler.exclusions import to_csr
from esans_sampler.kinds import ESANS
from esans_sampler.sampler import as_positive_ids, validate_sample_sizes

__all__ = [
    "HttpSamplerClient",
    "SampleRequest",
    "SampleResponse",
    "SampledEmbeddings",
    "SamplerClient",
    "TlsConfig",
    "build_request",
]

T = TypeVar("T")

# Large enough for B=4096 with embeddings at d=512; the server sets the same limit.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


def build_request(
    positive_ids: npt.ArrayLike | Sequence[int],
    *,
    m_c: int | None = None,
    m_o: int | None = None,
    m_h: int | None = None,
    gamma: float | None = None,
    eta: float | None = None,
    hard_lambda: float | None = None,
    sampler: str = ESANS,
    codebook_version: str = "",
    seed: int | None = None,
    return_embeddings: bool = False,
    exclude: Sequence[npt.ArrayLike] | None = None,
) -> SampleRequest:
    """The request of :meth:`SamplerClient.sample`'s arguments, checked as the server checks
    it, with the server's messages (both transports, sync and async)."""
    check_sampler(sampler)
    # A float or out-of-range id must not be truncated or wrapped on its way to the wire.
    ids = as_positive_ids(np.ravel(positive_ids))
    if m_c is not None or m_o is not None or m_h is not None:
        validate_sample_sizes(
            1 if m_c is None else m_c, 1 if m_o is None else m_o, 0 if m_h is None else m_h
        )
    exclude_ids = exclude_offsets = None
    if exclude is not None:
        if len(exclude) != ids.shape[0]:
            raise errors.InvalidInputError(
                f"exclude must hold one list of ids per positive: {ids.shape[0]}, got "
                f"{len(exclude)}"
            )
        exclude_ids, exclude_offsets = to_csr(exclude)
        if exclude_ids.size:
            as_positive_ids(exclude_ids)  # the same id checks as positives
    return SampleRequest(
        positive_ids=ids,
        exclude_ids=exclude_ids,
        exclude_offsets=exclude_offsets,
        m_c=m_c,
        m_o=m_o,
        m_h=m_h,
        gamma=gamma,
        eta=eta,
        hard_lambda=hard_lambda,
        sampler=sampler,
        codebook_version=codebook_version,
        seed=seed,
        return_embeddings=return_embeddings,
    )


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
        sampler: str = ESANS,
        codebook_version: str = "",
        seed: int | None = None,
        return_embeddings: bool = False,
        exclude: Sequence[npt.ArrayLike] | None = None,
        timeout_s: float | None = None,
    ) -> SampleResponse:
        """Negatives for ``positive_ids`` (B,); unset parameters take the server defaults.

        ``exclude``: per positive, ids its negatives must never be (e.g. the user's other
        items); log q is renormalised over what remains. For batch-shared negatives, mask the
        same ids with :func:`esans_sampler.exclusions.exclusion_mask`.

        Raises the :mod:`esans_sampler.errors` class of the server's status (e.g.
        :class:`~esans_sampler.errors.InvalidInputError` for INVALID_ARGUMENT / 422) after
        retrying UNAVAILABLE up to ``retries`` times within the deadline.
        """
        request = build_request(
            positive_ids, m_c=m_c, m_o=m_o, m_h=m_h, gamma=gamma, eta=eta,
            hard_lambda=hard_lambda, sampler=sampler, codebook_version=codebook_version,
            seed=seed, return_embeddings=return_embeddings, exclude=exclude,
        )  # fmt: skip
        return self._sample(request, self.timeout_s if timeout_s is None else timeout_s)

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

    def _sample(self, request: SampleRequest, timeout_s: float) -> SampleResponse:
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
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        import grpc

        self._grpc = grpc
        options = channel_options(max_message_bytes, tls)
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, channel_credentials(tls), options=options)
        self._metadata = call_metadata(token)
        # SampleNegatives replies are read by the contract's wire codec straight into numpy
        # (no parse copy).
        self._sample_raw = self._channel.unary_unary(
            SAMPLE_METHOD,
            request_serializer=sampler_pb2.SampleNegativesRequest.SerializeToString,
            response_deserializer=None,
        )
        self._info = self._channel.unary_unary(
            INFO_METHOD,
            request_serializer=sampler_pb2.GetCodebookInfoRequest.SerializeToString,
            response_deserializer=sampler_pb2.GetCodebookInfoResponse.FromString,
        )
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout_s: float) -> Any:
        def once(remaining: float) -> Any:
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except self._grpc.RpcError as exc:
                raise error_for(exc.code().name, exc.details() or str(exc)) from exc

        return self._with_retries(once, timeout_s)

    def _sample(self, request: SampleRequest, timeout_s: float) -> SampleResponse:
        message = request_to_proto(request)
        return response_from_bytes(self._call(self._sample_raw, message, timeout_s))

    def _codebook_info(self, version: str, timeout_s: float) -> dict[str, Any]:
        message = sampler_pb2.GetCodebookInfoRequest(codebook_version=version)
        return info_from_proto(self._call(self._info, message, timeout_s))


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the clients. ``ca_file``: PEM CAs that verify the server (None: the system's
    roots); ``cert_file`` and ``key_file``: the client's own certificate, for servers that
    require one (mTLS); ``server_name``: the name to check in the server's certificate when
    it differs from the host dialled (gRPC only; HTTP checks the URL's host)."""

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise errors.InvalidInputError("TlsConfig needs cert_file and key_file together")

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTPS client context of this configuration."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def channel_credentials(tls: TlsConfig) -> Any:
    """gRPC channel credentials of ``tls`` (both gRPC clients)."""
    import grpc

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls.ca_file),
        private_key=read(tls.key_file),
        certificate_chain=read(tls.cert_file),
    )


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The gRPC metadata that carries a sampling token (both gRPC clients)."""
    return None if token is None else (("authorization", f"Bearer {token}"),)


def channel_options(max_message_bytes: int, tls: TlsConfig | None = None) -> list[tuple[str, Any]]:
    """gRPC channel options of both clients: message limits in both directions, and the
    server name to verify when it is not the dialled host."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls is not None and tls.server_name is not None:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


class HttpSamplerClient(_SamplerClientBase):
    """HTTP/JSON client of ``POST /v1/sample`` and ``GET /v1/codebook``, same results."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        import httpx

        self._httpx = httpx
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        verify: ssl.SSLContext | bool = True if tls is None else tls.ssl_context()
        self._client = httpx.Client(
            base_url=base_url, timeout=timeout_s, headers=headers, verify=verify
        )
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

    def _sample(self, request: SampleRequest, timeout_s: float) -> SampleResponse:
        body = request_to_json(request)
        return response_from_json(self._request("POST", "/v1/sample", timeout_s, json=body))

    def _codebook_info(self, version: str, timeout_s: float) -> dict[str, Any]:
        return self._request("GET", "/v1/codebook", timeout_s, params={"version": version})
