"""``python -m esans_eval``: run the evaluation and write the report."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace

from esans_eval.datasets import DatasetError, ItemSchema, load_dataset, load_movielens
from esans_eval.experiment import Budget, run_experiment
from esans_eval.report import load_result, recorded_command, write_report

QUICK = Budget(epochs=2, seeds=1, msac_epochs=10, sweep_kp=(16, 32), sweep_ks=(4,), max_steps=None)
FULL = Budget(epochs=3, seeds=3, max_steps=300, sweep_kp=(16, 32, 64), sweep_ks=(2, 4, 8))


def parser(prog: str = "python -m esans_eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Recall@50/200 of a two-tower model trained on negatives from the running "
        "sampler service: UNS, PNS, MNS, ESANS and ablations.",
    )
    p.add_argument(
        "--render",
        metavar="JSON",
        help="only rewrite the report (and plot) from the JSON of an earlier run, no training",
    )
    p.add_argument("--quick", action="store_true", help="ML-100K, 2 epochs, 1 seed (CI smoke)")
    p.add_argument(
        "--dataset",
        choices=("ml-1m", "ml-100k", "custom"),
        default=None,
        help="ml-1m (default), ml-100k (with --quick), or custom TSV files (see README)",
    )
    p.add_argument("--interactions", help="custom: user_id, item_id, timestamp (TSV)")
    p.add_argument("--items", help="custom: item_id, text, [year], [categories] (TSV)")
    p.add_argument("--category-columns", default="", help="custom: comma-separated columns")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 3, quick 2)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="cap on steps per epoch (default 300, quick: none)",
    )
    p.add_argument("--max-users", type=int, default=None, help="only the first N users")
    p.add_argument(
        "--text-encoder",
        choices=("minilm", "hash"),
        default="minilm",
        help="minilm: all-MiniLM-L6-v2 from site-packages (default); hash: bag of words, no model",
    )
    p.add_argument(
        "--cache-dir", default="var/eval-cache", help="text embedding cache (default %(default)s)"
    )
    p.add_argument(
        "--out",
        default="docs/results.md",
        help="report; the plot and a JSON of every number go beside it (default %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m esans_eval") -> int:
    """Entry point (also for ``esans eval``). Returns the exit status."""
    args = parser(prog).parse_args(argv)
    if args.render:
        try:
            result, command = load_result(args.render), recorded_command(args.render)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{prog}: error: cannot read {args.render}: {exc}", file=sys.stderr)
            return 2
        path = write_report(result, args.out, command or f"(unrecorded; rendered by {prog})")
        print(f"wrote {path}")
        return 0
    name = args.dataset or ("ml-100k" if args.quick else "ml-1m")
    budget = QUICK if args.quick else FULL
    overrides = {
        "seeds": args.seeds,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "max_users": args.max_users,
    }
    budget = replace(
        budget,
        text_encoder=args.text_encoder,
        **{k: v for k, v in overrides.items() if v is not None},
    )
    try:
        if name == "custom":
            if not (args.interactions and args.items):
                raise DatasetError("--dataset custom needs --interactions and --items")
            cats = tuple(c for c in args.category_columns.split(",") if c)
            dataset = load_dataset(
                args.interactions, args.items, name="custom", items=ItemSchema(categories=cats)
            )
        else:
            dataset = load_movielens(name)
        result = run_experiment(dataset, budget, args.cache_dir)
    except (DatasetError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    command = f"{prog} " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    path = write_report(result, args.out, command.strip())
    print(f"wrote {path}")
    return 0
