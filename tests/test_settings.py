"""Settings: environment and flags, defaults, loud failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from esans_sampler.errors import InvalidInputError
from esans_service.settings import GRPC_MESSAGE_LIMIT, Settings, load_settings, response_bytes

TOKEN = "x" * 32


def test_defaults() -> None:
    s = load_settings(environ={})
    assert (s.grpc_port, s.http_port, s.max_batch) == (50051, 8000, 4096)
    assert (s.default_m_c, s.default_m_o, s.default_m_h) == (2, 5, 5)
    assert (s.default_eta, s.default_hard_lambda) == (0.6, 0.1)
    assert s.redis_url is None and s.data_dir == Path("var/redis")
    assert s.admin_token is None and not s.admin_enabled
    assert s.max_concurrency >= 2
    largest = response_bytes(s.max_batch, s.max_m_c, s.max_m_o, s.max_m_h)
    assert largest < s.max_response_bytes < s.grpc_max_message_bytes <= GRPC_MESSAGE_LIMIT


def test_flags_override_environment() -> None:
    env = {"ESANS_GRPC_PORT": "6000", "ESANS_HTTP_PORT": "7000", "ESANS_LOG_LEVEL": "debug"}
    s = load_settings({"grpc_port": 6001, "http_port": None}, environ=env)
    assert (s.grpc_port, s.http_port, s.log_level) == (6001, 7000, "DEBUG")


def test_admin_token_is_secret() -> None:
    s = load_settings(environ={"ESANS_ADMIN_TOKEN": TOKEN})
    assert s.admin_enabled and TOKEN not in repr(s)


@pytest.mark.parametrize(
    ("env", "overrides", "match"),
    [
        ({"ESANS_GRPC_PORT": "abc"}, {}, "ESANS_GRPC_PORT"),
        ({}, {"grpc_port": 70000}, "--grpc-port"),
        ({"ESANS_GRPC_PROT": "1"}, {}, "unknown environment variable.*ESANS_GRPC_PROT"),
        ({}, {"no_such_flag": 1}, "unknown setting"),
        ({"ESANS_ADMIN_TOKEN": "short"}, {}, "at least 16"),
        ({"ESANS_DEFAULT_M_C": "20"}, {}, "default_m_c=20 exceeds max_m_c=16"),
        ({"ESANS_DEFAULT_HARD_LAMBDA": "1"}, {}, "ESANS_DEFAULT_HARD_LAMBDA"),
        ({"ESANS_DEFAULT_ETA": "nan"}, {}, "ESANS_DEFAULT_ETA"),
        ({"ESANS_LOG_LEVEL": "loud"}, {}, "ESANS_LOG_LEVEL"),
    ],
)
def test_bad_values_fail_loudly(
    env: dict[str, str], overrides: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match):
        load_settings(overrides, environ=env)


def test_secret_is_not_echoed_in_errors() -> None:
    with pytest.raises(InvalidInputError) as info:
        load_settings(environ={"ESANS_ADMIN_TOKEN": "hunter2"})
    assert "hunter2" not in str(info.value)


def test_explicit_message_limit_is_kept() -> None:
    assert Settings(grpc_max_message_bytes=8 * 2**20).grpc_max_message_bytes == 8 * 2**20


@pytest.mark.parametrize(
    ("cpu_max", "expected_at_most"),
    [("200000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), ("garbage", None)],
)
def test_available_cpus_honours_a_container_cpu_limit(
    tmp_path: Path, cpu_max: str, expected_at_most: int | None
) -> None:
    from esans_service.settings import available_cpus

    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    cpus = available_cpus(path)
    assert cpus >= 1
    if expected_at_most is not None:
        assert cpus <= expected_at_most
    assert available_cpus(tmp_path / "absent") >= cpus
