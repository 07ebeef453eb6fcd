"""One training run: a two-tower model per (method, seed), early stopping on validation
Recall@50, test read once at the best epoch, and what the negatives looked like."""

from __future__ import annotations

import copy
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from esans_eval.budget import Budget
from esans_eval.metrics import recall_from_ranks, target_ranks
from esans_eval.negatives import FULL, Context, Method, StepStats, step_loss
from esans_eval.prepared import Prepared
from esans_eval.results import EpochStats, RunResult
from esans_eval.split import EvalSet
from esans_eval.two_tower import TwoTower
from esans_sampler.client import SamplerClient, SampleResponse

IntArray = npt.NDArray[np.int64]
KS = (50, 200)
COLD_MAX_COUNT = 2
"""A target is cold when it has at most this many training purchases / ratings."""


@dataclass(frozen=True)
class Sampling:
    """Where a method's draws come from: codebook versions by name and fine cells."""

    versions: dict[str, str]
    fine: dict[str, IntArray]


def evaluate(
    model: TwoTower | None, data: Prepared, which: str, cold: bool = False
) -> tuple[dict[int, float], dict[int, float]]:
    """Recall@50/200 on the validation or test window, every item a user already has
    masked; and (with ``cold``) Recall@K over the targets with at most
    :data:`COLD_MAX_COUNT` training events (micro-averaged over those targets).
    ``model`` None ranks by training popularity (the "most popular" reference)."""
    window: EvalSet = data.split.valid if which == "valid" else data.split.test
    hist = data.valid_hist if which == "valid" else data.test_hist
    ranks: list[IntArray] = []
    with torch.no_grad():
        if model is not None:
            model.eval()
            table = model.item_table()
        popularity = torch.as_tensor(data.popularity_percentile, dtype=torch.float32)
        for start in range(0, len(window), 256):
            part = slice(start, start + 256)
            if model is not None:
                scores = model.users(table, torch.as_tensor(hist[part]).long()) @ table.T
            else:
                scores = popularity.expand(len(window.users[part]), -1)
            ranks.append(target_ranks(scores, window.targets[part], window.history[part], max(KS)))
    if model is not None:
        model.train()
    all_ranks = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    pair_user = np.concatenate(
        [np.full(len(t), e, dtype=np.int64) for e, t in enumerate(window.targets)]
        or [np.zeros(0, dtype=np.int64)]
    )
    recall = recall_from_ranks(all_ranks, pair_user, KS)
    cold_recall: dict[int, float] = {}
    if cold:
        items = np.concatenate(window.targets or [np.zeros(0, dtype=np.int64)])
        is_cold = data.popularity[items] <= COLD_MAX_COUNT
        cold_recall = {
            k: float((all_ranks[is_cold] < k).mean()) if is_cold.any() else math.nan for k in KS
        }
    return recall, cold_recall


def _request(
    client: SamplerClient,
    method: Method,
    sampling: Sampling,
    ids: IntArray,
    seed: int,
    budget: Budget,
) -> list[SampleResponse]:
    out = []
    if method.sampler is not None:
        m_c, m_o = (budget.m_c, budget.m_o) if method.esans else (1, method.per_positive)
        version = sampling.versions[
            method.codebook
            if method.esans
            else f"pns-{method.pns_alpha}"
            if method.pns_alpha is not None
            else FULL
        ]
        out.append(
            client.sample(
                ids,
                sampler=method.sampler,
                m_c=m_c,
                m_o=m_o,
                m_h=method.m_h,
                gamma=method.gamma,
                hard_lambda=method.lam(budget.hard_lambda),
                eta=budget.eta,
                seed=seed,
                codebook_version=version,
            )
        )
    if method.uniform_extra:
        out.append(
            client.sample(
                ids,
                sampler="uniform",
                m_c=1,
                m_o=method.uniform_extra,
                m_h=0,
                seed=seed + 7_919,
                codebook_version=sampling.versions[FULL],
            )
        )
    return out


