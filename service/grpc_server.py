"""The gRPC transport: ``esans.v1.NegativeSampler`` plus the stock health and reflection.

The servicer only converts protos to a :class:`SampleRequest` and a :class:`SampleResult`
back; one wrapper maps every error to a status code (:func:`esans_service.errors.describe`)
and records the call's metrics.

The server is ``grpc.aio`` on one event loop thread per process, and each call samples on that
loop, inline. A sampling call is a fraction of a millisecond of GIL-bound numpy, so handing it
to a thread pool (as the synchronous server did) costs more CPU than the call itself: measured
with ``benchmarks/bench_service.py`` in alternating runs, 1.6 ms of server CPU per request
against 0.95 ms inline. Other calls (health, info) wait at most for the sample being
computed. The one exception is a pinned version that is not in memory: loading it from the
store takes seconds for a large codebook, so that call runs on a thread and the loop keeps
serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as AsyncHealthServicer
from grpc_reflection.v1alpha import reflection

from esans_sampler.contract._proto.esans.v1 import sampler_pb2, sampler_pb2_grpc
from esans_sampler.contract.messages import info_to_proto, request_from_proto, response_to_bytes
from esans_sampler.errors import UnauthenticatedError
from esans_service.core import SampleResult, SamplingService
from esans_service.errors import ErrorReport, PortUnavailableError, describe
from esans_service.metrics import ServiceMetrics
from esans_service.security import CredentialFiles, SampleTokens, TlsMaterial
from esans_service.settings import MIB, Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = sampler_pb2.DESCRIPTOR.services_by_name["NegativeSampler"].full_name
# A time_remaining() beyond this means the caller set no deadline.
_NO_DEADLINE_S = 1e8
# Calls the gRPC core lets in at once beyond max_concurrency (room for a health check or an
# info call); past this the core itself answers RESOURCE_EXHAUSTED. Calls that wait in the core
# for the event loop are invisible to the service's own admission control (they reach it only
# once the loop is free), so this limit is what refuses gRPC overload at once.
_EXTRA_CALLS = 1
_LOOP_START_TIMEOUT_S = 30.0

T = TypeVar("T")


def response_bytes(result: SampleResult) -> bytes:
    """The serialised ``SampleNegativesResponse`` of a :class:`SampleResult`, written from the
    numpy buffers (byte-identical to the protobuf classes' output)."""
    return response_to_bytes(
        result.codebook_version, result.sampler, result.sample, result.embeddings
    )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` value, or None without one."""
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return time.monotonic() + float(remaining)


# ----------------------------------------------------------------------------- servicer


class NegativeSamplerServicer(sampler_pb2_grpc.NegativeSamplerServicer):
    """``esans.v1.NegativeSampler``: conversion only; the work is :class:`SamplingService`'s."""

    def __init__(self, service: SamplingService) -> None:
        self._service = service

    async def SampleNegatives(
        self, request: sampler_pb2.SampleNegativesRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """Returns the response already serialised (see :func:`response_bytes`).

        The call takes its sampling slot first, then yields once, so calls that arrived
        meanwhile reach admission control (and are refused past ``max_concurrency``) before
        this one holds the loop to sample.
        """
        sample_request = request_from_proto(request)
        deadline = deadline_of(context)
        with self._service.admitted():
            if self._from_store(sample_request.codebook_version):
                result = await asyncio.to_thread(
                    self._service.sample_admitted, sample_request, deadline
                )
            else:
                await asyncio.sleep(0)
                result = self._service.sample_admitted(sample_request, deadline)
        return response_bytes(result)

    async def GetCodebookInfo(
        self, request: sampler_pb2.GetCodebookInfoRequest, context: grpc.aio.ServicerContext
    ) -> sampler_pb2.GetCodebookInfoResponse:
        version = request.codebook_version or None
        if self._from_store(version):
            return info_to_proto(await asyncio.to_thread(self._service.codebook_info, version))
        return info_to_proto(self._service.codebook_info(version))

    def _from_store(self, version: str | None) -> bool:
        """Whether serving ``version`` first loads it from the store: seconds for a large
        codebook, done on a thread so the loop keeps serving every other call meanwhile."""
        return not self._service.registry.in_memory(version)


class ErrorMapping:
    """Wraps the ``esans.v1`` methods once, at registration: maps their exceptions to status
    codes (once) and records metrics; with ``tokens``, a call without a valid sampling token
    is UNAUTHENTICATED before any work. Health and reflection are not wrapped (they stay open
    for probes). Not a server interceptor: an aio interceptor runs a coroutine and builds a
    new handler for every call, which costs more than the whole wrapper."""

    def __init__(self, metrics: ServiceMetrics, tokens: SampleTokens | None = None) -> None:
        self._metrics = metrics
        self._tokens = tokens

    def wrap(
        self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], method: str
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            failure: ErrorReport | None = None
            with self._metrics.track("grpc", method) as outcome:
                try:
                    if self._tokens is not None:
                        self._authenticate(context, method)
                    return await behavior(request, context)
                except Exception as exc:
                    failure = describe(exc)
                    outcome.status = failure.code
            await context.abort(failure.grpc_code, failure.message)  # raises

        return mapped

    def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> None:
        assert self._tokens is not None
        metadata = dict(context.invocation_metadata() or ())
        try:
            name = self._tokens.authenticate(metadata.get("authorization"))
        except UnauthenticatedError:
            self._metrics.unauthenticated.labels(transport="grpc").inc()
            logger.warning(
                "gRPC %s from %s refused: no valid sampling token", method, context.peer()
            )
            raise
        self._metrics.child(self._metrics.trainer_calls, name, "grpc").inc()


# ----------------------------------------------------------------------------- server


class EventLoopThread:
    """One asyncio event loop, run forever by a daemon thread: where this process's gRPC
    servers live. Other threads hand it coroutines with :meth:`call`."""

    _shared: EventLoopThread | None = None
    _shared_lock = threading.Lock()

    def __init__(self, name: str = "esans-grpc") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> EventLoopThread:
        """The process's loop, started on first use (after any fork: workers start it)."""
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and wait for its result (not from the loop itself)."""
        if self.on_loop():
            coroutine.close()
            raise RuntimeError("EventLoopThread.call from its own loop would wait forever")
        return self.submit(coroutine).result(timeout)


class GrpcServer:
    """A ``grpc.aio`` server with its health servicer, driven from other threads: start,
    report readiness, drain, stop."""

    def __init__(
        self,
        runner: EventLoopThread,
        server: grpc.aio.Server,
        health_servicer: AsyncHealthServicer,
        service: SamplingService,
    ) -> None:
        self.server = server
        self._runner = runner
        self._health = health_servicer
        self._service = service
        self._stopped: threading.Event | None = None

    def start(self) -> GrpcServer:
        self._runner.call(self.server.start(), _LOOP_START_TIMEOUT_S)
        self.refresh_health()
        return self

    def refresh_health(self) -> None:
        """SERVING once a codebook is loaded, NOT_SERVING before (and when draining).

        From another thread this returns once the status is set; on the loop (a codebook
        swap seen during a call) it is scheduled.
        """
        serving = self._service.ready
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        update = self._set_health(status)
        if self._runner.on_loop():
            self._runner.loop.create_task(update)
        else:
            self._runner.call(update, _LOOP_START_TIMEOUT_S)

    async def _set_health(self, status: Any) -> None:
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    def graceful_stop(self, grace: float | None) -> threading.Event:
        """Report NOT_SERVING, refuse new calls, let running ones finish for ``grace`` s.

        Returns the event set once the server has stopped (``wait()`` on it).
        """
        if self._stopped is None:
            stopped = self._stopped = threading.Event()

            async def stop() -> None:
                try:
                    await self._health.enter_graceful_shutdown()  # NOT_SERVING, for good
                    await self.server.stop(grace)
                finally:
                    stopped.set()

            self._runner.submit(stop())
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until :meth:`graceful_stop` has finished; False on timeout (or never asked)."""
        return self._stopped is not None and self._stopped.wait(timeout)


def server_credentials(files: CredentialFiles) -> grpc.ServerCredentials:
    """TLS credentials that follow ``files``: gRPC asks before each handshake and gets the
    new certificate once the files changed."""
    served = files.material

    def configuration(material: TlsMaterial) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.cert)], root_certificates=material.client_ca
        )

    def fetch() -> Any:
        nonlocal served
        current = files.material
        if current.generation == served.generation:
            return None  # unchanged
        served = current
        return configuration(current)

    return grpc.dynamic_ssl_server_credentials(
        configuration(served), fetch, require_client_authentication=files.mutual
    )


def _already_serialised(response: bytes) -> bytes:
    return response


def _sampler_handlers(
    servicer: NegativeSamplerServicer, mapping: ErrorMapping
) -> grpc.GenericRpcHandler:
    """The generated registration, except that SampleNegatives answers pre-serialised bytes
    and both methods go through ``mapping``."""
    handlers = {
        "SampleNegatives": grpc.unary_unary_rpc_method_handler(
            mapping.wrap(servicer.SampleNegatives, "SampleNegatives"),
            request_deserializer=sampler_pb2.SampleNegativesRequest.FromString,
            response_serializer=_already_serialised,
        ),
        "GetCodebookInfo": grpc.unary_unary_rpc_method_handler(
            mapping.wrap(servicer.GetCodebookInfo, "GetCodebookInfo"),
            request_deserializer=sampler_pb2.GetCodebookInfoRequest.FromString,
            response_serializer=sampler_pb2.GetCodebookInfoResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def create_grpc_server(
    settings: Settings,
    service: SamplingService,
    credentials: CredentialFiles | None = None,
    tokens: SampleTokens | None = None,
    reuse_port: bool = False,
) -> tuple[GrpcServer, int]:
    """An unstarted server bound to ``settings.grpc_host:grpc_port`` (0 = a free port), over
    TLS with ``credentials`` (re-read on each handshake after they change), sampling behind
    ``tokens`` when given. It runs on the process's :class:`EventLoopThread`.

    Returns the server and the bound port. Raises :class:`PortUnavailableError` (one line
    naming the port and its setting) if it cannot bind.
    """
    runner = EventLoopThread.shared()
    return runner.call(
        _create(runner, settings, service, credentials, tokens, reuse_port),
        _LOOP_START_TIMEOUT_S,
    )


async def _create(
    runner: EventLoopThread,
    settings: Settings,
    service: SamplingService,
    credentials: CredentialFiles | None,
    tokens: SampleTokens | None,
    reuse_port: bool,
) -> tuple[GrpcServer, int]:
    # The aio server binds to the running loop, so it is built on it.
    # Requests carry at most max_batch ids and max_excluded_ids exclusions (<= 10 bytes each
    # as varints) and a few scalars.
    max_receive = max(4 * MIB, 11 * (settings.max_batch + settings.max_excluded_ids) + 64 * 1024)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
            ("grpc.max_receive_message_length", max_receive),
            # Several worker processes share the port (SO_REUSEPORT); one alone must own it.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            # Limits against abuse: calls per connection, ping floods, idle connections.
            ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
            (
                "grpc.http2.min_ping_interval_without_data_ms",
                int(settings.grpc_min_ping_interval_s * 1000),
            ),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * 1000)),
        ],
        maximum_concurrent_rpcs=settings.max_concurrency + _EXTRA_CALLS,
    )
    mapping = ErrorMapping(service.metrics, tokens)
    servicer = NegativeSamplerServicer(service)
    server.add_generic_rpc_handlers((_sampler_handlers(servicer, mapping),))
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    try:
        if credentials is None:
            port = int(server.add_insecure_port(address))
        else:
            port = int(server.add_secure_port(address, server_credentials(credentials)))
    except RuntimeError as exc:
        port = 0
        cause: Exception | None = exc
    else:
        cause = None
    if port == 0 and (settings.grpc_port != 0 or cause is not None):
        raise PortUnavailableError(
            f"gRPC cannot listen on {address} (in use, or not allowed); set ESANS_GRPC_PORT "
            "(esans serve --grpc-port) to a free port, or stop what holds it"
        ) from cause
    grpc_server = GrpcServer(runner, server, health_servicer, service)
    grpc_server.refresh_health()
    logger.info("gRPC bound to %s:%d", settings.grpc_host, port)
    return grpc_server, port
