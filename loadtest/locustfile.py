"""Locust load test of esans-sampler: trainer workers over gRPC (most traffic) and HTTP.

Every gRPC user is built on :class:`GrpcUser`, whose channel carries a
:class:`LocustInterceptor` that reports each call to locust (``environment.events.request``:
name, response time, response length, exception), as in locust's
``examples/grpc/grpc_user.py``. The task mix of a trainer worker:

* ``SampleNegatives ids`` (most calls): B random positive ids, ids only;
* ``SampleNegatives pinned``: the same, pinned to the version ``GetCodebookInfo`` reported
  when the user started (a training run stays on one version);
* ``SampleNegatives embeddings`` (rarer): with the snapshot's embeddings and EDIS vectors;
* ``GetCodebookInfo`` (occasionally).

Configuration (environment; ``loadtest/run.py`` sets all of them):

``LOADTEST_GRPC``   gRPC target, default ``127.0.0.1:50051``
``LOADTEST_HTTP``   HTTP base URL, default ``http://127.0.0.1:8000``
``LOADTEST_IDS``    an ``.npy`` of catalogue ids to draw positives from; default the
                  demo catalogue's ids 1000000..1019999
``LOADTEST_BATCH``  B, default 512
``LOADTEST_CA``     PEM CA of a TLS server: gRPC over TLS (use an ``https://`` HTTP URL)
``LOADTEST_CERT``, ``LOADTEST_KEY``  a client certificate and key, for mTLS servers
``LOADTEST_TOKEN``  a sampling token (``ESANS_SAMPLE_TOKENS_FILE`` on the server)

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 30s --only-summary

They deliberately lack the ``ESANS_`` prefix, which ``esans serve`` reserves for its own
settings (it refuses unknown ``ESANS_`` variables).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
import numpy.typing as npt
from locust import HttpUser, User, constant, task
from locust.env import Environment
from locust.exception import LocustError

from esans_sampler.client import TlsConfig, call_metadata, channel_credentials, channel_options
from esans_sampler.contract._proto.esans.v1 import sampler_pb2, sampler_pb2_grpc

# gRPC must cooperate with locust's gevent loop; this has to run before any channel exists.
grpc_gevent.init_gevent()

DEMO_FIRST_ID = 1_000_000
DEMO_NUM_ITEMS = 20_000
# Call metadata key naming the call in locust's statistics (removed before sending).
NAME_KEY = "x-locust-name"
M_C, M_O, M_H = 2, 5, 5
CALL_TIMEOUT_S = 30.0


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def load_ids() -> npt.NDArray[np.int64]:
    """(N,) int64 catalogue ids: ``LOADTEST_IDS`` (.npy) or the demo range."""
    path = os.environ.get("LOADTEST_IDS")
    if not path:
        return np.arange(DEMO_FIRST_ID, DEMO_FIRST_ID + DEMO_NUM_ITEMS, dtype=np.int64)
    ids = np.load(path, allow_pickle=False, mmap_mode="r")
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise LocustError(f"{path} must hold a non-empty (N,) integer array, got {ids.shape}")
    return np.asarray(ids, dtype=np.int64)


CATALOGUE_IDS = load_ids()
BATCH = int(_env("LOADTEST_BATCH", "512"))
_CA, _CERT, _KEY = _env("LOADTEST_CA", ""), _env("LOADTEST_CERT", ""), _env("LOADTEST_KEY", "")
TLS = TlsConfig(ca_file=_CA, cert_file=_CERT or None, key_file=_KEY or None) if _CA else None
TOKEN = _env("LOADTEST_TOKEN", "") or None
TOKEN_METADATA = call_metadata(TOKEN) or ()


class _CallDetails(NamedTuple):
    """A ``grpc.ClientCallDetails`` with replaced metadata (its fields, in order)."""

    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _Details(_CallDetails, grpc.ClientCallDetails):  # type: ignore[misc]
    pass


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Reports every unary call to locust; the stat name is the call's ``x-locust-name``
    metadata (or the method's name), and the response length its serialised size."""

    def __init__(self, environment: Environment) -> None:
        self.env = environment

    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], call_details: Any, request: Any
    ) -> Any:
        name = call_details.method.rsplit("/", 1)[-1]
        metadata = []
        for key, value in call_details.metadata or ():
            if key == NAME_KEY:
                name = value
            else:
                metadata.append((key, value))
        details = _Details(
            call_details.method,
            call_details.timeout,
            metadata or None,
            call_details.credentials,
            call_details.wait_for_ready,
            call_details.compression,
        )
        start = time.perf_counter()
        outcome = continuation(details, request)
        exception = outcome.exception()  # waits (cooperatively) for the call to end
        response_length = 0 if exception is not None else outcome.result().ByteSize()
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=response_length,
            response=None if exception is not None else outcome.result(),
            context=None,
            exception=exception,
        )
        return outcome


