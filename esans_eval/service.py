"""The running sampler service the evaluation trains against: an in-process
:class:`~service.app.ServiceRuntime` (embedded Redis in a temporary directory, gRPC and HTTP
on free ports) and a gRPC :class:`~esans_sampler.client.SamplerClient` to it."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from esans_sampler.artifact import CodebookArtifact, artifact_to_files
from esans_sampler.client import SamplerClient
from service.app import ServiceRuntime
from service.settings import Settings


class LocalSamplerService:
    """Start with ``with LocalSamplerService() as svc``; ``svc.publish(artifact)`` returns the
    version to pin, ``svc.client`` samples over gRPC."""

    def __init__(self, max_batch: int = 4096) -> None:
        self._max_batch = max_batch
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._runtime: ServiceRuntime | None = None
        self._client: SamplerClient | None = None

    def __enter__(self) -> Self:
        logging.getLogger("service").setLevel(logging.WARNING)
        self._tmp = tempfile.TemporaryDirectory(prefix="esans-eval-")
        settings = Settings(
            data_dir=Path(self._tmp.name) / "redis",
            grpc_host="127.0.0.1",
            grpc_port=0,
            http_host="127.0.0.1",
            http_port=0,
            keep_versions=64,
            max_loaded_versions=16,
            max_batch=self._max_batch,
            shutdown_grace_s=0.5,
            log_level="WARNING",
        )
        try:
            self._runtime = ServiceRuntime(settings).start()
            self._client = SamplerClient(f"127.0.0.1:{self._runtime.grpc_port}", timeout_s=60.0)
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
    def client(self) -> SamplerClient:
        if self._client is None:
            raise RuntimeError("the service is not started")
        return self._client

    def publish(self, artifact: CodebookArtifact) -> str:
        """Store, verify and activate ``artifact``; return its version (for pinning)."""
        if self._runtime is None:
            raise RuntimeError("the service is not started")
        version = self._runtime.store.publish(artifact_to_files(artifact), activate=True)
        self._runtime.registry.refresh()
        return version
