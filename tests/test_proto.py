"""The checked-in generated protobuf code must match proto/ (regenerate: make proto)."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    generate = runpy.run_path(str(ROOT / "scripts" / "gen_proto.py"))["generate"]
    generate(tmp_path, package="esans_sampler.contract._proto")
    checked_in = ROOT / "esans_sampler" / "contract" / "_proto"
    generated = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.suffix in {".py", ".pyi"}
    )
    assert generated, "protoc generated nothing"
    for rel in generated:
        assert (checked_in / rel).read_text() == (tmp_path / rel).read_text(), (
            f"esans_sampler/contract/_proto/{rel} is stale: run `make proto` and commit the result"
        )
