"""Every command and snippet of the README's quickstart and training example, run for real:
`esans serve --demo` (what `make run` starts: an embedded Redis, the demo catalogue built and
published), then the README's curl, gRPC and training commands against it (ports swapped for
free ones)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from esans_service.harness import free_port, serve_process, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ESANS = [sys.executable, "-m", "esans_cli"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def _localise(command: str, grpc_port: int, http_port: int) -> str:
    return (
        command.replace("localhost:50051", f"localhost:{grpc_port}")
        .replace("localhost:8000", f"localhost:{http_port}")
        .replace(".venv/bin/python", sys.executable)
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """``esans serve --demo`` as the quickstart runs it: embedded Redis, demo catalogue."""
    work = tmp_path_factory.mktemp("readme")
    grpc_port, http_port = free_port(), free_port()
    log = work / "serve.log"
    demo = ["--demo", "--demo-dir", str(work / "demo")]
    proc = serve_process(None, work, log, grpc_port, http_port, args=demo, log_level="INFO")
    try:
        # The demo build takes ~40 s on 2 idle cores.
        wait_until_serving(proc, f"http://127.0.0.1:{http_port}", None, log, timeout_s=300)
        yield grpc_port, http_port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]


def test_quickstart_names_the_ci_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make run" in README and "make test" in README


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_and_grpc_calls_agree(server: tuple[int, int]) -> None:
    grpc_port, http_port = server
    bash = [b for b in _blocks("bash") if "curl" in b or "SamplerClient" in b]
    curl = next(b for b in bash if "curl" in b)
    grpc_call = next(b for b in bash if "SamplerClient" in b)
    http_out = subprocess.run(
        _localise(curl, grpc_port, http_port), shell=True, check=True,
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    body = json.loads(http_out)
    grpc_out = subprocess.run(
        _localise(grpc_call, grpc_port, http_port), shell=True, check=True,
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    ).stdout  # fmt: skip
    version, simple_shape, hard_shape, virtual_shape = (
        grpc_out.split(" ", 1)[0],
        *re.findall(r"\([^)]*\)", grpc_out),
    )
    assert body["codebook_version"].startswith(version)
    assert simple_shape == "(2, 2, 5)" and tuple(body["simple_ids"]["shape"]) == (2, 2, 5)
    assert hard_shape == "(2, 5)"
    assert virtual_shape == "(2, 2, 14, 64)"
    # As the README shows: the demo gives each positive all m_h = 5 hard negatives.
    assert body["hard_counts"]["data"] == [5, 5]
    assert min(body["hard_ids"]["data"]) >= 1_000_000


def _run_example(marker: str, server: tuple[int, int]) -> str:
    """Stdout of the README's first Python block that contains ``marker``, run against the
    test server."""
    example = next(b for b in _blocks("python") if marker in b)
    result = subprocess.run(
        [sys.executable, "-c", _localise(example, *server)],
        check=True, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    return result.stdout


def test_readme_training_example_runs(server: tuple[int, int]) -> None:
    stdout = _run_example("from esans_sampler.trainer import esans_loss", server)
    losses = [float(x) for x in re.findall(r"loss (\S+)", stdout)]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


def test_readme_shared_negatives_example_runs(server: tuple[int, int]) -> None:
    stdout = _run_example("batch_softmax_loss", server)
    pairs = re.findall(r"paper loss (\S+), default loss (\S+)", stdout)
    assert len(pairs) == 3
    assert all(0 < float(x) < 1e4 for pair in pairs for x in pair), stdout
