"""``run_server`` end to end in a child process: serves, then drains on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import build_random_artifact

from esans_sampler.artifact import artifact_to_files
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.store import CodebookStore

ROOT = Path(__file__).resolve().parent.parent
SERVE = (
    "from esans_service.app import run_server; from esans_service.settings import load_settings; "
    "run_server(load_settings())"
)
READY = re.compile(r"gRPC on [^:]+:(\d+), HTTP on [^:]+:(\d+)")


def test_serves_and_stops_on_sigterm(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    with redis_server.client() as client:
        CodebookStore(client, namespace="app").publish(
            artifact_to_files(build_random_artifact(seed=1))
        )
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ESANS_")}
    env |= {
        "ESANS_REDIS_URL": redis_server.url,
        "ESANS_REDIS_NAMESPACE": "app",
        "ESANS_GRPC_HOST": "127.0.0.1",
        "ESANS_GRPC_PORT": "0",
        "ESANS_HTTP_HOST": "127.0.0.1",
        "ESANS_HTTP_PORT": "0",
        "ESANS_SHUTDOWN_GRACE_S": "2",
    }
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        match = None
        while match is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
            match = READY.search(log.read_text())
        http_port = int(match.group(2))
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as http:
            assert http.get("/readyz").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        text = log.read_text()
        assert "received SIGTERM" in text and "stopped" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_native_thread_pools_are_limited_for_serving() -> None:
    from threadpoolctl import threadpool_info, threadpool_limits

    from esans_service.app import limit_native_threads

    before = threadpool_info()
    try:
        limit_native_threads(1)
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    finally:
        for pool in before:  # leave the test process as it was
            threadpool_limits(limits=pool["num_threads"], user_api=pool["user_api"])
