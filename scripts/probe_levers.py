"""Which lever would make the product default beat in-batch + log-q? A validation-only probe.

Trains the product default (its chosen validation trial, read from ``docs/results-<dataset>.json``)
with one lever changed at a time, and the in-batch + log-q baseline as it was chosen, with the
evaluation's budget and early stopping, for the given seeds. Only the VALIDATION split is read:
nothing here is a reported result and the test split is never touched. Each finished run is one
JSON line in ``--out`` with its whole validation curve (a rerun skips those already there), so
the noise of a curve (epoch to epoch) and of a seed can be read next to each lever's effect.

    .venv/bin/python scripts/probe_levers.py --dataset completejourney --seeds 0 1
    .venv/bin/python scripts/probe_levers.py --dataset completejourney --seeds 0 1
        --levers "as chosen" "no EDIS" --learning-rate 0.001   (one command)
    .venv/bin/python scripts/probe_levers.py --dataset completejourney --summary
    .venv/bin/python scripts/probe_levers.py --dataset completejourney --seeds 0 1 --levers
        --baselines UNS "ESANS (paper)" --learning-rate 0.001   (methods as chosen, no lever)

``--learning-rate`` trains every candidate with another learning rate (recorded per run).
``--trial`` starts from another of the default's validation trials than the chosen one (its
runs are labelled with it). The number of hard negatives on MovieLens-1M, with each row's own
and with shared hard negatives (``docs/probe-hardness-ml-1m.jsonl``, written by an earlier
form of this probe):

    .venv/bin/python scripts/probe_levers.py --dataset ml-1m --levers "m_h 2" "m_h 10" "m_h 20"
    .venv/bin/python scripts/probe_levers.py --dataset ml-1m --levers "m_h 2" "m_h 10" "m_h 20"
        --trial "in-batch softmax + ESANS hard negatives"   (one command)
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from esans_eval.cli import BUDGETS
from esans_eval.codebooks import build_codebook, fine_cells
from esans_eval.completejourney import load_completejourney
from esans_eval.datasets import load_movielens
from esans_eval.methods import DEFAULT_LEVERS, METHODS, TUNING
from esans_eval.negatives import FULL, Method
from esans_eval.prepared import prepare
from esans_eval.trainer_process import setup_trainer
from esans_eval.training import Sampling, train_run
from esans_sampler.client import SampleResponse
from esans_service.harness import LocalService

LEVERS: dict[str, dict[str, Any]] = {
    "as chosen": {},
    "+ 10 uniform (coverage)": {"uniform_extra": 10},
    "no EDIS": {"use_edis": False},
    "m_h 2": {"m_h": 2},
    "m_h 10": {"m_h": 10},
    "m_h 20": {"m_h": 20},
    "hard negatives log-q corrected": {"correct_drawn": True},
    "+ ESANS simple negatives, uncorrected": {"simple_negatives": True},
    "gamma 4 (sharper cluster choice)": {"simple_negatives": True, "gamma": 4.0},
    "lambda 0.5 (harder virtual negatives)": {"hard_lambda": 0.5},
}
"""One change each to the product default's chosen trial (with :data:`POPULAR_HARD`)."""

POPULAR_HARD = {
    "hard negatives by popularity (alpha 1)": 1.0,
    "hard negatives by popularity (alpha 0.5)": 0.5,
}
"""Levers the service does not serve (yet): the trainer redraws each positive's hard negatives
from its primary cluster less its fine cell, with probability proportional to (training count
+ 1) ** alpha, instead of uniformly. In-batch negatives are popular items, and the items that
compete for a top-50 are popular too; uniform same-cluster negatives are mostly rare items."""
LEVERS.update({label: {} for label in POPULAR_HARD})

REFERENCES = ("in-batch + log-q", "UNS", "debiased MNS", "ESANS (paper)")
"""Methods ``--baselines`` can train as the evaluation chose them (those that sample from
the full codebook this probe publishes)."""


