"""Wall time of the evaluation's trials and runs in one process against ``--jobs N`` workers.

Runs the same small evaluation twice, back to back (UNS, in-batch + log-q, ESANS as published
and the product default; their validation trials; two seeds), once in this process and once
with ``--jobs``, and prints the wall time of the tuning and training phases of each (the
K_p / K_s sweep and the preparation run in the parent either way), the speed-up, and whether
every trial and run gave the same numbers. Target: about 1.8x with 2 jobs on 2 cores; the
trainer uses one thread and the service sampling for it a second, so a worker pair shares
the cores with two services.

    python benchmarks/bench_eval_jobs.py [--dataset ml-1m] [--jobs 2] [--max-steps 40]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from esans_eval.cli import BUDGETS
from esans_eval.completejourney import load_completejourney
from esans_eval.datasets import load_movielens
from esans_eval.experiment import run_experiment
from esans_eval.methods import METHODS

NAMES = ("UNS", "in-batch + log-q", "ESANS (paper)", "ESANS (default)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset", choices=("ml-100k", "ml-1m", "completejourney"), default="ml-1m"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=40, help="steps per epoch")
    parser.add_argument("--cache-dir", default="var/eval-cache")
    parser.add_argument("--max-users", type=int, default=None, help="only the first N users")
    parser.add_argument("--text-encoder", choices=("minilm", "hash"), default="minilm")
    args = parser.parse_args()
    budget = replace(
        BUDGETS[args.dataset if args.dataset in BUDGETS else "custom"],
        seeds=2, epochs=2, max_steps=args.max_steps, trial_epochs=1,
        sweep_kp=BUDGETS[args.dataset].sweep_kp[:1], per_positive_table=False,
        max_users=args.max_users, text_encoder=args.text_encoder,
    )  # fmt: skip
    dataset = (
        load_completejourney()
        if args.dataset == "completejourney"
        else load_movielens(args.dataset)
    )
    methods = [m for m in METHODS if m.name in NAMES]
    timings, numbers = {}, {}
    for jobs in (1, args.jobs):
        result = run_experiment(
            dataset, budget, args.cache_dir, methods=methods, log=lambda _: None, jobs=jobs
        )
        timings[jobs] = result.seconds["tuning"] + result.seconds["training"]
        numbers[jobs] = [
            [t["valid"] for t in result.tuning],
            [
                (r.method, r.seed, r.best_epoch, r.test, [e.valid for e in r.epochs])
                for r in result.runs
            ],
        ]
        steps = sum(r.steps for r in result.runs)
        print(
            f"jobs {jobs}: tuning + training {timings[jobs]:.1f} s "
            f"({len(result.tuning)} trials, {len(result.runs)} runs, {steps} run steps)",
            flush=True,
        )
    same = json.dumps(numbers[1], default=str) == json.dumps(numbers[args.jobs], default=str)
    speedup = timings[1] / timings[args.jobs]
    print(f"speed-up with {args.jobs} jobs: {speedup:.2f}x; identical numbers: {same}")
    figures = {
        "benchmark": "eval_jobs",
        "dataset": args.dataset,
        "jobs": args.jobs,
        "seconds_one_process": timings[1],
        "seconds_jobs": timings[args.jobs],
        "speedup": speedup,
        "identical": same,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
