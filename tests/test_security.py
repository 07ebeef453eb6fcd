"""TLS, mutual TLS, certificate rotation, sampling tokens and limits against abuse, against
real servers with certificates the tests make themselves."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import build_random_artifact
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pki import Pki, certificate, make_pki, new_key, write_pem

from esans_sampler.artifact import artifact_to_files
from esans_sampler.client import HttpSamplerClient, SamplerClient, TlsConfig
from esans_sampler.errors import (
    EsansError,
    InvalidInputError,
    UnauthenticatedError,
    UnavailableError,
)
from esans_service.app import ServiceRuntime
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import free_port, local_settings, serve_process
from esans_service.security import SampleTokens
from esans_service.store import CodebookStore

ARTIFACT = build_random_artifact(seed=21, num_items=300, dim=4)
IDS = [int(i) for i in ARTIFACT.index.item_ids[:8]]
TRAINER_TOKEN = "trainer-token-0123456789abcdef"
OTHER_TOKEN = "second-token-fedcba9876543210"
ADMIN_TOKEN = "admin-token-0123456789abcdef!"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def namespace(redis_server: EmbeddedRedis) -> str:
    with redis_server.client() as client:
        CodebookStore(client, namespace="security").publish(artifact_to_files(ARTIFACT))
    return "security"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# trainers\ntrainer-a {TRAINER_TOKEN}\n\ntrainer-b {OTHER_TOKEN}\n")
    return path


@pytest.fixture
def serving(redis_server: EmbeddedRedis, namespace: str) -> Iterator[type[ServiceRuntime]]:
    started: list[ServiceRuntime] = []

    class Started(ServiceRuntime):
        def __init__(self, **settings: object) -> None:
            super().__init__(local_settings(redis_server.url, namespace, **settings))
            started.append(self)

    yield Started
    for runtime in started:
        runtime.stop(grace=0)


def _tls(pki: Pki, client: str | None = None, ca: str = "ca") -> TlsConfig:
    if client is None:
        return TlsConfig(ca_file=pki.path(f"{ca}.crt"))
    return TlsConfig(
        ca_file=pki.path(f"{ca}.crt"),
        cert_file=pki.path(f"{client}.crt"),
        key_file=pki.path(f"{client}.key"),
    )


def _tls_settings(pki: Pki, mutual: bool = False) -> dict[str, object]:
    settings: dict[str, object] = {
        "tls_cert_file": pki.path("server.crt"),
        "tls_key_file": pki.path("server.key"),
    }
    if mutual:
        settings["tls_client_ca_file"] = pki.path("ca.crt")
    return settings


# ----------------------------------------------------------------------------- TLS


def test_tls_serves_both_transports_and_plaintext_is_refused_cleanly(
    pki: Pki, serving: type[ServiceRuntime]
) -> None:
    runtime = serving(**_tls_settings(pki)).start()
    grpc_target = f"localhost:{runtime.grpc_port}"
    https = f"https://localhost:{runtime.http_port}"
    with SamplerClient(grpc_target, tls=_tls(pki)) as client:
        via_grpc = client.sample(IDS, seed=1)
    with HttpSamplerClient(https, tls=_tls(pki)) as client:
        via_http = client.sample(IDS, seed=1)
    np.testing.assert_array_equal(via_grpc.simple_ids, via_http.simple_ids)
    # Probes answer over TLS too.
    assert httpx.get(f"{https}/readyz", verify=_tls(pki).ssl_context()).status_code == 200

    # Plain text to a TLS port: a clean transport error on both, and the server lives on.
    with pytest.raises(UnavailableError), SamplerClient(grpc_target, retries=0) as plain:
        plain.sample(IDS, timeout_s=5)
    plain_http = f"http://localhost:{runtime.http_port}"
    with pytest.raises(UnavailableError), HttpSamplerClient(plain_http, retries=0) as plain_h:
        plain_h.sample(IDS, timeout_s=5)
    # A client that does not trust the server's CA refuses it.
    with (
        pytest.raises(UnavailableError),
        SamplerClient(grpc_target, retries=0, tls=_tls(pki, ca="rogue-ca")) as wrong_ca,
    ):
        wrong_ca.sample(IDS, timeout_s=5)
    with SamplerClient(grpc_target, tls=_tls(pki)) as client:
        assert client.sample(IDS, seed=1).codebook_version == ARTIFACT.version


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(
    pki: Pki, serving: type[ServiceRuntime]
) -> None:
    runtime = serving(**_tls_settings(pki, mutual=True)).start()
    grpc_target = f"localhost:{runtime.grpc_port}"
    https = f"https://localhost:{runtime.http_port}"
    with SamplerClient(grpc_target, tls=_tls(pki, "client")) as client:
        assert client.sample(IDS).simple_ids.shape[0] == len(IDS)
    with HttpSamplerClient(https, tls=_tls(pki, "client")) as client:
        assert client.sample(IDS).simple_ids.shape[0] == len(IDS)
    for tls in (_tls(pki), _tls(pki, "rogue-client")):  # no certificate; another CA's
        with (
            pytest.raises(UnavailableError),
            SamplerClient(grpc_target, retries=0, tls=tls) as client,
        ):
            client.sample(IDS, timeout_s=5)
        with (
            pytest.raises(UnavailableError),
            HttpSamplerClient(https, retries=0, tls=tls) as client,
        ):
            client.sample(IDS, timeout_s=5)


def test_locust_drives_a_mutual_tls_server_with_a_token(
    serving: type[ServiceRuntime], pki: Pki, tokens_file: Path, tmp_path: Path
) -> None:
    """The load test's TLS, client-certificate and token settings (``LOADTEST_CA``,
    ``LOADTEST_CERT``, ``LOADTEST_KEY``, ``LOADTEST_TOKEN``) reach both of its users."""
    runtime = serving(**_tls_settings(pki, mutual=True), sample_tokens_file=tokens_file).start()
    ids = tmp_path / "ids.npy"
    np.save(ids, ARTIFACT.index.item_ids)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ESANS_")} | {
        "LOADTEST_GRPC": f"localhost:{runtime.grpc_port}",
        "LOADTEST_HTTP": f"https://localhost:{runtime.http_port}",
        "LOADTEST_IDS": str(ids),
        "LOADTEST_BATCH": "8",
        "LOADTEST_CA": str(pki.path("ca.crt")),
        "LOADTEST_CERT": str(pki.path("client.crt")),
        "LOADTEST_KEY": str(pki.path("client.key")),
        "LOADTEST_TOKEN": TRAINER_TOKEN,
    }
    prefix = tmp_path / "locust"
    locustfile = Path(__file__).resolve().parent.parent / "loadtest" / "locustfile.py"
    done = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", "2",
            "-r", "2", "-t", "4s", "--stop-timeout", "5", "--csv", str(prefix),
            "--only-summary", "--loglevel", "WARNING",
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    with (tmp_path / "locust_stats.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["Name"] != "Aggregated"]
    failures = (tmp_path / "locust_failures.csv").read_text()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + failures
    calls = {
        kind: sum(int(r["Request Count"]) for r in rows if r["Type"] == kind)
        for kind in ("grpc", "POST")
    }
    assert all(calls.values()), rows
    assert sum(int(r["Failure Count"]) for r in rows) == 0, failures
    # Every call was authenticated as the token's trainer (locust counts calls that finished).
    for transport, kind in (("grpc", "grpc"), ("http", "POST")):
        trainer = {"trainer": "trainer-a", "transport": transport}
        assert _metric(runtime, "esans_trainer_requests_total", **trainer) >= calls[kind]


def _servedcertificate(port: int, pki: Pki) -> str:
    context = ssl.create_default_context(cafile=pki.path("ca.crt"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def _rotate(pki: Pki, tmp_path: Path, live_cert: Path, live_key: Path, subject: str) -> None:
    """Write a new server certificate of the same CA, as cert-manager does: key and
    certificate replaced in place."""
    ca_pem = pki.path("ca.crt").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(
        (pki.root / "ca-key.pem").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = new_key()
    cert = certificate(subject, key, (ca_cert, ca_key), server=True)
    staging = tmp_path / "staging"
    write_pem(staging, cert, key)
    live_key.write_bytes(staging.with_suffix(".key").read_bytes())
    live_cert.write_bytes(staging.with_suffix(".crt").read_bytes())


def _rotating_pki(tmp_path: Path, subject: str) -> tuple[Pki, Path, Path]:
    """A CA whose key stays at hand, and a live server certificate (``subject``) of it."""
    ca_key = new_key()
    pki = Pki(tmp_path / "pki")
    pki.root.mkdir()
    write_pem(pki.root / "ca", certificate("esans test CA", ca_key, None), None)
    (pki.root / "ca-key.pem").write_bytes(
        ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    live_cert, live_key = pki.root / "live.crt", pki.root / "live.key"
    _rotate(pki, tmp_path, live_cert, live_key, subject)
    return pki, live_cert, live_key


def test_rotated_certificates_are_served_without_a_restart(
    tmp_path: Path, serving: type[ServiceRuntime]
) -> None:
    pki, live_cert, live_key = _rotating_pki(tmp_path, "first")
    runtime = serving(
        tls_cert_file=live_cert, tls_key_file=live_key, tls_reload_interval_s=0.2
    ).start()
    assert _servedcertificate(runtime.http_port, pki) == "CN=first"
    assert _servedcertificate(runtime.grpc_port, pki) == "CN=first"

    _rotate(pki, tmp_path, live_cert, live_key, "second")
    deadline = time.monotonic() + 20
    while _servedcertificate(runtime.http_port, pki) != "CN=second":
        assert time.monotonic() < deadline, "HTTP kept the old certificate"
        time.sleep(0.1)
    while _servedcertificate(runtime.grpc_port, pki) != "CN=second":
        assert time.monotonic() < deadline, "gRPC kept the old certificate"
        time.sleep(0.1)
    with SamplerClient(f"localhost:{runtime.grpc_port}", tls=_tls(pki)) as client:
        assert client.sample(IDS).codebook_version == ARTIFACT.version

    # A broken file (half a rotation) is refused; the last good certificate stays served.
    live_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    time.sleep(1.0)
    assert _servedcertificate(runtime.http_port, pki) == "CN=second"
    assert _servedcertificate(runtime.grpc_port, pki) == "CN=second"


def test_sighup_reloads_the_certificate_of_esans_serve(
    tmp_path: Path, redis_server: EmbeddedRedis, namespace: str
) -> None:
    pki, live_cert, live_key = _rotating_pki(tmp_path, "before-hup")
    log = tmp_path / "serve.log"
    grpc_port, http_port = free_port(), free_port()
    proc = serve_process(
        redis_server.url, tmp_path, log, grpc_port, http_port,
        redis_namespace=namespace, tls_cert_file=live_cert, tls_key_file=live_key,
        tls_reload_interval_s=3600, log_level="INFO",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if _servedcertificate(http_port, pki) == "CN=before-hup":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        _rotate(pki, tmp_path, live_cert, live_key, "after-hup")
        time.sleep(0.3)
        assert _servedcertificate(http_port, pki) == "CN=before-hup"  # no poll for an hour
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while _servedcertificate(http_port, pki) != "CN=after-hup":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert _servedcertificate(grpc_port, pki) == "CN=after-hup"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "BEGIN" not in text and "PRIVATE" not in text


def test_tls_settings_are_checked_at_start(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        local_settings(tls_cert_file=pki.path("server.crt"))
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        local_settings(tls_client_ca_file=pki.path("ca.crt"))
    mismatched = local_settings(
        tls_cert_file=pki.path("server.crt"), tls_key_file=pki.path("client.key")
    )
    with pytest.raises(InvalidInputError, match="not a certificate and its key"):
        ServiceRuntime(mismatched).start()


# ----------------------------------------------------------------------------- tokens


def _metric(runtime: ServiceRuntime, name: str, **labels: str) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def test_sampling_tokens_on_both_transports(
    serving: type[ServiceRuntime], tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = serving(sample_tokens_file=tokens_file, admin_token=ADMIN_TOKEN).start()
    grpc_target = f"127.0.0.1:{runtime.grpc_port}"
    http_url = f"http://127.0.0.1:{runtime.http_port}"
    with SamplerClient(grpc_target, token=TRAINER_TOKEN) as client:
        assert client.sample(IDS).codebook_version == ARTIFACT.version
        assert client.codebook_info()["version"] == ARTIFACT.version
    with HttpSamplerClient(http_url, token=OTHER_TOKEN) as client:
        assert client.sample(IDS).codebook_version == ARTIFACT.version
    assert _metric(runtime, "esans_trainer_requests_total", trainer="trainer-a",
                   transport="grpc") == 2  # fmt: skip
    assert _metric(runtime, "esans_trainer_requests_total", trainer="trainer-b",
                   transport="http") == 1  # fmt: skip

    wrong = "x" * 32
    with caplog.at_level(logging.INFO):
        for token in (None, wrong, ADMIN_TOKEN):  # the admin token never grants sampling
            with (
                pytest.raises(UnauthenticatedError),
                SamplerClient(grpc_target, retries=0, token=token) as client,
            ):
                client.sample(IDS)
            with (
                pytest.raises(UnauthenticatedError),
                HttpSamplerClient(http_url, retries=0, token=token) as client,
            ):
                client.sample(IDS)
            with (
                pytest.raises(UnauthenticatedError),
                HttpSamplerClient(http_url, retries=0, token=token) as client,
            ):
                client.codebook_info()
    assert _metric(runtime, "esans_unauthenticated_requests_total", transport="grpc") == 3
    assert _metric(runtime, "esans_unauthenticated_requests_total", transport="http") == 6
    # A 401 with the envelope, and nothing of any token in errors or logs.
    reply = httpx.post(f"{http_url}/v1/sample", json={"positive_ids": IDS},
                       headers={"authorization": f"Bearer {wrong}"})  # fmt: skip
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "UNAUTHENTICATED"
    assert wrong not in reply.text
    for secret in (TRAINER_TOKEN, OTHER_TOKEN, ADMIN_TOKEN, wrong):
        assert secret not in caplog.text
    # Probes and metrics stay open for the kubelet and Prometheus.
    assert httpx.get(f"{http_url}/readyz").status_code == 200
    assert httpx.get(f"{http_url}/metrics").status_code == 200

    # A sampling token does not open the admin API either.
    admin = httpx.get(f"{http_url}/admin/versions",
                      headers={"authorization": f"Bearer {TRAINER_TOKEN}"})  # fmt: skip
    assert admin.status_code == 401
    ok = httpx.get(f"{http_url}/admin/versions", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200


def test_token_file_changes_take_effect_without_restart(
    serving: type[ServiceRuntime], tokens_file: Path
) -> None:
    runtime = serving(sample_tokens_file=tokens_file, tls_reload_interval_s=0.2).start()
    target = f"127.0.0.1:{runtime.grpc_port}"
    new_token = "rotated-token-00112233445566"
    os.utime(tokens_file, ns=(0, 0))
    tokens_file.write_text(f"trainer-c {new_token}\n")
    deadline = time.monotonic() + 20
    while True:
        try:
            with SamplerClient(target, retries=0, token=new_token) as client:
                client.sample(IDS)
            break
        except UnauthenticatedError:
            assert time.monotonic() < deadline, "the new token was never accepted"
            time.sleep(0.1)
    with (
        pytest.raises(UnauthenticatedError),
        SamplerClient(target, retries=0, token=TRAINER_TOKEN) as client,
    ):
        client.sample(IDS)


def test_an_unreadable_token_file_on_sighup_keeps_the_old_tokens(
    serving: type[ServiceRuntime], tokens_file: Path
) -> None:
    runtime = serving(sample_tokens_file=tokens_file, tls_reload_interval_s=3600).start()
    tokens_file.write_bytes(b"\xff\xfe not utf-8 \x00")
    runtime.reload_credentials()  # what SIGHUP does: logged, not raised
    with SamplerClient(f"127.0.0.1:{runtime.grpc_port}", token=TRAINER_TOKEN) as client:
        assert client.sample(IDS).codebook_version == ARTIFACT.version


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("just-one-field\n", "expected 'NAME TOKEN'"),
        ("a tiny-tok\n", "shorter than 16"),
        (f"a {TRAINER_TOKEN}\nb {TRAINER_TOKEN}\n", "repeated"),
        (f"a {ADMIN_TOKEN}\n", "is the admin token"),
        ("# nothing\n", "holds no 'NAME TOKEN' line"),
    ],
)
def test_bad_token_files_fail_with_the_line_and_never_the_token(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message) as caught:
        SampleTokens(path, admin_token=ADMIN_TOKEN)
    for secret in (TRAINER_TOKEN, ADMIN_TOKEN, "tiny-tok"):
        assert secret not in str(caught.value)


def test_admin_and_sampling_stay_separate_without_tokens(serving: type[ServiceRuntime]) -> None:
    runtime = serving().start()  # no tokens: sampling open, admin disabled
    with SamplerClient(f"127.0.0.1:{runtime.grpc_port}") as client:
        client.sample(IDS)
    reply = httpx.get(f"http://127.0.0.1:{runtime.http_port}/admin/versions",
                      headers={"authorization": f"Bearer {TRAINER_TOKEN}"})  # fmt: skip
    assert reply.status_code == 403


# ----------------------------------------------------------------------------- limits


def test_oversized_bodies_are_refused_before_parsing(serving: type[ServiceRuntime]) -> None:
    runtime = serving(max_request_bytes=4096).start()
    url = f"http://127.0.0.1:{runtime.http_port}/v1/sample"
    big = {"positive_ids": IDS * 1000}
    reply = httpx.post(url, json=big)
    assert reply.status_code == 413
    assert "ESANS_MAX_REQUEST_BYTES=4096" in reply.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no content-length: counted as it arrives
        yield b'{"positive_ids": ['
        for _ in range(2000):
            yield b"1234567, "
        yield b"1]}"

    reply = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert httpx.post(url, json={"positive_ids": IDS}).status_code == 200


def test_slow_loris_connections_are_closed_and_others_are_served(
    serving: type[ServiceRuntime],
) -> None:
    runtime = serving(http_header_timeout_s=1.0).start()
    port = runtime.http_port
    slow = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        slow.append(sock)
    try:
        # Others are served meanwhile.
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        time.sleep(1.5)
        for sock in slow:
            sock.sendall(b"X-Trickle: 1\r\n")  # one more header line, still incomplete
        for sock in slow:
            sock.settimeout(10)
            assert sock.recv(1024) == b"", "a slow-loris connection was kept open"
    finally:
        for sock in slow:
            sock.close()
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_pipelined_requests_are_all_answered_under_the_header_deadline(
    serving: type[ServiceRuntime],
) -> None:
    # The second request is already received when the first response completes, and takes
    # longer than the header deadline to answer: it must not be mistaken for a slow client.
    runtime = serving(http_header_timeout_s=0.2).start()
    big = json.dumps(
        {"positive_ids": np.resize(np.array(IDS), 4096).tolist(), "return_embeddings": True}
    ).encode()
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = (
        b"POST /v1/sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(big)}\r\nConnection: close\r\n\r\n".encode()
        + big
    )
    with socket.create_connection(("127.0.0.1", runtime.http_port), timeout=30) as sock:
        sock.sendall(first + second)
        received = b""
        while chunk := sock.recv(1 << 20):
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 2, received[:300]


def test_grpc_calls_per_connection_are_capped(serving: type[ServiceRuntime]) -> None:
    runtime = serving(grpc_max_streams_per_connection=1).start()
    target = f"127.0.0.1:{runtime.grpc_port}"
    gauge = runtime.metrics.in_flight.labels(transport="grpc")
    seen: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(gauge._value.get())
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    heavy = [int(i) for i in ARTIFACT.index.item_ids[:256]]
    # Six calls at once on one channel: they queue on the connection, none fails, and the
    # server never runs more than one of them at a time.
    try:
        with SamplerClient(target) as client:
            replies = list(client.prefetch([heavy] * 24, depth=6, return_embeddings=True))
    finally:
        done.set()
        watcher.join()
    assert len(replies) == 24 and seen
    assert max(seen) <= 1
    with SamplerClient(target) as client:
        assert client.sample(IDS).codebook_version == ARTIFACT.version


def _h2_frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, 0]) + struct.pack(">I", 0) + payload


def _goaway_after_pings(port: int, pings: int, pause_s: float) -> tuple[int, bytes] | None:
    """Speak raw HTTP/2 to the gRPC port, send ``pings`` PINGs with no call, and return the
    (error code, debug data) of the server's GOAWAY, or None if it sent none."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4))  # preface, SETTINGS
        for i in range(pings):
            try:
                sock.sendall(_h2_frame(6, struct.pack(">Q", i)))  # PING
            except OSError:
                break  # the server hung up: its GOAWAY is in the receive buffer
            time.sleep(pause_s)
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    at = 0
    while at + 9 <= len(received):
        length, kind = int.from_bytes(received[at : at + 3], "big"), received[at + 3]
        payload = received[at + 9 : at + 9 + length]
        if kind == 7:  # GOAWAY: last stream id, error code, debug data
            return int.from_bytes(payload[4:8], "big"), payload[8:]
        at += 9 + length
    return None


