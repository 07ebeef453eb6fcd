"""``python -m esans_eval``."""

import os

# Before torch's import: see the same line in esans_cli.main.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from esans_eval.cli import main

raise SystemExit(main())
