"""Service settings: one object, read once at start from ``ESANS_*`` variables and CLI flags.

Precedence: CLI flags (the ``overrides`` of :func:`load_settings`) > environment variables
(``ESANS_GRPC_PORT=50052``) > defaults. Unknown ``ESANS_*`` variables and badly typed or
out-of-range values fail at start with a message naming the variable. Nothing else in the
service reads the environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from esans_sampler.edis import MAX_ETA, MIN_LAMBDA
from esans_sampler.errors import InvalidInputError

ENV_PREFIX = "ESANS_"
MIB = 1024 * 1024
# gRPC encodes message lengths as int32.
GRPC_MESSAGE_LIMIT = 2**31 - 1
# Floor of the computed message-size default: room for embeddings at the default sizes.
_MIN_DEFAULT_MESSAGE_BYTES = 128 * MIB
_MIN_ADMIN_TOKEN_CHARS = 16
# Per positive, per slot bytes of the id-only part of a response (see response_bytes).
_TENSOR_OVERHEAD_BYTES = 64

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def available_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: the cgroup v2 quota (a container's CPU limit) if one is
    set, else the CPU affinity mask, else os.cpu_count()."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _default_concurrency() -> int:
    return 2 * available_cpus()


def response_bytes(batch: int, m_c: int, m_o: int, m_h: int, embedding_dim: int = 0) -> int:
    """Upper bound of the tensor bytes in one response (ids, codes, log q; embeddings if d > 0).

    With embeddings, T = 2 + ... + m_o virtual simple negatives per drawn cluster (eq. 12).
    """
    per_row = (
        2 * 4  # positive_primary, positive_secondary int32
        + m_c * m_o * (8 + 4)  # simple_ids int64, simple_log_q float32
        + m_c * 4  # simple_clusters int32
        + m_h * (8 + 4)  # hard_ids int64, hard_log_q float32
        + 4  # hard_counts int32
        + (m_c * m_o + m_h) * 4  # simple_secondary, hard_secondary int32
    )
    if embedding_dim > 0:
        t = m_o * (m_o + 1) // 2 - 1
        per_row += 4 * (
            embedding_dim * (1 + m_c * m_o + 2 * m_h + m_c * t)  # vectors
            + m_c * t * m_o  # simple_weights
        )
    return batch * per_row + 13 * _TENSOR_OVERHEAD_BYTES


class Settings(BaseSettings):
    """Everything the service can be configured with (environment prefix ``ESANS_``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # Storage.
    redis_url: str | None = Field(
        default=None, description="redis://... of the codebook store; None = embedded Redis"
    )
    redis_namespace: str = Field(default="esans", min_length=1)
    data_dir: Path = Field(default=Path("var/redis"), description="embedded Redis data")
    embedded_redis_port: int = Field(
        default=0, ge=0, le=65535, description="port of the embedded Redis; 0 = a free one"
    )
    keep_versions: int = Field(default=5, ge=1)
    lease_ttl_s: float = Field(
        default=3600.0,
        ge=1,
        description="a version pinned by requests keeps a lease this long after the last one; "
        "leased versions are not deleted by retention, nor by the admin API unless forced",
    )
    redis_lease_url: str | None = Field(
        default=None,
        description="redis://... of a user that may write the lease keys; None = redis_url",
    )
    max_loaded_versions: int = Field(default=3, ge=1)
    poll_interval_s: float = Field(default=5.0, gt=0)

    # Transports.
    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_max_message_bytes: int = Field(
        default=0,
        ge=0,
        le=GRPC_MESSAGE_LIMIT,
        description="max gRPC message and response size; 0 = computed from the limits below",
    )
    max_upload_bytes: int = Field(default=2048 * MIB, ge=1, description="admin artifact upload")
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    max_concurrency: int = Field(default_factory=_default_concurrency, ge=1)
    workers: int = Field(
        default_factory=lambda: available_cpus(),
        ge=1,
        description="worker processes of `esans serve` sharing the gRPC and HTTP ports; default: "
        "the container's CPU limit (or the machine's CPUs)",
    )
    blas_threads: int = Field(
        default=1,
        ge=1,
        description="BLAS/OpenMP threads per request in `esans serve`; requests already run "
        "in parallel, so more threads oversubscribe the CPUs",
    )
    admin_token: SecretStr | None = Field(
        default=None, description=f">= {_MIN_ADMIN_TOKEN_CHARS} chars; None disables /admin"
    )
    log_level: LogLevel = "INFO"

    # Security (README "Security"): TLS, sampling tokens and limits against abuse.
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain; with tls_key_file, gRPC and HTTP serve TLS only",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of the cert")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle; set = clients must present a certificate it signed (mTLS)",
    )
    tls_reload_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="how often the certificate and token files are checked for changes "
        "(SIGHUP checks at once)",
    )
    sample_tokens_file: Path | None = Field(
        default=None,
        description="'NAME TOKEN' per line; set = sampling and codebook info need "
        "'Authorization: Bearer <token>'",
    )
    max_request_bytes: int = Field(
        default=8 * MIB,
        ge=1024,
        description="largest HTTP sampling request body (413 beyond); the default holds "
        "max_batch ids and max_excluded_ids exclusions as JSON",
    )
    grpc_max_streams_per_connection: int = Field(
        default=64, ge=1, description="concurrent calls one gRPC connection may hold"
    )
    grpc_min_ping_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="clients pinging more often than this are disconnected (too_many_pings)",
    )
    grpc_max_connection_idle_s: float = Field(
        default=600.0, gt=0, description="idle gRPC connections are closed after this"
    )
    http_max_connections: int = Field(
        default=1000, ge=1, description="open HTTP connections and requests; beyond: 503"
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request's headers must arrive within this time of the connection "
        "(or of the previous response) or the connection is closed (slow-loris)",
    )
    http_keep_alive_s: float = Field(default=5.0, gt=0, description="idle HTTP keep-alive")

    # Request limits and defaults.
    max_batch: int = Field(default=4096, ge=1)
    max_excluded_ids: int = Field(
        default=262_144, ge=0, description="per-row exclusions a request may carry, in all"
    )
    max_m_c: int = Field(default=16, ge=1)
    max_m_o: int = Field(default=32, ge=1)
    max_m_h: int = Field(default=64, ge=0)
    default_m_c: int = Field(default=2, ge=1)
    default_m_o: int = Field(default=5, ge=1)
    default_m_h: int = Field(default=5, ge=0)
    default_eta: float = Field(default=0.6, ge=0, le=MAX_ETA)
    default_hard_lambda: float = Field(default=0.1, ge=MIN_LAMBDA, lt=1)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < _MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"must be at least {_MIN_ADMIN_TOKEN_CHARS} characters (or unset to disable "
                "the admin API)"
            )
        return value

    @field_validator("default_eta", "default_hard_lambda")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        for name in ("m_c", "m_o", "m_h"):
            default, limit = getattr(self, f"default_{name}"), getattr(self, f"max_{name}")
            if default > limit:
                raise ValueError(f"default_{name}={default} exceeds max_{name}={limit}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        if self.grpc_max_message_bytes == 0:
            largest = response_bytes(self.max_batch, self.max_m_c, self.max_m_o, self.max_m_h)
            computed = min(GRPC_MESSAGE_LIMIT, max(_MIN_DEFAULT_MESSAGE_BYTES, 2 * largest))
            object.__setattr__(self, "grpc_max_message_bytes", computed)
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None

    @property
    def max_response_bytes(self) -> int:
        """Largest tensor payload one response may carry (the gRPC limit less headroom)."""
        return self.grpc_max_message_bytes - MIB // 16


def unknown_env_variables(environ: Mapping[str, str]) -> list[str]:
    """``ESANS_*`` names in ``environ`` that are no setting (typos fail loudly)."""
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    return sorted(
        key for key in environ if key.upper().startswith(ENV_PREFIX) and key.upper() not in known
    )


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from ``ESANS_*`` variables, with ``overrides`` (CLI flags) on top.

    ``overrides`` entries whose value is None are ignored (a flag that was not given).
    ``environ`` defaults to ``os.environ``. Raises :class:`InvalidInputError` with one line
    per bad value, naming the flag or environment variable to fix.
    """
    env = os.environ if environ is None else environ
    unknown = unknown_env_variables(env)
    if unknown:
        raise InvalidInputError(
            f"unknown environment variable(s) {', '.join(unknown)}; known settings: "
            + ", ".join(f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields)
        )
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown_flags = sorted(set(given) - set(Settings.model_fields))
    if unknown_flags:
        raise InvalidInputError(f"unknown setting(s) {unknown_flags}")
    try:
        if environ is None:
            return Settings(**given)
        # An explicit environment: read it instead of os.environ (tests, embedding).
        from_env = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in env.items()
            if key.upper().startswith(ENV_PREFIX)
        }
        return Settings.model_validate({**from_env, **given})
    except ValidationError as exc:
        raise InvalidInputError(_describe(exc, given)) from exc


def _describe(exc: ValidationError, flags: Mapping[str, Any]) -> str:
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        source = (
            f"--{field.replace('_', '-')}" if field in flags else f"{ENV_PREFIX}{field.upper()}"
        )
        if not field:
            source = "settings"
        shown = "<secret>" if field == "admin_token" else repr(error.get("input"))
        lines.append(f"{source}: {error['msg']} (got {shown})")
    return "invalid settings:\n  " + "\n  ".join(lines)
