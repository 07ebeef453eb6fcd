"""EmbeddedRedis: a real redis-server child process, started, persisted, stopped cleanly."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esans_sampler.errors import FailedPreconditionError, UnavailableError
from esans_service.embedded_redis import EmbeddedRedis, running_embedded_url


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_starts_answers_and_stops_without_zombie(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    with server:
        assert server.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        pid = server.pid
        assert pid is not None
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            assert client.config_get("bind")["bind"] == "127.0.0.1"
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("protected-mode")["protected-mode"] == "yes"
    assert not server.running
    assert server.pid is None
    assert not _pid_alive(pid)  # reaped: not even a zombie entry remains
    server.stop()  # idempotent


def test_data_survives_restart(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        port = server.port
        with server.client() as client:
            client.set(b"key", b"\x00\xffvalue")
        server.restart()
        assert server.port == port
        with server.client() as client:
            assert client.get(b"key") == b"\x00\xffvalue"
        server.restart(wipe=True)
        with server.client() as client:
            assert client.get(b"key") is None


def test_new_instance_on_same_dir_reads_old_data(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server, server.client() as client:
        client.set(b"kept", b"1")
    with EmbeddedRedis(tmp_path) as server, server.client() as client:
        assert client.get(b"kept") == b"1"


def test_kill_then_start_again(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not server.running
        assert not _pid_alive(pid)
        server.start()
        with server.client() as client:
            assert client.ping()


def test_requirepass(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, password="s3cret") as server:
        assert server.url.startswith("redis://:s3cret@127.0.0.1:")
        with (
            redis.Redis(
                host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0)
            ) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.get(b"x")
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        assert (server.data_dir / "redis.conf").stat().st_mode & 0o077 == 0


def test_explicit_port_in_use_fails_clearly(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        server = EmbeddedRedis(tmp_path, port=port, startup_timeout_s=5.0)
        with pytest.raises(UnavailableError, match=r"exited|did not answer"):
            server.start()
        assert not server.running


def test_missing_binary_fails_clearly(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, executable=str(tmp_path / "no-such-redis-server"))
    with pytest.raises(FailedPreconditionError, match="cannot run redis-server"):
        server.start()
    assert not server.running


def test_url_before_start_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FailedPreconditionError):
        _ = EmbeddedRedis(tmp_path).url
    with pytest.raises(ValueError, match="port"):
        EmbeddedRedis(tmp_path, port=70000)
    with pytest.raises(ValueError, match="positive"):
        EmbeddedRedis(tmp_path, startup_timeout_s=0)


def test_wipe_refused_while_running(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server, pytest.raises(FailedPreconditionError):
        server.wipe_data()


def test_forgotten_server_is_stopped_when_collected(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    pid = server.pid
    assert pid is not None
    del server
    gc.collect()
    assert not _pid_alive(pid)


def test_forgotten_server_is_stopped_at_interpreter_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from esans_service.embedded_redis import EmbeddedRedis
        server = EmbeddedRedis({str(tmp_path)!r}).start()
        print(server.pid, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    pid = int(done.stdout.split()[0])
    assert not _pid_alive(pid)


def test_a_replica_sharing_the_embedded_redis_recovers_when_its_owner_restarts(
    tmp_path: Path,
) -> None:
    """Replica A starts the embedded Redis, replica B finds and uses it. A restarts: its
    Redis takes the same port back, so B reconnects and follows a publish made after."""
    from conftest import build_random_artifact

    from esans_sampler.artifact import artifact_to_files
    from esans_service.app import ServiceRuntime
    from esans_service.harness import local_settings
    from esans_service.settings import Settings
    from esans_service.store import CodebookStore

    def settings() -> Settings:
        return local_settings(data_dir=tmp_path / "redis", poll_interval_s=0.2)

    owner = ServiceRuntime(settings()).start()
    replica = ServiceRuntime(settings()).start()
    try:
        first_url = running_embedded_url(tmp_path / "redis")
        assert first_url is not None
        owner.stop(grace=0)  # stops the embedded Redis with it
        owner = ServiceRuntime(settings()).start()
        assert running_embedded_url(tmp_path / "redis") == first_url  # same port back
        artifact = build_random_artifact(seed=9, num_items=60, dim=4)
        CodebookStore(owner.store.client).publish(artifact_to_files(artifact))
        deadline = time.monotonic() + 20
        while replica.registry.active_version != artifact.version:
            assert time.monotonic() < deadline, replica.registry.stale_reason
            time.sleep(0.1)
    finally:
        replica.stop(grace=0)
        owner.stop(grace=0)
