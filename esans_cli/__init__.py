"""The ``esans`` command line, the composition root: it wires the core (``esans_sampler``),
the service and the evaluation together, so none of them imports another's adapters."""

from esans_cli.main import build_parser, main

__all__ = ["build_parser", "main"]