class PopularHardNegatives:
    """A client whose ESANS answers carry popularity-weighted hard negatives (see
    :data:`POPULAR_HARD`); everything else is the service's answer."""

    def __init__(
        self, client: Any, fine: npt.NDArray[np.int64], num_secondary: int,
        counts: npt.NDArray[np.float64], alpha: float,
    ) -> None:  # fmt: skip
        self._client = client
        self._fine = fine
        self._num_secondary = num_secondary
        primary = fine // num_secondary
        self._weight = (counts + 1.0) ** alpha
        self._order = np.argsort(primary, kind="stable")
        self._cumulative = np.concatenate(([0.0], np.cumsum(self._weight[self._order])))
        bounds = np.searchsorted(primary[self._order], np.arange(primary.max() + 2))
        self._start = bounds[primary]
        self._primary_total = self._cumulative[bounds[primary + 1]] - self._cumulative[self._start]

    def sample(self, ids: npt.NDArray[np.int64], **kwargs: Any) -> SampleResponse:
        response: SampleResponse = self._client.sample(ids, **kwargs)
        m_h = response.hard_ids.shape[1]
        if kwargs.get("sampler") != "esans" or not m_h:
            return response
        rng = np.random.default_rng(kwargs.get("seed"))
        tries = 32 * m_h
        lo = self._cumulative[self._start[ids]][:, None]
        width = self._primary_total[ids][:, None]
        points = lo + rng.random((len(ids), tries)) * width
        slots = np.searchsorted(self._cumulative, points, side="right") - 1
        drawn = self._order[np.clip(slots, 0, len(self._order) - 1)]
        ok = self._fine[drawn] != self._fine[ids][:, None]
        rank = np.cumsum(ok, axis=1) - 1
        hard = np.full((len(ids), m_h), -1, dtype=np.int64)
        rows, cols = np.nonzero(ok & (rank < m_h))
        hard[rows, rank[rows, cols]] = drawn[rows, cols]
        counts = (hard >= 0).sum(axis=1).astype(np.int32)
        log_q = np.where(
            hard >= 0, np.log(self._weight[np.maximum(hard, 0)] / width), -np.inf
        ).astype(np.float32)
        secondary = np.where(hard >= 0, self._fine[np.maximum(hard, 0)] % self._num_secondary, -1)
        return replace(
            response, hard_ids=hard, hard_counts=counts, hard_log_q=log_q,
            hard_secondary=secondary.astype(np.int32),
        )  # fmt: skip