def test_grpc_ping_floods_get_goaway(serving: type[ServiceRuntime]) -> None:
    strict = serving().start()  # ESANS_GRPC_MIN_PING_INTERVAL_S = 10 by default
    # Two pings too early are tolerated (the strikes); a flood gets ENHANCE_YOUR_CALM.
    assert _goaway_after_pings(strict.grpc_port, 2, 0.05) is None
    assert _goaway_after_pings(strict.grpc_port, 10, 0.05) == (11, b"too_many_pings")
    with SamplerClient(f"127.0.0.1:{strict.grpc_port}") as client:  # others still served
        assert client.sample(IDS).codebook_version == ARTIFACT.version


def test_errors_never_echo_credentials(serving: type[ServiceRuntime], tokens_file: Path) -> None:
    runtime = serving(sample_tokens_file=tokens_file).start()
    secret = "leaky-token-000000000000000000"
    with (
        pytest.raises(EsansError) as caught,
        SamplerClient(f"127.0.0.1:{runtime.grpc_port}", retries=0, token=secret) as client,
    ):
        client.sample(IDS)
    assert secret not in str(caught.value)


@pytest.mark.parametrize("mode", ["plain", "tls", "mtls"])
def test_container_healthcheck_speaks_the_replicas_transport(
    pki: Pki, serving: type[ServiceRuntime], mode: str
) -> None:
    settings = {} if mode == "plain" else _tls_settings(pki, mutual=mode == "mtls")
    runtime = serving(**settings).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESANS_")}
    env["ESANS_HTTP_PORT"] = str(runtime.http_port)
    env |= {f"ESANS_{k.upper()}": str(v) for k, v in settings.items()}
    check = [sys.executable, "-m", "esans_service.healthcheck"]
    assert subprocess.run(check, env=env, timeout=30, check=False).returncode == 0
    env["ESANS_HTTP_PORT"] = str(free_port())  # nothing there
    assert (
        subprocess.run(check, env=env, timeout=30, check=False, capture_output=True).returncode == 1
    )
