"""Transport security: TLS material and sampling tokens read from files, reloaded on change.

Both servers take their certificate, key and client CA from one :class:`CredentialFiles`,
and both check sampling tokens against one :class:`SampleTokens`. The files are checked every
``tls_reload_interval_s`` (and at once on SIGHUP), so cert-manager's rotation takes effect
without a restart. A half-written or invalid new file is refused with an error in the log
and the previous material stays in use.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from esans_sampler.errors import InvalidInputError, UnauthenticatedError

logger = logging.getLogger(__name__)

_MIN_TOKEN_CHARS = 16
BEARER = "bearer"


# ----------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent set of PEM bytes (the CA None without client verification), and
    private copies of them on disk, which is what ``ssl`` loads from."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    generation: int
    copies: tuple[Path, Path, Path | None]


class CredentialFiles:
    """The server's certificate, key and optional client CA, re-read when they change.

    :meth:`check` re-reads the files whose modification time or size changed and keeps the
    new set only if it loads into an ``ssl.SSLContext``. Thread-safe.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._paths = (cert_file, key_file, client_ca_file)
        # Each generation is read once and loaded from private copies: a file rewritten while
        # it is loaded (a key already new, its certificate not yet) can never mix into a
        # context.
        self._private = Path(tempfile.mkdtemp(prefix="esans-tls-"))
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._material = self._load(generation=1)  # fails at start: no material, no server

    @property
    def material(self) -> TlsMaterial:
        with self._lock:
            return self._material

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate signed by the client CA."""
        return self._paths[2] is not None

    def check(self, force: bool = False) -> bool:
        """Reload if a file changed (or ``force``); True when new material was taken."""
        with self._lock:
            stamp = self._stamps()
            if stamp == self._stamp and not force:
                return False
            try:
                material = self._load(self._material.generation + 1)
            except (OSError, ValueError) as exc:  # SSLError is an OSError; InvalidInputError
                logger.error("TLS files changed but cannot be used, keeping the old ones: %s", exc)
                return False
            self._stamp = stamp
            if (material.cert, material.key, material.client_ca) == (
                self._material.cert,
                self._material.key,
                self._material.client_ca,
            ):
                return False
            previous, self._material = self._material, material
        for copy in previous.copies:
            if copy is not None:
                copy.unlink(missing_ok=True)
        logger.info("TLS certificate reloaded (generation %d)", material.generation)
        return True

    def server_context(self) -> ssl.SSLContext:
        """An HTTPS server context holding the current material."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.load_into(context)
        return context

    def load_into(self, context: ssl.SSLContext) -> None:
        """Put the current certificate (and client CA) into a new ``context``."""
        with self._lock:
            cert_file, key_file, ca_file = self._material.copies
            context.load_cert_chain(cert_file, key_file)
            if ca_file is not None:
                context.load_verify_locations(cafile=ca_file)
                context.verify_mode = ssl.CERT_REQUIRED

    def close(self) -> None:
        """Remove the private copies."""
        shutil.rmtree(self._private, ignore_errors=True)

    def _stamps(self) -> tuple[tuple[int, int] | None, ...]:
        stamps: list[tuple[int, int] | None] = []
        for path in self._paths:
            try:
                stat = path.stat() if path is not None else None
            except OSError:
                stat = None
            stamps.append(None if stat is None else (stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def _load(self, generation: int) -> TlsMaterial:
        cert_file, key_file, ca_file = self._paths
        cert, key = cert_file.read_bytes(), key_file.read_bytes()
        ca = ca_file.read_bytes() if ca_file is not None else None
        copies = (
            self._copy(f"{generation}.crt", cert),
            self._copy(f"{generation}.key", key),
            None if ca is None else self._copy(f"{generation}-ca.crt", ca),
        )
        # Refuse a pair that does not load (a key of another certificate, half a file).
        probe = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            try:
                probe.load_cert_chain(copies[0], copies[1])
            except ssl.SSLError as exc:
                raise InvalidInputError(
                    f"{cert_file} and {key_file} are not a certificate and its key ({exc})"
                ) from exc
            if copies[2] is not None:
                try:
                    probe.load_verify_locations(cafile=copies[2])
                except ssl.SSLError as exc:
                    raise InvalidInputError(f"{ca_file} holds no usable CA certificate") from exc
        except InvalidInputError:
            for copy in copies:
                if copy is not None:
                    copy.unlink(missing_ok=True)
            raise
        return TlsMaterial(cert, key, ca, generation, copies)

    def _copy(self, name: str, data: bytes) -> Path:
        path = self._private / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as sink:
            sink.write(data)
        return path


# ----------------------------------------------------------------------------- tokens


class SampleTokens:
    """Bearer tokens allowed to sample, by trainer name, from a ``NAME TOKEN`` file.

    Blank lines and ``#`` comments are skipped. Errors name the file and line, never the
    token. :meth:`authenticate` compares in constant time against every token.
    """

    def __init__(self, path: Path, admin_token: str | None = None) -> None:
        self._path = path
        self._admin_digest = None if admin_token is None else _digest(admin_token)
        self._lock = threading.Lock()
        self._stamp = _stamp(path)
        self._tokens = self._load()

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tokens.values())

    def check(self, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``); True when new tokens were taken."""
        with self._lock:
            stamp = _stamp(self._path)
            if stamp == self._stamp and not force:
                return False
            try:
                tokens = self._load()
            except (OSError, ValueError) as exc:  # InvalidInputError, undecodable bytes
                logger.error("the sample tokens file cannot be used, keeping the old one: %s", exc)
                return False
            self._stamp, changed = stamp, tokens != self._tokens
            self._tokens = tokens
        if changed:
            logger.info("sample tokens reloaded: %d trainers", len(tokens))
        return changed

    def authenticate(self, authorization: str | None) -> str:
        """The trainer name of an ``Authorization: Bearer <token>`` value.

        Raises:
            UnauthenticatedError: no header, another scheme or an unknown token.
        """
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != BEARER or not token.strip():
            raise UnauthenticatedError(
                "sampling needs the header 'Authorization: Bearer <token>' (gRPC metadata "
                "'authorization') with a token of the server's ESANS_SAMPLE_TOKENS_FILE"
            )
        presented = _digest(token.strip())
        with self._lock:
            tokens = self._tokens
        name = None
        for digest, owner in tokens.items():  # every entry, so the time says nothing
            if hmac.compare_digest(presented, digest):
                name = owner
        if name is None:
            raise UnauthenticatedError("the bearer token is not a sampling token of this server")
        return name

    def _load(self) -> dict[bytes, str]:
        tokens: dict[bytes, str] = {}
        where = str(self._path)
        for number, line in enumerate(self._path.read_text(encoding="utf-8").splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            if len(parts) != 2:
                raise InvalidInputError(f"{where}:{number}: expected 'NAME TOKEN'")
            name, token = parts
            if len(token) < _MIN_TOKEN_CHARS:
                raise InvalidInputError(
                    f"{where}:{number}: the token of {name!r} is shorter than "
                    f"{_MIN_TOKEN_CHARS} characters"
                )
            digest = _digest(token)
            if digest == self._admin_digest:
                raise InvalidInputError(
                    f"{where}:{number}: the token of {name!r} is the admin token; sampling "
                    "and admin tokens must differ"
                )
            if digest in tokens:
                raise InvalidInputError(f"{where}:{number}: the token of {name!r} is repeated")
            tokens[digest] = name
        if not tokens:
            raise InvalidInputError(f"{where} holds no 'NAME TOKEN' line")
        return tokens


def _digest(token: str) -> bytes:
    # Equal-length values for compare_digest, and no token kept in memory as itself.
    return hashlib.sha256(token.encode("utf-8")).digest()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


# ----------------------------------------------------------------------------- watching


class FileWatcher:
    """Calls each ``check`` every ``interval_s`` seconds on a daemon thread; :meth:`now`
    runs them at once (SIGHUP)."""

    def __init__(self, checks: list[Callable[[bool], bool]], interval_s: float) -> None:
        self._checks = checks
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esans-watch", daemon=True)

    def start(self) -> FileWatcher:
        if self._checks:
            self._thread.start()
        return self

    def now(self) -> None:
        for check in self._checks:
            try:
                check(True)
            except Exception:  # a bad file must not take the server down
                logger.exception("re-reading credential files failed")

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            for check in self._checks:
                try:
                    check(False)
                except Exception:  # the watcher must outlive one bad check
                    logger.exception("checking credential files failed")
