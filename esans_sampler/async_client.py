"""The asyncio gRPC client (grpc.aio), for trainers whose input pipeline is a coroutine: the
calls, deadlines, retries, errors and arrays of :class:`~esans_sampler.client.SamplerClient`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Self

import numpy.typing as npt

from esans_sampler import errors
from esans_sampler.client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TlsConfig,
    build_request,
    call_metadata,
    channel_credentials,
    channel_options,
)
from esans_sampler.contract._proto.esans.v1 import sampler_pb2
from esans_sampler.contract.messages import (
    INFO_METHOD,
    SAMPLE_METHOD,
    SampleResponse,
    info_from_proto,
    request_to_proto,
    response_from_bytes,
)
from esans_sampler.errors import error_for


class AsyncSamplerClient:
    """asyncio gRPC client (grpc.aio): :class:`SamplerClient`'s calls, deadline, retries and
    errors, awaited. For trainers whose input pipeline is a coroutine.

    >>> async with AsyncSamplerClient("localhost:50051") as client:  # doctest: +SKIP
    ...     response = await client.sample([101, 202, 303], seed=7)
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
        import grpc.aio

        self._grpc = grpc
        options = channel_options(max_message_bytes, tls)
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            credentials = channel_credentials(tls)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._metadata = call_metadata(token)
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

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def sample(
        self,
        positive_ids: npt.ArrayLike | Sequence[int],
        *,
        timeout_s: float | None = None,
        **options: Any,
    ) -> SampleResponse:
        """:meth:`SamplerClient.sample`, awaited; ``options`` are its keywords (``m_c``,
        ``seed``, ``return_embeddings``, ...)."""
        message = request_to_proto(build_request(positive_ids, **options))
        return response_from_bytes(await self._call(self._sample_raw, message, timeout_s))

    async def codebook_info(
        self, version: str = "", timeout_s: float | None = None
    ) -> dict[str, Any]:
        """The active (or named) codebook's description, as a dict."""
        message = sampler_pb2.GetCodebookInfoRequest(codebook_version=version)
        return info_from_proto(await self._call(self._info, message, timeout_s))

    async def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        """One call, retried on UNAVAILABLE with exponential backoff within the deadline."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        attempt = 0
        while True:
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                return await method(request, timeout=remaining, metadata=self._metadata)
            except self._grpc.aio.AioRpcError as exc:
                error = error_for(exc.code().name, exc.details() or str(exc))
                if not isinstance(error, errors.UnavailableError):
                    raise error from exc
                attempt += 1
                pause = self.backoff_s * (2 ** (attempt - 1))
                if attempt > self.retries or time.monotonic() + pause > deadline:
                    raise error from exc
                await asyncio.sleep(pause)
