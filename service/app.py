"""Process wiring: Redis, store, registry, the sampling service and both transports.

:class:`ServiceRuntime` builds and starts everything from a :class:`Settings` and stops it
in order; :func:`run_server` adds logging and signal handling for ``esans serve``. Nothing
happens at import time.

Shutdown (SIGTERM/SIGINT or :meth:`ServiceRuntime.stop`): readiness goes false first (gRPC
health NOT_SERVING, ``/readyz`` 503), both servers stop taking new calls and let running
ones finish for ``shutdown_grace_s``, then the registry watcher, the Redis client and the
embedded Redis (if any) are stopped.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import redis
import uvicorn
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from esans_sampler.errors import UnavailableError
from esans_service.core import SamplingService
from esans_service.embedded_redis import EmbeddedRedis, running_embedded_url
from esans_service.errors import PortUnavailableError
from esans_service.grpc_server import GrpcServer, create_grpc_server
from esans_service.http_app import create_app
from esans_service.http_limits import deadline_protocol
from esans_service.leases import LeaseKeeper
from esans_service.metrics import ServiceMetrics
from esans_service.registry import CodebookRegistry
from esans_service.security import CredentialFiles, FileWatcher, SampleTokens
from esans_service.settings import Settings
from esans_service.store import CodebookStore
from esans_service.worker_metrics import ExpositionWriter

logger = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 5.0
_HTTP_START_TIMEOUT_S = 30.0
_POLL_S = 0.05
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def connect_redis(settings: Settings) -> tuple[redis.Redis, EmbeddedRedis | None]:
    """A binary-safe Redis client for ``settings.redis_url``, or for an embedded redis-server
    started in ``settings.data_dir`` when no URL is set. The caller closes/stops both.

    An unreachable external Redis is logged, not fatal: the service starts unready and
    loads the active codebook once Redis answers.
    """
    embedded = None
    url = settings.redis_url or running_embedded_url(settings.data_dir)
    if url is not None and settings.redis_url is None:
        logger.info("using the embedded Redis already serving %s", settings.data_dir)
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir, port=settings.embedded_redis_port).start()
        url = embedded.url
        logger.info(
            "no redis_url set: started an embedded Redis with data in %s", embedded.data_dir
        )
    client = redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        health_check_interval=30,
        # Fail fast when Redis is down: the registry keeps serving and retries on its own.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        # Keep going: the registry retries, and /readyz says 503 until a codebook loads.
        logger.warning("Redis at %s does not answer yet: %s", _redact(url), exc)
    return client, embedded


@dataclass(frozen=True)
class WorkerSlot:
    """What a worker process of a multi-worker replica gets from its supervisor: its index,
    the HTTP socket all workers accept on, and the directory where they share metrics and
    the memory-mapped embedding snapshots."""

    index: int
    http_socket: socket.socket
    metrics_dir: Path


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (0 = a free port), for uvicorn."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PortUnavailableError(
            f"HTTP cannot listen on {host}:{port} ({exc.strerror or exc}); set ESANS_HTTP_PORT "
            "(esans serve --http-port) to a free port, or stop what holds it"
        ) from exc
    sock.set_inheritable(True)
    return sock


class ServiceRuntime:
    """Everything ``esans serve`` runs, started by :meth:`start` and stopped by :meth:`stop`.

    After :meth:`start`: ``grpc_port`` and ``http_port`` are the bound ports (useful with
    port 0), ``store``, ``registry`` and ``service`` the live objects.
    """

    def __init__(self, settings: Settings, worker: WorkerSlot | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = ServiceMetrics()
        self._metrics_writer: ExpositionWriter | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._client: redis.Redis | None = None
        self._embedded: EmbeddedRedis | None = None
        self._registry: CodebookRegistry | None = None
        self._service: SamplingService | None = None
        self._store: CodebookStore | None = None
        self._grpc: GrpcServer | None = None
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._http_socket: socket.socket | None = None
        self._leases: LeaseKeeper | None = None
        self._lease_client: redis.Redis | None = None
        self._credentials: CredentialFiles | None = None
        self._http_tls: ssl.SSLContext | None = None  # what uvicorn serves with
        self._http_tls_current: ssl.SSLContext | None = None  # the newest generation
        self._tokens: SampleTokens | None = None
        self._watcher: FileWatcher | None = None
        self._stopped = False

    @property
    def store(self) -> CodebookStore:
        if self._store is None:
            raise UnavailableError("the runtime is not started")
        return self._store

    @property
    def registry(self) -> CodebookRegistry:
        if self._registry is None:
            raise UnavailableError("the runtime is not started")
        return self._registry

    @property
    def service(self) -> SamplingService:
        if self._service is None:
            raise UnavailableError("the runtime is not started")
        return self._service

    def start(self) -> ServiceRuntime:
        """Connect Redis, load the active codebook (if any) and start both servers."""
        s = self.settings
        try:
            self._start_security()
            self._client, self._embedded = connect_redis(s)
            self._store = CodebookStore(
                self._client, namespace=s.redis_namespace, keep_versions=s.keep_versions
            )
            self._registry = CodebookRegistry(
                self._store,
                max_loaded=s.max_loaded_versions,
                poll_interval_s=s.poll_interval_s,
                on_swap=self._on_swap,
                on_store_error=self.metrics.store_error,
                snapshot_dir=None if self.worker is None else self.worker.metrics_dir,
            )
            registry = self._registry
            self.metrics.watch_stale(lambda: registry.stale)
            self._leases = self._start_leases()
            self._service = SamplingService(registry, s, self.metrics, self._leases)
            registry.start()  # refresh once, then follow the store
            if not registry.ready:
                logger.warning(
                    "no active codebook in the store yet: sampling answers UNAVAILABLE until "
                    "one is published (esans publish)"
                )
            self._grpc, self.grpc_port = create_grpc_server(
                s, self._service, self._credentials, self._tokens, self.worker is not None
            )
            self._grpc.start()
            self._start_http()
            if self.worker is not None:
                self.metrics.worker_up.labels(worker=str(self.worker.index)).set(1)
                path = self.worker.metrics_dir / f"worker-{self.worker.index}.prom"
                self._metrics_writer = ExpositionWriter(path, lambda: self.metrics.render()[0])
                self._metrics_writer.start()
        except BaseException:
            self.stop(grace=0)
            raise
        logger.info(
            "esans-sampler serving: gRPC on %s:%d, HTTP on %s:%d, codebook %s%s",
            s.grpc_host,
            self.grpc_port,
            s.http_host,
            self.http_port,
            registry.active_version or "none yet",
            self._security_summary(),
        )
        return self

    def _start_leases(self) -> LeaseKeeper:
        s = self.settings
        client = self._client
        if s.redis_lease_url is not None:
            self._lease_client = redis.Redis.from_url(s.redis_lease_url)
            client = self._lease_client
        assert client is not None
        return LeaseKeeper(
            client, s.redis_namespace, s.lease_ttl_s, on_error=self.metrics.store_error
        ).start()

    def _start_security(self) -> None:
        """Read the TLS and token files (a bad one stops the start) and watch them."""
        s = self.settings
        if s.tls_cert_file is not None and s.tls_key_file is not None:
            self._credentials = CredentialFiles(
                s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file
            )
        if s.sample_tokens_file is not None:
            admin = s.admin_token.get_secret_value() if s.admin_token is not None else None
            self._tokens = SampleTokens(s.sample_tokens_file, admin_token=admin)
        checks: list[Callable[[bool], bool]] = []
        if self._credentials is not None:
            checks.append(self._reload_tls)
        if self._tokens is not None:
            checks.append(self._reload_tokens)
        self._watcher = FileWatcher(checks, s.tls_reload_interval_s).start()

    def _reload_tls(self, force: bool) -> bool:
        assert self._credentials is not None
        if not self._credentials.check(force):
            return False
        if self._http_tls is not None:
            # A fresh context per generation, swapped in by the handshake's SNI callback: a
            # context in use is never changed. (gRPC asks on its next handshake.)
            self._http_tls_current = self._credentials.server_context()
        self.metrics.credential_reloads.labels(kind="tls").inc()
        return True

    def _reload_tokens(self, force: bool) -> bool:
        assert self._tokens is not None
        changed = self._tokens.check(force)
        if changed:
            self.metrics.credential_reloads.labels(kind="tokens").inc()
        return changed

    def _select_tls_context(
        self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, served: ssl.SSLContext
    ) -> None:
        current = self._http_tls_current
        if current is not None and current is not served:
            connection.context = current

    def reload_credentials(self) -> None:
        """Re-read the certificate and token files now (SIGHUP)."""
        if self._watcher is not None:
            self._watcher.now()

    def _security_summary(self) -> str:
        parts = []
        if self._credentials is not None:
            parts.append("mTLS" if self._credentials.mutual else "TLS")
        if self._tokens is not None:
            parts.append(f"sampling tokens for {len(self._tokens.names)} trainers")
        return f" ({', '.join(parts)})" if parts else " (plaintext, no sampling tokens)"

    def _on_swap(self, version: str) -> None:
        self.metrics.codebook_swapped(version)
        if self._registry is not None:
            self.metrics.catalogue_changed(self._registry.get().artifact.metadata)
        if self._grpc is not None:
            self._grpc.refresh_health()

    def _start_http(self) -> None:
        s = self.settings
        worker = self.worker
        metrics_dir = None if worker is None else worker.metrics_dir
        app = create_app(s, self.service, self.store, self.registry, self._tokens, metrics_dir)
        # A worker serves on the socket its supervisor bound; the kernel spreads connections.
        sock = _bind(s.http_host, s.http_port) if worker is None else worker.http_socket
        self.http_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_config=None,  # keep the process' logging configuration
            log_level=s.log_level.lower(),
            lifespan="off",
            timeout_graceful_shutdown=math.ceil(s.shutdown_grace_s),
            http=deadline_protocol(s.http_header_timeout_s),
            limit_concurrency=s.http_max_connections,
            timeout_keep_alive=math.ceil(s.http_keep_alive_s),
        )
        config.load()
        if self._credentials is not None:
            # Our own context, so a rotated certificate can be loaded into it in place.
            self._http_tls = self._credentials.server_context()
            self._http_tls_current = self._http_tls
            self._http_tls.sni_callback = self._select_tls_context
            config.ssl = self._http_tls
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="esans-http", daemon=True
        )
        self._http, self._http_thread, self._http_socket = server, thread, sock
        thread.start()
        deadline = time.monotonic() + _HTTP_START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise UnavailableError(f"the HTTP server did not start on port {self.http_port}")
            time.sleep(_POLL_S)

    @property
    def healthy(self) -> bool:
        """False once a server thread has died unexpectedly."""
        return self._http_thread is not None and self._http_thread.is_alive()

    def stop(self, grace: float | None = None) -> None:
        """Drain (readiness false, running calls get ``grace`` s) and stop everything.

        Idempotent. ``grace`` defaults to ``settings.shutdown_grace_s``.
        """
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        # Both counts are logged so an operator (and the SIGTERM test) can see the drain finish
        # every request that was running: calls still queued in gRPC's core are cancelled.
        logger.info(
            "shutting down: %d requests in flight, draining for up to %.1f s",
            self.metrics.in_flight_total(),
            grace,
        )
        if self._service is not None:
            self._service.begin_drain()  # /readyz 503 from now on
        grpc_done = self._grpc.graceful_stop(grace) if self._grpc is not None else None
        if self._http is not None:
            self._http.config.timeout_graceful_shutdown = math.ceil(grace)
            self._http.should_exit = True
        if grpc_done is not None:
            grpc_done.wait(grace + 1.0)
        if self._http_thread is not None:
            self._http_thread.join(grace + 5.0)
            if self._http_thread.is_alive():
                logger.warning("the HTTP server did not stop within the grace period")
        if self._http_socket is not None:
            self._http_socket.close()  # uvicorn served on it; closing twice is harmless
        if self._metrics_writer is not None:
            self.metrics.worker_up.labels(worker=str(self.worker.index if self.worker else 0)).set(
                0
            )
            self._metrics_writer.stop()
        if self._watcher is not None:
            self._watcher.stop()
        if self._leases is not None:
            self._leases.stop()
        if self._lease_client is not None:
            self._lease_client.close()
        if self._credentials is not None:
            self._credentials.close()
        if self._registry is not None:
            self._registry.stop()
        if self._client is not None:
            self._client.close()
        if self._embedded is not None:
            self._embedded.stop()
        logger.info("stopped (%d requests still in flight)", self.metrics.in_flight_total())


def configure_logging(level: str) -> None:
    """Root logging at ``level`` with one stream handler (idempotent)."""
    logging.basicConfig(level=level, format=_LOG_FORMAT)
    logging.getLogger().setLevel(level)


def limit_native_threads(threads: int) -> None:
    """Cap the BLAS/OpenMP pools numpy calls into (EDIS uses einsum/matmul) for this process.

    Requests run in parallel on the gRPC and HTTP threads; a multi-threaded BLAS inside each
    one oversubscribes the CPUs (measured: embeddings throughput 0.48 -> 0.66 GB/s on 2 vCPUs
    with 1 thread, ``benchmarks/bench_service.py``).
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)


def run_server(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT, then drain and stop (for ``esans serve``).

    Must be called from the main thread (signal handlers). With ``settings.workers > 1`` the
    process supervises that many workers (:mod:`esans_service.workers`).
    """
    if settings.workers > 1:
        from esans_service.workers import run_workers

        run_workers(settings)
        return
    configure_logging(settings.log_level)
    limit_native_threads(settings.blas_threads)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    runtime = ServiceRuntime(settings)
    reload = threading.Event()

    def request_reload(signum: int, frame: FrameType | None) -> None:
        reload.set()

    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, request_reload)
    try:
        runtime.start()
        while not stop.wait(0.5):
            if reload.is_set():
                reload.clear()
                logger.info("received SIGHUP: re-reading the certificate and token files")
                runtime.reload_credentials()
            if not runtime.healthy:
                logger.error("the HTTP server stopped unexpectedly; shutting down")
                break
    finally:
        runtime.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
