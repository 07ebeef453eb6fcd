"""Time one training step of the evaluation's trainer (item and user towers, step loss,
backward, Adam) per method and protocol, on one core, with responses shaped as the service
draws them for a Complete Journey-sized catalogue.

Baseline, measured in the same run: the same method under the shared protocol. Per positive
was computed as the shared pool with every other row's columns masked, so it cost at least
what shared costs (more: nearly every logit was masked, and the exp of a masked logit took
the CPU's slow path); it now gathers each row's own columns. Shared steps are the paper's
protocol and are timed as they are. Last, the optimiser step alone: the runs' foreach Adam
against Adam's per-parameter loop (the same updates, bit for bit).

The process is set up as the evaluation's trainers are (one thread, freed memory reused:
``esans_eval.trainer_process``; ``bench_eval_allocator.py`` times that setting).

    python benchmarks/bench_eval_step.py [--items 68509 --batch 512 --steps 20]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from esans_eval.methods import DEFAULT_LEVERS, ESANS_PAPER
from esans_eval.negatives import Context, Method
from esans_eval.trainer_process import setup_trainer
from esans_eval.training import adam, train_step
from esans_eval.two_tower import TwoTower
from esans_sampler.client import SampleResponse

M_C, M_O, M_H, HISTORY, CELLS = 2, 5, 5, 20, 9000

METHODS = (
    ESANS_PAPER,
    Method("UNS", "uniform"),
    replace(
        Method("ESANS (default)", "esans", role="default", m_h=M_H, use_edis=True),
        log_q=True,
        mask_history=True,
        **dict(DEFAULT_LEVERS)["in-batch softmax + ESANS hard negatives"],
    ),
)


def _response(rng: np.random.Generator, items: int, batch: int, method: Method) -> SampleResponse:
    m_c, m_o, m_h = (M_C, M_O, method.m_h) if method.esans else (1, method.per_positive, 0)
    hard = rng.integers(0, items, (batch, m_h))
    counts = rng.integers(m_h // 2, m_h + 1, batch).astype(np.int32)
    hard = np.where(np.arange(m_h)[None, :] < counts[:, None], hard, -1)
    return SampleResponse(
        codebook_version="bench", sampler=method.sampler or "uniform",
        positive_primary=np.zeros(batch, np.int32), positive_secondary=np.zeros(batch, np.int32),
        simple_ids=rng.integers(0, items, (batch, m_c, m_o)),
        simple_clusters=np.zeros((batch, m_c), np.int32),
        simple_log_q=np.log(rng.uniform(1e-6, 1e-4, (batch, m_c, m_o))).astype(np.float32),
        hard_ids=hard, hard_counts=counts,
        hard_log_q=np.where(hard >= 0, np.float32(-7.0), -np.inf).astype(np.float32),
    )  # fmt: skip


Batch = tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, SampleResponse]]


def synthetic_steps(
    items: int, users: int, batch: int, steps: int, methods: Sequence[Method]
) -> tuple[Context, torch.Tensor, list[Batch]]:
    """A Complete Journey-shaped context, item features and ``steps`` batches (positives,
    histories, users, each method's draws by name), the same for every caller given its sizes."""
    rng = np.random.default_rng(0)
    per_user = rng.integers(5, 60, users)
    train_ptr = np.concatenate(([0], np.cumsum(per_user))).astype(np.int64)
    train_items = np.concatenate(
        [np.sort(rng.choice(items, k, replace=False)) for k in per_user]
    ).astype(np.int64)
    frequency = rng.pareto(1.2, items) + 1.0
    ctx = Context(
        num_items=items, fine=rng.integers(0, CELLS, items).astype(np.int64),
        log_frequency=np.log(frequency / frequency.sum()), train_ptr=train_ptr,
        train_items=train_items, temperature=0.05, eta=0.6, hard_lambda=0.1,
    )  # fmt: skip
    features = torch.randn(items, 64, generator=torch.Generator().manual_seed(0))
    batches: list[Batch] = []
    for _ in range(steps):
        user_ids = rng.integers(0, users, batch)
        history = rng.integers(0, items, (batch, HISTORY))
        history[:, : HISTORY // 4] = items  # padding
        positives = rng.integers(0, items, batch)
        draws = {m.name: _response(rng, items, batch, m) for m in methods}
        batches.append((positives, history, user_ids, draws))
    return ctx, features, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=68_509)
    parser.add_argument("--users", type=int, default=2_469)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    args = parser.parse_args()
    setup_trainer(1)
    ctx, features, batches = synthetic_steps(
        args.items, args.users, args.batch, args.steps + 1, METHODS
    )
    items, batch = args.items, args.batch
    configurations = [(method, shared) for method in METHODS for shared in (True, False)]
    models = {}
    for method, shared in configurations:
        torch.manual_seed(0)
        model = TwoTower(features)
        models[method.name, shared] = (model, adam(model, 1e-3))
    # In turn, step by step, so that a noisy neighbour slows every configuration alike.
    samples: dict[tuple[str, bool], list[float]] = {(m.name, s): [] for m, s in configurations}
    for number, (positives, history, users, draws) in enumerate(batches):
        for method, shared in configurations:
            model, optimizer = models[method.name, shared]
            clock = time.perf_counter()
            train_step(
                model, optimizer, replace(method, shared=shared), ctx, positives, history,
                users, [draws[method.name]],
            )  # fmt: skip
            if number:  # the first step warms up
                samples[method.name, shared].append(time.perf_counter() - clock)
    figures: dict[str, dict[str, float]] = {}
    for method in METHODS:
        shared_ms, own_ms = (
            1e3 * float(np.median(samples[method.name, shared])) for shared in (True, False)
        )
        figures[method.name] = {
            "shared_ms": round(shared_ms, 2),
            "per_positive_ms": round(own_ms, 2),
            "per_positive_vs_shared": round(own_ms / shared_ms, 3),
        }
        print(
            f"{method.name}: shared {shared_ms:.1f} ms per step, per positive {own_ms:.1f} ms "
            f"({own_ms / shared_ms:.2f}x of shared)"
        )
    # The optimiser alone: foreach Adam (every run's) against Adam's per-parameter loop, each
    # on its own model, with fresh gradients every step as in training.
    pairs = []
    for foreach in (True, False):
        model = TwoTower(features)
        optimiser = adam(model, 1e-3) if foreach else torch.optim.Adam(model.parameters(), lr=1e-3)
        pairs.append((model, optimiser))
    adam_ms: list[list[float]] = [[], []]
    for number in range(args.steps + 1):
        for (model, optimiser), times in zip(pairs, adam_ms, strict=True):
            for parameter in model.parameters():
                parameter.grad = torch.randn_like(parameter) * 1e-3
            clock = time.perf_counter()
            optimiser.step()
            if number:
                times.append(1e3 * (time.perf_counter() - clock))
    foreach_ms, loop_ms = (float(np.median(times)) for times in adam_ms)
    print(f"Adam step: {foreach_ms:.1f} ms foreach against {loop_ms:.1f} ms per parameter")
    figures["adam"] = {
        "foreach_ms": round(foreach_ms, 2),
        "per_parameter_ms": round(loop_ms, 2),
        "speedup": round(loop_ms / foreach_ms, 2),
    }
    print(json.dumps({"benchmark": "eval_step", "items": items, "batch": batch, "steps": figures}))


if __name__ == "__main__":
    main()
