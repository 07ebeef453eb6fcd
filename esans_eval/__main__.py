"""``python -m esans_eval``."""

from esans_eval.cli import main

raise SystemExit(main())
