"""A replica of several worker processes (``ESANS_WORKERS``), so it uses every core it has.

Python runs one core's worth of Python per process. ``esans serve`` with ``workers > 1`` is a
supervisor: it starts the embedded Redis (when no ``ESANS_REDIS_URL`` is set), binds the HTTP
socket and reserves the gRPC port, then forks the workers. Every worker is a whole
:class:`ServiceRuntime` on the same ports: HTTP connections are accepted from the one
inherited socket and gRPC binds the reserved port with SO_REUSEPORT (as in grpc's
multiprocessing example), so the kernel spreads connections over the workers. Each worker
follows the store by itself (same swap protocol, same pinning); ``/readyz`` answers for the
worker that takes the probe; ``/metrics`` merges every worker's counters (see
:mod:`esans_service.worker_metrics`). SIGTERM to the supervisor drains every worker; a worker
that dies is started again.

What limits a replica: each worker loads its own copy of the codebooks it serves (memory is
``workers x`` one worker's).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

from esans_service.app import (
    ServiceRuntime,
    WorkerSlot,
    _bind,
    configure_logging,
    limit_native_threads,
)
from esans_service.embedded_redis import EmbeddedRedis, running_embedded_url
from esans_service.errors import PortUnavailableError
from esans_service.settings import Settings

logger = logging.getLogger(__name__)

_RESTART_PAUSE_S = 1.0


@contextmanager
def _reserved_port(host: str, port: int) -> Iterator[int]:
    """Hold ``host:port`` (0 = a free one) with SO_REUSEPORT while the workers bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortUnavailableError(
                f"gRPC cannot listen on {host}:{port} ({exc.strerror or exc}); set "
                "ESANS_GRPC_PORT (esans serve --grpc-port) to a free port"
            ) from exc
        yield int(sock.getsockname()[1])


def _worker_main(settings: Settings, slot: WorkerSlot) -> None:
    """One worker: a whole runtime on the shared ports until SIGTERM, or until its
    supervisor is gone (killed with SIGKILL, say): a worker never outlives it holding the
    ports."""
    supervisor = os.getppid()
    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
    runtime = ServiceRuntime(settings, worker=slot)
    try:
        runtime.start()
        while not stop.wait(0.5):
            if reload.is_set():
                reload.clear()
                runtime.reload_credentials()
            if not runtime.healthy:
                logger.error("worker %d: the HTTP server stopped unexpectedly", slot.index)
                break
            if os.getppid() != supervisor:
                logger.error("worker %d: its supervisor is gone; draining", slot.index)
                break
    finally:
        runtime.stop()


def run_workers(settings: Settings) -> None:
    """Supervise ``settings.workers`` worker processes until SIGTERM or SIGINT."""
    configure_logging(settings.log_level)
    limit_native_threads(settings.blas_threads)
    embedded = None
    url = settings.redis_url or running_embedded_url(settings.data_dir)
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir, port=settings.embedded_redis_port).start()
        url = embedded.url
        logger.info(
            "no redis_url set: started an embedded Redis with data in %s", settings.data_dir
        )
    metrics_dir = Path(tempfile.mkdtemp(prefix="esans-workers-"))
    http_socket = _bind(settings.http_host, settings.http_port)
    # Listening from now on: connections that arrive while workers start (or restart) wait in
    # the backlog for a worker instead of being refused.
    http_socket.listen(2048)
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: draining %d workers", signal.Signals(signum).name, len(procs))
        stop.set()

    def forward_hup(signum: int, frame: FrameType | None) -> None:
        for proc in procs.values():
            if proc.pid is not None:
                _signal(proc.pid, signal.SIGHUP)

    procs: dict[int, Any] = {}
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, forward_hup)
    context = multiprocessing.get_context("fork")
    try:
        with _reserved_port(settings.grpc_host, settings.grpc_port) as grpc_port:
            worker_settings = settings.model_copy(
                update={
                    "redis_url": url,
                    "grpc_port": grpc_port,
                    "http_port": int(http_socket.getsockname()[1]),
                }
            )

            def start(index: int) -> None:
                slot = WorkerSlot(index, http_socket, metrics_dir)
                proc = context.Process(
                    target=_worker_main,
                    args=(worker_settings, slot),
                    name=f"esans-worker-{index}",
                )
                proc.start()
                procs[index] = proc

            for index in range(settings.workers):
                start(index)
            logger.info(
                "esans-sampler serving with %d workers: gRPC on %s:%d, HTTP on %s:%d; worker "
                "metrics in %s",
                settings.workers,
                settings.grpc_host,
                grpc_port,
                settings.http_host,
                worker_settings.http_port,
                metrics_dir,
            )
            while not stop.wait(0.5):
                for index, proc in list(procs.items()):
                    if not proc.is_alive() and not stop.is_set():
                        logger.error("worker %d exited with %s; starting it again", index,
                                     proc.exitcode)  # fmt: skip
                        time.sleep(_RESTART_PAUSE_S)
                        start(index)
            for proc in procs.values():
                if proc.pid is not None and proc.is_alive():
                    _signal(proc.pid, signal.SIGTERM)
            for proc in procs.values():
                proc.join(settings.shutdown_grace_s + 10.0)
                if proc.is_alive():
                    logger.warning("worker %s did not stop in time; killing it", proc.name)
                    proc.kill()
                    proc.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        http_socket.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if embedded is not None:
            embedded.stop()
    logger.info("stopped (%d workers)", len(procs))


def _signal(pid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)
