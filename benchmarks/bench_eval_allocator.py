"""Time the paper's ESANS training step (shared and per positive) with the trainer's
allocator setting (freed memory reused, ``esans_eval.trainer_process``) against glibc's
defaults, the baseline, and the peak memory of each.

The setting is process-wide, and switching it back and forth in one process does not give
either side's behaviour (a lower trim threshold gives back what the other side kept), so each
side trains in a process of its own: ``--rounds`` pairs of processes, the sides alternating so
that a noisy neighbour slows both alike. A process trains ``--steps`` steps of each protocol in
turn on a few batches of varying pool width, then reports median step times and its peak
resident memory.

    python benchmarks/bench_eval_allocator.py [--items 68509 --batch 512 --steps 40 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from bench_eval_step import synthetic_steps

from esans_eval.methods import ESANS_PAPER
from esans_eval.trainer_process import reuse_freed_memory
from esans_eval.training import adam, train_step
from esans_eval.two_tower import TwoTower

SIDES = ("reused", "glibc default")
BATCHES = 8


def _side(args: argparse.Namespace, side: str) -> dict[str, float]:
    """One process's figures for ``side``."""
    command = [
        sys.executable, __file__, "--side", side, "--items", str(args.items),
        "--users", str(args.users), "--batch", str(args.batch), "--steps", str(args.steps),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {side} process failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _train_side(args: argparse.Namespace) -> None:
    """In the child: train with ``args.side``'s setting; print one JSON line of figures."""
    torch.set_num_threads(1)
    if args.side == "reused" and not reuse_freed_memory():
        raise SystemExit("no glibc mallopt here")
    ctx, features, batches = synthetic_steps(
        args.items, args.users, args.batch, BATCHES, [ESANS_PAPER]
    )
    runs = []
    for shared in (True, False):
        torch.manual_seed(0)
        model = TwoTower(features)
        runs.append((replace(ESANS_PAPER, shared=shared), model, adam(model, 1e-3)))
    times: list[list[float]] = [[], []]
    for number in range(args.steps + 1):
        positives, history, users, draws = batches[number % BATCHES]
        for (method, model, optimizer), samples in zip(runs, times, strict=True):
            clock = time.perf_counter()
            train_step(model, optimizer, method, ctx, positives, history, users,
                       [draws[ESANS_PAPER.name]])  # fmt: skip
            if number:  # the first step warms up
                samples.append(1e3 * (time.perf_counter() - clock))
    print(json.dumps({
        "shared_ms": float(np.median(times[0])),
        "per_positive_ms": float(np.median(times[1])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=68_509)
    parser.add_argument("--users", type=int, default=2_469)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per protocol")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        _train_side(args)
        return
    samples: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            samples[side].append(_side(args, side))
    result = {
        side: {
            "shared_ms": round(float(np.median([s["shared_ms"] for s in runs])), 2),
            "per_positive_ms": round(float(np.median([s["per_positive_ms"] for s in runs])), 2),
            "peak_rss_mb": round(max(s["peak_rss_mb"] for s in runs), 1),
        }
        for side, runs in samples.items()
    }
    reused, default = result["reused"], result["glibc default"]
    ratios = {key: round(reused[key] / default[key], 3) for key in reused}
    for side, figures in result.items():
        print(
            f"{ESANS_PAPER.name}, {side}: shared {figures['shared_ms']:.1f} ms per step, per "
            f"positive {figures['per_positive_ms']:.1f} ms, peak {figures['peak_rss_mb']:.0f} MB"
        )
    shared, own, peak = (ratios[k] for k in ("shared_ms", "per_positive_ms", "peak_rss_mb"))
    print(f"reused / default: shared {shared:.2f}x, per positive {own:.2f}x, peak {peak:.2f}x")
    print(json.dumps({"benchmark": "eval_allocator", "items": args.items, "batch": args.batch,
                      "steps": args.steps, "rounds": args.rounds, "sides": result,
                      "ratios": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