def train_run(
    data: Prepared,
    method: Method,
    sampling: Sampling,
    client: SamplerClient,
    budget: Budget,
    seed: int,
    epochs: int | None = None,
    evaluate_test: bool = True,
    position: int = 1,
    show_progress: bool = True,
) -> RunResult:
    """Train one model with ``method``'s negatives; stop early on validation Recall@50;
    evaluate the best epoch's weights on test."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = TwoTower(data.tower_inputs, dim=budget.dim)
    optimizer = adam(model, budget.learning_rate)
    rng = np.random.default_rng(seed)
    n = len(data.ex_targets)
    steps_per_epoch = -(-n // budget.batch_size)
    if budget.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, budget.max_steps)
    num_epochs = budget.epochs if epochs is None else epochs
    ctx = Context(
        num_items=data.dataset.num_items,
        fine=sampling.fine.get(method.codebook) if method.esans else None,
        log_frequency=data.log_frequency,
        train_ptr=data.train_ptr,
        train_items=data.train_items,
        temperature=budget.temperature,
        eta=budget.eta,
        hard_lambda=budget.hard_lambda,
    )
    pad = data.dataset.num_items
    history: list[EpochStats] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    hard_slots = hard_filled = steps = 0
    order = rng.permutation(n)
    cursor = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for epoch in range(num_epochs):
            clock = time.perf_counter()
            if cursor + steps_per_epoch * budget.batch_size > n:
                order, cursor = rng.permutation(n), 0
            batches = [
                order[cursor + i * budget.batch_size : cursor + (i + 1) * budget.batch_size]
                for i in range(steps_per_epoch)
            ]
            cursor += steps_per_epoch * budget.batch_size

            def request(b: int, epoch: int = epoch, batches: list[Any] = batches) -> Any:
                call_seed = seed * 1_000_003 + epoch * 10_007 + b
                ids = data.ex_targets[batches[b]]
                return _request(client, method, sampling, ids, call_seed, budget)

            pending: Future[list[SampleResponse]] = pool.submit(request, 0)
            used = np.zeros(pad, dtype=bool)
            visible = user_items = 0
            popularity_sum = popularity_n = 0.0
            bar = tqdm(
                range(len(batches)),
                desc=f"{method.name} seed {seed} epoch {epoch + 1}/{num_epochs}",
                leave=False,
                position=position,
                mininterval=2.0,
                disable=not show_progress,
            )
            for b in bar:
                responses = pending.result()
                if b + 1 < len(batches):
                    pending = pool.submit(request, b + 1)  # overlap the next RPC with training
                rows = batches[b]
                stats = train_step(
                    model, optimizer, method, ctx, data.ex_targets[rows],
                    data.ex_hist[rows].astype(np.int64), data.ex_users[rows], responses,
                )  # fmt: skip
                steps += 1
                _tally = _account(stats, data, used)
                visible += stats.visible
                user_items += stats.user_items
                popularity_sum += _tally[0]
                popularity_n += _tally[1]
                if responses and method.m_h:
                    hard_slots += responses[0].hard_ids.size
                    hard_filled += int(responses[0].hard_counts.sum())
            valid_recall, _ = evaluate(model, data, "valid")
            history.append(
                EpochStats(
                    valid=valid_recall,
                    user_item_share=user_items / max(visible, 1),
                    coverage=float(used.mean()),
                    popularity_percentile=popularity_sum / max(popularity_n, 1.0),
                    steps=len(batches),
                    seconds=time.perf_counter() - clock,
                )
            )
            if best is None or valid_recall[50] > best[0]:
                best = (valid_recall[50], epoch + 1, copy.deepcopy(model.state_dict()))
            elif epoch + 1 - best[1] >= budget.patience:
                break
    assert best is not None
    model.load_state_dict(best[2])
    test, test_cold = evaluate(model, data, "test", cold=True) if evaluate_test else ({}, {})
    return RunResult(
        method=method.name,
        seed=seed,
        epochs=history,
        best_epoch=best[1],
        valid=history[best[1] - 1].valid,
        test=test,
        test_cold=test_cold,
        hard_fill=hard_filled / hard_slots if hard_slots else math.nan,
        seconds=time.perf_counter() - started,
        steps=steps,
        protocol="shared" if method.shared else "per positive",
    )


def adam(model: TwoTower, learning_rate: float) -> torch.optim.Adam:
    """The optimiser of every run. foreach: the same updates as Adam's per-parameter loop
    (bit for bit), a few ms faster per step on CPU (benchmarks/bench_eval_step.py)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate, foreach=True)


def train_step(
    model: TwoTower,
    optimizer: torch.optim.Optimizer,
    method: Method,
    ctx: Context,
    positives: IntArray,
    history: IntArray,
    users: IntArray,
    responses: list[SampleResponse],
) -> StepStats:
    """One optimiser step on a batch: positives and users (B,), history (B, N) item ids
    padded with the catalogue size, ``responses`` the service's draws for the positives.
    The item tower runs once over the distinct items the step needs."""
    pad = ctx.num_items
    sampled = [
        np.concatenate([r.simple_ids.ravel(), r.hard_ids[r.hard_valid]]).astype(np.int64)
        for r in responses
    ]
    needed = np.unique(np.concatenate([positives, history[history < pad], *sampled]))
    emb = model.items(torch.as_tensor(needed))

    def rows_of(ids: IntArray) -> torch.Tensor:
        return torch.as_tensor(np.searchsorted(needed, ids))

    item_rows = {"positives": rows_of(positives)}
    item_rows.update({f"sampled:{k}": rows_of(s) for k, s in enumerate(sampled)})
    valid = history < pad
    user = model.users_from(
        emb[rows_of(np.where(valid, history, needed[0]))], torch.as_tensor(valid)
    )
    loss, stats = step_loss(emb, item_rows, user, method, positives, users, responses, ctx)
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return stats


def _account(stats: StepStats, data: Prepared, used: npt.NDArray[np.bool_]) -> tuple[float, int]:
    """Mark the step's negatives as used; their popularity percentile sum and count."""
    ids = stats.negative_ids
    if ids is None or not len(ids):
        return 0.0, 0
    used[ids] = True
    return float(data.popularity_percentile[ids].sum()), len(ids)
