"""How long the evaluation trains: time its step configurations, then project a full run.

``--time``: trains every configuration the evaluation uses (method x protocol, the product
default's trials included) for ``--steps`` steps of one epoch on the real prepared data and
writes one JSON line each to ``--out``: seconds spent in steps and in the epoch's validation
pass. Run it once per code revision to compare, e.g. the current one and an older checkout
through PYTHONPATH (this script only uses what older revisions also have):

    .venv/bin/python scripts/time_eval_steps.py --time --dataset ml-1m --out var/steps-new.jsonl
    git worktree add /tmp/old <revision>
    PYTHONPATH=/tmp/old .venv/bin/python scripts/time_eval_steps.py --time --dataset ml-1m \\
        --out var/steps-old.jsonl

``--project OLD NEW``: scales every epoch recorded in ``docs/results-<dataset>.progress.jsonl``
(trained with the OLD code) by NEW / OLD step time of its configuration, the validation pass
kept as it is, and prints the recorded and projected hours of trainer time per dataset. Each
timing is one process on a shared machine: time both revisions back to back, and more than once.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from esans_eval.cli import BUDGETS
from esans_eval.codebooks import build_codebook, fine_cells
from esans_eval.completejourney import load_completejourney
from esans_eval.datasets import load_movielens
from esans_eval.methods import DEFAULT_LEVERS, METHODS
from esans_eval.negatives import FULL, Method
from esans_eval.prepared import prepare
from esans_eval.training import Sampling, evaluate, train_run
from esans_eval.two_tower import TwoTower
from esans_service.harness import LocalService

try:
    from esans_eval.trainer_process import setup_trainer
except ImportError:  # a revision before it: its trainers only set torch's threads

    def setup_trainer(threads: int | None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)


DATASETS = ("completejourney", "ml-1m")


def configurations() -> dict[str, Method]:
    """The evaluation's step configurations by name. Baselines that sample a few negatives
    per positive stand for each other (UNS for PNS, in-batch for debiased MNS), and the
    paper's ESANS for its ablations and the default's first trial (the same pool)."""
    by_name = {m.name: m for m in METHODS}
    default = next(m for m in METHODS if m.role == "default")
    found = {
        "UNS": by_name["UNS"],
        "UNS per positive": replace(by_name["UNS"], shared=False),
        "in-batch + log-q": by_name["in-batch + log-q"],
        "ESANS (paper)": by_name["ESANS (paper)"],
        "ESANS (paper) per positive": replace(by_name["ESANS (paper)"], shared=False),
    }
    for label, lever in DEFAULT_LEVERS[1:]:
        found[f"default: {label}"] = replace(default, **lever)
    return found


def configuration_of(key: str, method: str, chosen: dict[str, str]) -> str:
    """Which configuration a progress line (``key``, ``method``) trained."""
    per_positive = method.endswith(" per positive")
    base = method.removesuffix(" per positive")
    if base in ("UNS", "PNS"):
        return "UNS per positive" if per_positive else "UNS"
    if base in ("debiased MNS", "in-batch + log-q"):
        return "in-batch + log-q"
    if base == "ESANS (default)":
        trial = key.split(":", 2)[2] if key.startswith("trial:") else chosen[base]
        own = "in-batch softmax + each row's own ESANS hard negatives"
        if per_positive or trial == own:
            return f"default: {own}"
        if trial == "in-batch softmax + ESANS hard negatives":
            return f"default: {trial}"
    return "ESANS (paper) per positive" if per_positive else "ESANS (paper)"


def time_steps(
    dataset: str, steps: int, cache_dir: str, out: Path, only: list[str] | None = None
) -> None:
    budget = replace(BUDGETS[dataset], max_steps=steps)
    setup_trainer(budget.threads)
    data = prepare(
        load_completejourney() if dataset == "completejourney" else load_movielens("ml-1m"),
        budget, cache_dir,
    )  # fmt: skip
    kp, ks = json.loads(Path(f"docs/results-{dataset}.json").read_text())["kp_ks"]
    with LocalService(max_batch=budget.batch_size, shutdown_grace_s=0.5) as service:
        artifact = build_codebook(data, FULL, kp, ks, budget, cache_dir)
        sampling = Sampling({FULL: service.publish(artifact)}, {FULL: fine_cells(artifact)})
        torch.manual_seed(0)
        model = TwoTower(data.tower_inputs, dim=budget.dim)
        evaluate(model, data, "valid")  # warm-up
        clock = time.perf_counter()
        evaluate(model, data, "valid")
        validation = time.perf_counter() - clock
        chosen = {k: m for k, m in configurations().items() if only is None or k in only}
        if only and len(chosen) < len(set(only)):
            raise SystemExit(f"unknown configuration in {only}; known: {list(configurations())}")
        for name, method in chosen.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            run = train_run(
                data, method, sampling, service.client, budget, seed=0, epochs=1,
                evaluate_test=False, show_progress=False,
            )  # fmt: skip
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            step_seconds = (run.epochs[0].seconds - validation) / run.steps
            record = {
                "dataset": dataset,
                "configuration": name,
                "step_seconds": step_seconds,
                "validation_seconds": validation,
                # pages the process faulted in per step (the validation pass's included)
                "page_faults_per_step": faults / run.steps,
            }
            with out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(
                f"{dataset} {name}: {step_seconds * 1e3:.0f} ms per step, "
                f"{faults / run.steps:.0f} page faults per step",
                flush=True,
            )


def project(old_path: Path, new_path: Path) -> None:
    def read(path: Path) -> dict[tuple[str, str], dict[str, float]]:
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        return {(r["dataset"], r["configuration"]): r for r in lines}

    old, new = read(old_path), read(new_path)
    total_old = total_new = 0.0
    for dataset in DATASETS:
        report = json.loads(Path(f"docs/results-{dataset}.json").read_text())
        recorded = projected = 0.0
        progress = Path(f"docs/results-{dataset}.progress.jsonl").read_text().splitlines()
        for line in progress:
            entry: dict[str, Any] = json.loads(line)
            if "key" not in entry:
                continue
            value = entry["value"]
            name = configuration_of(entry["key"], value["method"], report["chosen"])
            before, after = old[dataset, name], new[dataset, name]
            ratio = after["step_seconds"] / before["step_seconds"]
            validation = before["validation_seconds"]
            for epoch in value["epochs"]:
                steps = max(epoch["seconds"] - validation, 0.0)
                recorded += epoch["seconds"]
                projected += epoch["seconds"] - steps + steps * ratio
        print(
            f"{dataset}: recorded {recorded / 3600:.2f} h of trainer time, projected "
            f"{projected / 3600:.2f} h ({recorded / projected:.2f}x)"
        )
        total_old, total_new = total_old + recorded, total_new + projected
    print(
        f"both: recorded {total_old / 3600:.2f} h, projected {total_new / 3600:.2f} h "
        f"({total_old / total_new:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--time", action="store_true", help="time the configurations")
    mode.add_argument("--project", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument("--dataset", choices=DATASETS, action="append")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--configuration", action="append", help="time only this one (repeatable; --time)"
    )
    parser.add_argument("--cache-dir", default="var/eval-cache")
    parser.add_argument("--out", type=Path, default=Path("var/eval-steps.jsonl"))
    args = parser.parse_args()
    if args.project:
        project(*args.project)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for dataset in args.dataset or DATASETS:
        time_steps(dataset, args.steps, args.cache_dir, args.out, args.configuration)


if __name__ == "__main__":
    main()
