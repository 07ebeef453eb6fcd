"""A replica of several worker processes (``ESANS_WORKERS``): both ports shared, calls spread
over the workers, one merged /metrics, version swaps reaching every worker, SIGTERM draining
all of them."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import build_random_artifact
from prometheus_client.parser import text_string_to_metric_families

from esans_sampler.artifact import artifact_to_files
from esans_sampler.client import HttpSamplerClient, SamplerClient
from esans_sampler.errors import ResourceExhaustedError, UnavailableError
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import free_port, serve_process, stop_process, wait_until_serving
from esans_service.store import CodebookStore

# The same ids in both versions, so a call is valid whichever version a worker serves.
FIRST = build_random_artifact(seed=51, num_items=3000, dim=16, first_id=10**6)
SECOND = build_random_artifact(seed=52, num_items=3000, dim=16, first_id=10**6)
IDS = FIRST.index.item_ids[:64]


def _requests(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "esans_requests"
        for sample in family.samples
        if sample.name == "esans_requests_total" and sample.labels["method"] != "/metrics"
        and sample.labels["method"] != "/readyz"
    )  # fmt: skip


def _parent(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


Replica = tuple[subprocess.Popen[bytes], str, str, Path]


@contextmanager
def two_workers(redis_server: EmbeddedRedis, tmp_path: Path, **settings: Any) -> Iterator[Replica]:
    """A serving replica of two workers on FIRST (its own namespace): the supervisor, the
    gRPC target, the HTTP URL and the log; stopped with SIGTERM afterwards."""
    namespace = f"workers-{tmp_path.name}"
    with redis_server.client() as client:
        version = CodebookStore(client, namespace=namespace).publish(artifact_to_files(FIRST))
    log = tmp_path / "serve.log"
    grpc_port, http_port = free_port(), free_port()
    proc = serve_process(
        redis_server.url, tmp_path, log, grpc_port, http_port,
        workers=2, redis_namespace=namespace, log_level="INFO", **settings,
    )  # fmt: skip
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{http_port}", version, log, timeout_s=120)
        yield proc, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", log
    finally:
        stop_process(proc)


@pytest.fixture
def replica(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Replica]:
    with two_workers(redis_server, tmp_path, shutdown_grace_s=10) as running:
        yield running


def _workers_of(pid: int) -> list[int]:
    return [
        int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if _parent(stat) == pid
    ]


def test_workers_stop_when_their_supervisor_is_killed(
    replica: Replica,
) -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers: they notice and exit
    rather than hold the ports for good."""
    proc, _, _, log = replica
    workers = _workers_of(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    assert log.read_text().count("its supervisor is gone") == 2


def test_two_workers_share_the_ports_and_one_metrics_endpoint(
    replica: Replica,
) -> None:
    proc, target, url, log = replica
    calls = 0
    deadline = time.monotonic() + 60
    # Until both workers are up and have served (each new channel is a new connection).
    while True:
        for _ in range(10):
            with SamplerClient(target) as client:
                assert client.sample(IDS).simple_ids.shape[0] == len(IDS)
            with HttpSamplerClient(url) as client:
                assert client.sample(IDS).simple_ids.shape[0] == len(IDS)
            calls += 2
        match = re.search(r"worker metrics in (\S+)", log.read_text())
        assert match, log.read_text()[-2000:]
        files = sorted(Path(match.group(1)).glob("worker-*.prom"))
        time.sleep(1.2)  # workers write their counters every second
        served = [_requests(path.read_text()) for path in files]
        if len(served) == 2 and all(count > 0 for count in served):
            break
        assert time.monotonic() < deadline, f"calls did not reach both workers: {served}"
    # Both workers map the one copy of the embedding snapshot the first of them wrote.
    snapshot = Path(match.group(1)) / f"{FIRST.version}.npy"
    assert snapshot.is_file()
    workers = _workers_of(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        assert str(snapshot) in Path(f"/proc/{pid}/maps").read_text()
    merged = httpx.get(f"{url}/metrics").text
    assert 'esans_worker_up{worker="0"} 1.0' in merged
    assert 'esans_worker_up{worker="1"} 1.0' in merged
    assert _requests(merged) == pytest.approx(sum(served))
    assert _requests(merged) >= calls


def test_a_publish_reaches_every_worker_and_sigterm_drains_them_all(
    replica: Replica, redis_server: EmbeddedRedis
) -> None:
    proc, target, _url, log = replica
    ids = SECOND.index.item_ids[:64]
    old = FIRST.version
    # Clients keep calling, on new connections (either worker), while the version changes:
    # no call fails and every answer comes whole from one of the two versions.
    seen: list[str] = []
    failures: list[BaseException] = []
    stop_load = threading.Event()

    def load() -> None:
        while not stop_load.is_set():
            try:
                with SamplerClient(target, retries=0) as client:
                    seen.append(client.sample(ids).codebook_version)
            except Exception as exc:  # every failure is reported below
                failures.append(exc)

    loaders = [threading.Thread(target=load) for _ in range(3)]
    for thread in loaders:
        thread.start()
    time.sleep(0.5)
    with redis_server.client() as client:  # the replica fixture's namespace
        store = CodebookStore(client, namespace=f"workers-{log.parent.name}")
        new = store.publish(artifact_to_files(SECOND))
    deadline = time.monotonic() + 30
    while True:  # fresh connections land on either worker: all must serve the new version
        versions = set()
        for _ in range(12):
            with SamplerClient(target, retries=0) as client:
                versions.add(client.sample(ids).codebook_version)
        if versions == {new}:
            break
        assert time.monotonic() < deadline, f"workers still serve {versions - {new}}"
        time.sleep(0.2)
    time.sleep(0.5)
    stop_load.set()
    for thread in loaders:
        thread.join(30)
    assert not failures, failures[:3]
    assert set(seen) == {old, new} and seen[-1] == new

    # SIGTERM while heavy calls run on both workers: a call either completes or is refused
    # cleanly as UNAVAILABLE before it starts; none is cut off; then every worker stops with
    # nothing left in flight and the supervisor exits 0.
    outcomes: list[str] = []
    big = np.resize(ids, 2048)
    signalled = threading.Event()

    def heavy() -> None:
        while True:
            try:
                with SamplerClient(target, retries=0) as client:
                    reply = client.sample(big, return_embeddings=True, timeout_s=30)
                assert reply.embeddings is not None and reply.embeddings.simple.shape[0] == 2048
                outcomes.append("ok")
            except (UnavailableError, ResourceExhaustedError):  # draining, or a busy worker
                outcomes.append("refused")
            if signalled.is_set():
                return

    threads = [threading.Thread(target=heavy) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    signalled.set()
    for thread in threads:
        thread.join(60)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert set(outcomes) <= {"ok", "refused"} and outcomes.count("ok") >= 4, outcomes
    text = log.read_text()
    assert text.count("stopped (0 requests still in flight)") == 2, text[-3000:]
    assert "stopped (2 workers)" in text


def _stale(url: str) -> float:
    """The merged esans_codebook_stale: 1 while any worker serves its last good snapshot."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r"^esans_codebook_stale (\S+)$", text, flags=re.MULTILINE)
    assert match, text[:500]
    return float(match.group(1))


def test_every_worker_serves_through_a_redis_outage_and_recovers(tmp_path: Path) -> None:
    redis = EmbeddedRedis(tmp_path / "redis").start()
    log = tmp_path / "serve.log"
    proc = None
    try:
        with redis.client() as client:
            version = CodebookStore(client).publish(artifact_to_files(FIRST))
        grpc_port, http_port = free_port(), free_port()
        proc = serve_process(
            redis.url, tmp_path, log, grpc_port, http_port,
            workers=2, poll_interval_s=0.3, log_level="INFO",
        )  # fmt: skip
        url, target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        wait_until_serving(proc, url, version, log, timeout_s=120)

        def calls_succeed() -> None:
            for _ in range(12):  # fresh connections: both workers answer
                with SamplerClient(target, retries=0) as client:
                    assert client.sample(IDS).codebook_version == version

        calls_succeed()
        redis.stop()
        deadline = time.monotonic() + 30
        while _stale(url) != 1.0:
            assert time.monotonic() < deadline, "no worker reported the outage"
            time.sleep(0.2)
        calls_succeed()  # the last good codebook, on every worker
        redis.start()  # same port, data kept
        deadline = time.monotonic() + 30
        while _stale(url) != 0.0:  # the merged gauge is the largest: every worker recovered
            assert time.monotonic() < deadline, "a worker stayed stale after Redis came back"
            time.sleep(0.2)
        calls_succeed()
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        redis.stop()


def _metric(url: str, name: str, **labels: str) -> float:
    """The sum over the merged /metrics of the samples ``name`` whose labels include
    ``labels``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )
    )


def test_overload_on_two_workers_is_refused_cleanly_and_counted(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """Each worker admits max_concurrency = 1 call; clients of both transports overload the
    replica. Every call succeeds or is refused (RESOURCE_EXHAUSTED / 429), the merged metrics
    count exactly the admitted calls as served and the clients' HTTP refusals as 429, and the
    replica is still ready afterwards."""
    heavy = np.resize(IDS, 4096)
    outcomes: dict[str, list[str]] = {"grpc": [], "http": []}
    other: list[str] = []
    with two_workers(redis_server, tmp_path, max_concurrency=1) as (proc, target, url, log):
        barrier = threading.Barrier(8)

        def drive(transport: str) -> None:
            client: SamplerClient | HttpSamplerClient
            if transport == "grpc":
                client = SamplerClient(target, retries=0)
                fields = {"m_c": 8, "m_o": 16, "m_h": 16}
            else:
                client = HttpSamplerClient(url, retries=0)
                fields = {}
            with client:
                barrier.wait(60)
                for _ in range(12):
                    try:
                        batch = heavy if transport == "grpc" else heavy[:256]
                        client.sample(batch, timeout_s=30, **fields)
                        outcomes[transport].append("ok")
                    except ResourceExhaustedError:
                        outcomes[transport].append("refused")
                    except Exception as exc:  # every other failure is reported below
                        other.append(f"{transport} {type(exc).__name__}: {exc}")

        threads = [
            threading.Thread(target=drive, args=("http" if i % 4 == 3 else "grpc",))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads)
        assert not other, other[:3]
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        refused = sum(o.count("refused") for o in outcomes.values())
        assert refused, "the load never exceeded max_concurrency"
        ok = {t: float(o.count("ok")) for t, o in outcomes.items()}
        deadline = time.monotonic() + 30
        while True:  # the other workers' figures reach the merged /metrics within seconds
            served = {
                "grpc": _metric(
                    url, "esans_requests_total", transport="grpc", method="SampleNegatives",
                    status="OK",
                ),
                "http": _metric(
                    url, "esans_requests_total", transport="http", method="/v1/sample",
                    status="200",
                ),
            }  # fmt: skip
            http_refused = _metric(url, "esans_requests_total", transport="http", status="429")
            settled = (served, http_refused) == (ok, outcomes["http"].count("refused"))
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert served == ok
        assert http_refused == outcomes["http"].count("refused")
        # The service refused what the clients saw, less any the gRPC core refused itself.
        grpc_refused = _metric(
            url, "esans_requests_total", transport="grpc", status="RESOURCE_EXHAUSTED"
        )
        assert _metric(url, "esans_rejected_requests_total") == grpc_refused + http_refused
        assert grpc_refused <= outcomes["grpc"].count("refused")
    assert proc.returncode == 0, log.read_text()[-3000:]
