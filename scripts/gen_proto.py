"""Generate the Python protobuf/gRPC modules (and .pyi stubs) from proto/.

Run by the build (`make proto`); tests/test_proto.py fails when the checked-in output is stale.
Usage: python scripts/gen_proto.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "esans_sampler" / "contract" / "_proto"


def generate(out: Path, package: str = "esans_sampler.contract._proto") -> list[Path]:
    """Write the generated modules under ``out``, importable as ``package``."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    # protoc writes absolute imports (`from esans.v1 import ...`); make them package-relative
    # to where the modules live so no sys.path tweak is needed.
    for module in out.rglob("*_pb2*.py*"):
        text = module.read_text()
        module.write_text(text.replace("from esans.v1 import", f"from {package}.esans.v1 import"))
    return sorted(p for p in out.rglob("*") if p.suffix in {".py", ".pyi"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
