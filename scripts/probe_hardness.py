"""Does more hardness help the product default at convergence? A validation-only probe.

The product default (in-batch softmax with log q plus ESANS hard negatives from each
positive's cluster, each row's own training items masked) leads the in-batch baseline after one
epoch and ties it once both are trained to their best epoch. This probe trains the default with
other numbers of hard negatives per positive (m_h) on MovieLens-1M, seed 0, with the
evaluation's budget and early stopping, and reads the VALIDATION split only: nothing here is a
reported result, and the test split is never touched. ``--lever`` is one of the default's
validation trials (``esans_eval.methods.DEFAULT_LEVERS``; by default the one the evaluation
chose, read from ``docs/results-ml-1m.json``). Each finished run is one JSON line in ``--out``
(a rerun skips those already there).

    .venv/bin/python scripts/probe_hardness.py --m-h 5 2 10 20
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from esans_eval.cli import BUDGETS
from esans_eval.codebooks import build_codebook, fine_cells
from esans_eval.datasets import load_movielens
from esans_eval.methods import DEFAULT_LEVERS, METHODS
from esans_eval.negatives import FULL
from esans_eval.prepared import prepare
from esans_eval.training import Sampling, train_run
from esans_service.harness import LocalService


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--m-h", type=int, nargs="+", default=[2, 10, 20])
    parser.add_argument("--kp", type=int, default=16, help="K_p (the evaluation chose 16)")
    parser.add_argument("--ks", type=int, default=8, help="K_s (the evaluation chose 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lever", default=None, help="a DEFAULT_LEVERS label (default: chosen)")
    parser.add_argument("--report", type=Path, default=Path("docs/results-ml-1m.json"))
    parser.add_argument("--cache-dir", default="var/eval-cache")
    parser.add_argument("--out", type=Path, default=Path("docs/probe-hardness-ml-1m.jsonl"))
    args = parser.parse_args()

    budget = BUDGETS["ml-1m"]
    if budget.threads is not None:
        torch.set_num_threads(budget.threads)  # as the evaluation trains
    data = prepare(load_movielens("ml-1m"), budget, args.cache_dir)
    default = next(m for m in METHODS if m.role == "default")
    lever = args.lever or json.loads(args.report.read_text())["chosen"][default.name]
    chosen = replace(default, **dict(DEFAULT_LEVERS)[lever])
    done = set()
    if args.out.exists():
        lines = [json.loads(line) for line in args.out.read_text().splitlines() if line]
        done = {r["m_h"] for r in lines if r["lever"] == lever}
    with LocalService(max_batch=budget.batch_size, shutdown_grace_s=0.5) as service:
        artifact = build_codebook(data, FULL, args.kp, args.ks, budget, args.cache_dir)
        sampling = Sampling({FULL: service.publish(artifact)}, {FULL: fine_cells(artifact)})
        for m_h in args.m_h:
            if m_h in done:
                continue
            method = replace(chosen, name=f"ESANS (default), m_h {m_h}", role="probe", m_h=m_h)
            run = train_run(
                data, method, sampling, service.client, budget, args.seed, evaluate_test=False
            )
            record = {
                "lever": lever,
                "m_h": m_h,
                "seed": args.seed,
                "best_epoch": run.best_epoch,
                "valid": run.valid,
                "valid_per_epoch": [epoch.valid for epoch in run.epochs],
                "seconds": run.seconds,
            }
            with args.out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(f"{lever}, m_h {m_h}: best epoch {run.best_epoch}, R@50 {run.valid[50]:.4f}")


if __name__ == "__main__":
    main()