class GrpcUser(User):
    """A user with a gRPC ``stub`` (``stub_class`` over an intercepted channel to ``host``).

    Failed calls are already reported by the interceptor; :meth:`call` swallows them so
    the user keeps going.
    """

    abstract = True
    stub_class: Any = None

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if self.host is None or self.stub_class is None:
            raise LocustError("a GrpcUser needs host and stub_class")
        options = channel_options(1 << 30, TLS)
        if TLS is None:
            self._channel = grpc.insecure_channel(self.host, options=options)
        else:
            credentials = channel_credentials(TLS)
            self._channel = grpc.secure_channel(self.host, credentials, options=options)
        channel = grpc.intercept_channel(self._channel, LocustInterceptor(environment))
        self.stub = self.stub_class(channel)

    def call(self, method: str, request: Any, name: str) -> Any | None:
        """``stub.method(request)`` reported as ``name``; None if the call failed."""
        try:
            return getattr(self.stub, method)(
                request, timeout=CALL_TIMEOUT_S, metadata=((NAME_KEY, name), *TOKEN_METADATA)
            )
        except grpc.RpcError:
            return None

    def on_stop(self) -> None:
        self._channel.close()


def _positives(rng: np.random.Generator) -> list[int]:
    ids: list[int] = rng.choice(CATALOGUE_IDS, BATCH).tolist()
    return ids


class SamplerGrpcUser(GrpcUser):
    """A trainer worker calling ``esans.v1.NegativeSampler`` back to back."""

    host = _env("LOADTEST_GRPC", "127.0.0.1:50051")
    stub_class = sampler_pb2_grpc.NegativeSamplerStub
    wait_time = constant(0)
    weight = 3

    def on_start(self) -> None:
        self.rng = np.random.default_rng()
        self.version = ""
        self.has_embeddings = False
        info = self.call("GetCodebookInfo", sampler_pb2.GetCodebookInfoRequest(), "GetCodebookInfo")
        if info is not None:
            self.version = info.version
            self.has_embeddings = info.embedding_dim > 0

    def _sample(self, name: str, **fields: Any) -> None:
        request = sampler_pb2.SampleNegativesRequest(
            positive_ids=_positives(self.rng), m_c=M_C, m_o=M_O, m_h=M_H, **fields
        )
        self.call("SampleNegatives", request, name)

    @task(12)
    def sample_ids(self) -> None:
        self._sample("SampleNegatives ids")

    @task(4)
    def sample_pinned(self) -> None:
        self._sample("SampleNegatives pinned", codebook_version=self.version)

    @task(1)
    def sample_embeddings(self) -> None:
        if self.has_embeddings:
            self._sample("SampleNegatives embeddings", return_embeddings=True)

    @task(1)
    def codebook_info(self) -> None:
        self.call("GetCodebookInfo", sampler_pb2.GetCodebookInfoRequest(), "GetCodebookInfo")


class SamplerHttpUser(HttpUser):
    """A trainer worker using the HTTP/JSON twin (``POST /v1/sample``)."""

    host = _env("LOADTEST_HTTP", "http://127.0.0.1:8000")
    wait_time = constant(0)
    weight = 1

    def on_start(self) -> None:
        self.rng = np.random.default_rng()
        if TLS is not None:
            self.client.verify = str(TLS.ca_file)
            if TLS.cert_file is not None:
                self.client.cert = (str(TLS.cert_file), str(TLS.key_file))
        if TOKEN is not None:
            self.client.headers["authorization"] = f"Bearer {TOKEN}"

    @task(8)
    def sample_ids(self) -> None:
        body = {"positive_ids": _positives(self.rng), "m_c": M_C, "m_o": M_O, "m_h": M_H}
        self.client.post("/v1/sample", json=body, name="/v1/sample ids", timeout=CALL_TIMEOUT_S)

    @task(1)
    def codebook_info(self) -> None:
        self.client.get("/v1/codebook", name="/v1/codebook", timeout=CALL_TIMEOUT_S)
