"""The ``esans`` command: one parser, one module per subcommand, one error policy.

Every subcommand exits 0 on success, 2 on a usage or input error (with a one-line message
on stderr naming what to fix), never with a traceback for a problem the user can fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from esans_cli import assign, build, demo, inspect, publish, serve, versions
from esans_sampler.errors import EsansError

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "build": build.run,
    "assign": assign.run,
    "inspect": inspect.run,
    "demo": demo.run,
    "serve": serve.run,
    "publish": publish.run,
    "versions": versions.run,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esans-sampler")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esans", description="ESANS negative sampling")
    parser.add_argument("--version", action="version", version=f"esans {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (build, assign, inspect, demo, serve, publish, versions):
        module.add_parser(sub)
    sub.add_parser(  # parsed by esans_eval.cli, which needs the `eval` extra
        "eval", add_help=False, help="Recall@50/200 of a two-tower model trained on negatives "
        "from the service: UNS, PNS, MNS, in-batch, ESANS, ablations (esans eval --help)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["eval"]:
        from esans_eval.cli import main as eval_main

        return eval_main(arguments[1:], prog="esans eval")
    args = build_parser().parse_args(arguments)
    try:
        return _COMMANDS[args.command](args)
    except (EsansError, FileNotFoundError) as exc:
        print(f"esans {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `esans inspect ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"esans {args.command}: interrupted", file=sys.stderr)
        return 130