def summary(path: Path, learning_rate: float) -> str:
    """A markdown table of a probe's runs: validation R@50 per seed and its mean, the best
    epoch, and how much the curve moves from one epoch to the next (its noise).
    ``learning_rate``: of the records that do not say theirs (the budget's)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [
        "| lever | learning rate | seeds | valid R@50 per seed | mean | best epoch | "
        "mean \\|change\\| per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in records:
        key = (record["lever"], record.get("learning_rate", learning_rate))
        groups.setdefault(key, []).append(record)
    for (lever, lr), runs in groups.items():
        runs.sort(key=lambda r: r["seed"])
        best = [r["valid"]["50"] for r in runs]
        moves = [
            abs(b["50"] - a["50"])
            for r in runs
            for a, b in zip(r["valid_per_epoch"], r["valid_per_epoch"][1:], strict=False)
        ]
        rows.append(
            f"| {lever} | {lr:g} | {len(runs)} | "
            + " / ".join(f"{v:.4f}" for v in best)
            + f" | {np.mean(best):.4f} | {'/'.join(str(r['best_epoch']) for r in runs)} | "
            + f"{np.mean(moves) if moves else math.nan:.4f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataset", choices=("completejourney", "ml-1m"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--levers", nargs="*", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument(
        "--baselines",
        nargs="*",
        default=["in-batch + log-q"],
        choices=list(REFERENCES),
        help="methods trained as the evaluation chose them, beside the levers",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="for every candidate (default: the budget's)",
    )
    parser.add_argument("--cache-dir", default="var/eval-cache")
    parser.add_argument("--out", type=Path, default=None, help="docs/probe-levers-<dataset>.jsonl")
    parser.add_argument(
        "--summary", action="store_true", help="only print the table of --out, no training"
    )
    parser.add_argument(
        "--trial",
        default=None,
        choices=[label for label, _ in DEFAULT_LEVERS],
        help="the default's validation trial to start from (default: the one chosen)",
    )
    args = parser.parse_args()
    if args.summary:
        path = args.out or Path(f"docs/probe-levers-{args.dataset}.jsonl")
        print(summary(path, BUDGETS[args.dataset].learning_rate))
        return

    report = json.loads(Path(f"docs/results-{args.dataset}.json").read_text())
    out = args.out or Path(f"docs/probe-levers-{args.dataset}.jsonl")
    budget = BUDGETS[args.dataset]
    if args.learning_rate is not None:
        budget = replace(budget, learning_rate=args.learning_rate)
    setup_trainer(budget.threads)  # as the evaluation trains
    dataset = (
        load_completejourney() if args.dataset == "completejourney" else load_movielens("ml-1m")
    )
    data = prepare(dataset, budget, args.cache_dir)
    by_name = {m.name: m for m in METHODS}
    default = next(m for m in METHODS if m.role == "default")
    trial = args.trial or report["chosen"][default.name]
    chosen_default = replace(default, **dict(DEFAULT_LEVERS)[trial])
    suffix = "" if trial == report["chosen"][default.name] else f" ({trial})"
    # (label of the runs, lever, method); a reference method is no lever
    candidates: list[tuple[str, str | None, Method]] = []
    for name in args.baselines:
        method = by_name[name]
        if name in TUNING:
            method = replace(method, **dict(TUNING[name])[report["chosen"][name]])
        candidates.append((f"{name} (as chosen)", None, method))
    candidates += [
        (
            label + suffix,
            label,
            replace(chosen_default, name=f"default, {label}", role="probe", **LEVERS[label]),
        )
        for label in args.levers
    ]
    done: set[tuple[str, int]] = set()
    if out.exists():
        lines = [json.loads(line) for line in out.read_text().splitlines() if line]
        done = {
            (r["lever"], r["seed"])
            for r in lines
            if r.get("learning_rate", BUDGETS[args.dataset].learning_rate) == budget.learning_rate
        }
    kp, ks = report["kp_ks"]
    with LocalService(max_batch=budget.batch_size, shutdown_grace_s=0.5) as service:
        artifact = build_codebook(data, FULL, kp, ks, budget, args.cache_dir)
        sampling = Sampling({FULL: service.publish(artifact)}, {FULL: fine_cells(artifact)})
        for seed in args.seeds:
            for label, lever, method in candidates:
                if (label, seed) in done:
                    continue
                client: Any = service.client
                if lever in POPULAR_HARD:
                    client = PopularHardNegatives(
                        client, sampling.fine[FULL], ks, data.popularity.astype(np.float64),
                        POPULAR_HARD[lever],
                    )  # fmt: skip
                run = train_run(data, method, sampling, client, budget, seed, evaluate_test=False)
                record = {
                    "lever": label,
                    "learning_rate": budget.learning_rate,
                    "method": method.describe(budget.m_c, budget.m_o),
                    "seed": seed,
                    "best_epoch": run.best_epoch,
                    "valid": run.valid,
                    "valid_per_epoch": [epoch.valid for epoch in run.epochs],
                    "user_item_share": [epoch.user_item_share for epoch in run.epochs],
                    "coverage": [epoch.coverage for epoch in run.epochs],
                    "popularity_percentile": [e.popularity_percentile for e in run.epochs],
                    "hard_fill": run.hard_fill,
                    "seconds": run.seconds,
                }
                with out.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(
                    f"seed {seed} {label}: best epoch {run.best_epoch}, "
                    f"valid R@50 {run.valid[50]:.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
