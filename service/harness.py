"""Running the service outside production, one way for tests, benchmarks, the load test and
the evaluation: loopback settings on free ports, an in-process service with its own Redis,
and an ``esans serve`` subprocess with a readiness wait."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from esans_sampler.artifact import CodebookArtifact, artifact_to_files
from esans_sampler.client import SamplerClient
from esans_service.app import ServiceRuntime
from esans_service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def local_settings(
    redis_url: str | None = None, namespace: str = "esans", **overrides: Any
) -> Settings:
    """Settings for a service on 127.0.0.1 with gRPC and HTTP on free ports (read the bound
    ones from the runtime) and a short drain; ``overrides`` win."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "redis_namespace": namespace,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "shutdown_grace_s": 1.0,
    }
    return Settings(**(values | overrides))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (it may race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalService:
    """An in-process service (embedded Redis in a temporary directory unless ``redis_url``),
    started with ``with LocalService() as svc``; ``svc.publish(artifact)`` returns the
    version to pin, ``svc.client`` samples over gRPC."""

    def __init__(self, redis_url: str | None = None, **settings: Any) -> None:
        self._redis_url = redis_url
        self._settings = settings
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._runtime: ServiceRuntime | None = None
        self._client: SamplerClient | None = None

    def __enter__(self) -> Self:
        logging.getLogger("esans_service").setLevel(logging.WARNING)
        self._tmp = tempfile.TemporaryDirectory(prefix="esans-local-")
        defaults: dict[str, Any] = {
            "data_dir": Path(self._tmp.name) / "redis",
            "log_level": "WARNING",
        }
        settings = local_settings(self._redis_url, **(defaults | self._settings))
        try:
            self._runtime = ServiceRuntime(settings).start()
            self._client = SamplerClient(self.grpc_target, timeout_s=60.0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            self._client.close()
        if self._runtime is not None:
            self._runtime.stop(grace=0)
        if self._tmp is not None:
            self._tmp.cleanup()
        self._client = self._runtime = self._tmp = None

    @property
    def runtime(self) -> ServiceRuntime:
        if self._runtime is None:
            raise RuntimeError("the service is not started")
        return self._runtime

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.runtime.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime.http_port}"

    @property
    def client(self) -> SamplerClient:
        if self._client is None:
            raise RuntimeError("the service is not started")
        return self._client

    def publish(self, artifact: CodebookArtifact, activate: bool = True) -> str:
        """Store, verify and (by default) activate ``artifact``; return its version."""
        version = self.runtime.store.publish(artifact_to_files(artifact), activate=activate)
        self.runtime.registry.refresh()
        return version


def serve_process(
    redis_url: str | None,
    work: Path,
    log_path: Path,
    grpc_port: int,
    http_port: int,
    args: Sequence[str] = (),
    **settings: Any,
) -> subprocess.Popen[bytes]:
    """``esans serve [args]`` on 127.0.0.1 as a subprocess, output to ``log_path``, against
    ``redis_url`` (None: the embedded Redis, its data under ``work``); ``settings`` become
    ``ESANS_`` variables (e.g. ``max_concurrency=4``). The caller's own ``ESANS_`` variables
    are not inherited."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    values: dict[str, Any] = {
        "data_dir": work / "server-data",
        "grpc_host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "log_level": "WARNING",
        "shutdown_grace_s": 5,
        "workers": 1,  # one process unless a test asks for more
    }
    if redis_url is not None:
        values["redis_url"] = redis_url
    env |= {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in (values | settings).items()}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "esans_cli", "serve", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_until_serving(
    proc: subprocess.Popen[bytes], http_url: str, version: str | None, log_path: Path,
    timeout_s: float = 180.0,
) -> float:  # fmt: skip
    """Seconds until ``/readyz`` reports ``version`` served (None: any version); raises if
    the server dies."""
    import httpx

    start = time.monotonic()
    with httpx.Client(base_url=http_url, timeout=2.0) as client:
        while time.monotonic() - start < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"esans serve exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                reply = client.get("/readyz")
                served = reply.json().get("codebook_version") if reply.status_code == 200 else None
                if served is not None and version in (None, served):
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    what = "a codebook" if version is None else version[:16]
    raise RuntimeError(f"esans serve did not serve {what} in time:\n{_tail(log_path)}")


def stop_process(proc: subprocess.Popen[Any] | None, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; reaps the process. Idempotent."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
