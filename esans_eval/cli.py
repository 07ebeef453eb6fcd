"""``python -m esans_eval``: run the evaluation and write the report."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from esans_eval.budget import Budget
from esans_eval.completejourney import load_completejourney
from esans_eval.datasets import DatasetError, ItemSchema, load_dataset, load_movielens
from esans_eval.experiment import run_experiment
from esans_eval.report import load_result, progress_summary, recorded_command, write_report

DEFAULT_DIR = "var/eval"
DATASETS = ("completejourney", "ml-1m", "ml-100k", "custom")
QUICK = Budget(
    epochs=2, seeds=1, batch_size=128, msac_epochs=5, sweep_kp=(16,), sweep_ks=(4,),
    trial_epochs=1, max_steps=10, per_positive_table=False,
)  # fmt: skip
BUDGETS = {
    # 68k items: the paper's K_p 300 / K_s 15 / d_m 512 between a coarser and a finer grid; an
    # epoch is 200 steps (102k examples) so early stopping sees the curve, not just its end.
    # lr 3e-3: better than 1e-3 on validation for UNS, ESANS and in-batch alike
    # (docs/results-completejourney-lr.jsonl); Table 6's 2e-4 learns far slower in this budget.
    "completejourney": Budget(
        learning_rate=3e-3, epochs=8, max_steps=200, trial_epochs=1, msac_dim=512,
        msac_epochs=5, sweep_kp=(100, 300, 600), sweep_ks=(15,),
    ),
    "ml-1m": Budget(
        learning_rate=3e-3, epochs=12, max_steps=200, trial_epochs=1,
        sweep_kp=(16, 32, 64), sweep_ks=(8,),
    ),
    "ml-100k": Budget(max_steps=100, trial_epochs=1, sweep_kp=(16, 32), sweep_ks=(4,)),
    "custom": Budget(max_steps=200, trial_epochs=1),
}  # fmt: skip


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
    p.add_argument(
        "--status",
        action="store_true",
        help="only summarise the progress file of --dataset (what a running or interrupted "
        "evaluation has finished), no training",
    )
    p.add_argument("--quick", action="store_true", help="ML-100K, 2 epochs, 1 seed (CI smoke)")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="completejourney (default; grocery, 68k products), ml-1m, ml-100k (the default "
        "with --quick), or custom TSV files (see README)",
    )
    p.add_argument("--interactions", help="custom: user_id, item_id, timestamp (TSV)")
    p.add_argument("--items", help="custom: item_id, text, [year], [categories] (TSV)")
    p.add_argument("--category-columns", default="", help="custom: comma-separated columns")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, quick 1)")
    p.add_argument(
        "--epochs", type=int, default=None, help="epoch cap of early stopping (default 20)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="steps per epoch, at most one pass (default 200, quick 10)",
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
        default=None,
        help="report; the plot and a JSON of every number go beside it "
        "(default var/eval/results-<dataset>.md: a run never overwrites a tracked report "
        "unless told to)",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="train trials and runs in N worker processes at once, with the same results "
        "(default 1); each worker trains on one torch thread with its own copy of the "
        "prepared data and its own local service",
    )
    p.add_argument(
        "--progress",
        default=None,
        help="finished trials and runs, one JSON line each; a rerun with the same budget "
        "resumes from it (default: beside the report, results-<dataset>.progress.jsonl; none "
        "with --quick; "
        "'none' keeps nothing)",
    )
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _beside(report: str) -> str:
    """The progress file that goes with a report: results-x.md -> results-x.progress.jsonl."""
    return str(Path(report).with_suffix("")) + ".progress.jsonl"


def main(argv: Sequence[str] | None = None, prog: str = "python -m esans_eval") -> int:
    """Entry point (also for ``esans eval``). Returns the exit status."""
    args = parser(prog).parse_args(argv)
    if args.status:
        name = args.dataset or "completejourney"
        path = args.progress or _beside(args.out or f"{DEFAULT_DIR}/results-{name}.md")
        try:
            print(progress_summary(path))
        except (OSError, ValueError, KeyError) as exc:
            print(f"{prog}: error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.render:
        try:
            result, command = load_result(args.render), recorded_command(args.render)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{prog}: error: cannot read {args.render}: {exc}", file=sys.stderr)
            return 2
        out = args.out or str(args.render).removesuffix(".json") + ".md"
        path = write_report(result, out, command or f"(unrecorded; rendered by {prog})")
        print(f"wrote {path}")
        return 0
    name = args.dataset or ("ml-100k" if args.quick else "completejourney")
    budget = QUICK if args.quick else BUDGETS[name]
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
        elif name == "completejourney":
            dataset = load_completejourney()
        else:
            dataset = load_movielens(name)
        out = args.out or f"{DEFAULT_DIR}/results-{name}{'-quick' if args.quick else ''}.md"
        progress = args.progress or (None if args.quick else _beside(out))
        result = run_experiment(
            dataset,
            budget,
            args.cache_dir,
            progress_path=None if progress == "none" else progress,
            jobs=args.jobs,
        )
    except (DatasetError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    command = f"{prog} " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    path = write_report(result, out, command.strip())
    print(f"wrote {path}")
    return 0
