"""The sampler kinds a request may name, one spelling for the library, both servers and both
clients (the proto enum is ``SAMPLER_KIND_<NAME>``)."""

from __future__ import annotations

from typing import Final

ESANS: Final = "esans"
UNIFORM: Final = "uniform"
POPULARITY: Final = "popularity"
MIXED: Final = "mixed"
SAMPLER_KINDS: Final = (ESANS, UNIFORM, POPULARITY, MIXED)
