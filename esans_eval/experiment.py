"""The experiment: codebooks published to a running service, one two-tower model per
(method, seed) trained on negatives sampled from it over gRPC, Recall@K on validation
(every epoch, for early stopping) and on test (once, at the best validation epoch).

Every method gets the same model, initialisation per seed, example order per seed, batch
size, learning rate, epoch cap and patience; only the negatives differ (see
:mod:`esans_eval.negatives`). Each method's own knob is chosen on the VALIDATION split with
the same number of trials (:mod:`esans_eval.methods`); the test split is read once per
reported run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from esans_eval.budget import Budget
from esans_eval.codebooks import build_codebook, codebook_summary, fine_cells
from esans_eval.datasets import Dataset, describe
from esans_eval.methods import DEFAULT_LEVERS, ESANS_PAPER, METHODS, TUNING
from esans_eval.negatives import (
    FULL,
    Method,
)
from esans_eval.prepared import Prepared, prepare
from esans_eval.results import ExperimentResult, Progress, RunResult, run_from_dict
from esans_eval.runners import (
    CodebookPlan,
    InProcess,
    Runner,
    Task,
    WorkerPool,
    local_service,
    publish_codebooks,
)
from esans_eval.trainer_process import setup_trainer
from esans_eval.training import COLD_MAX_COUNT, Sampling, evaluate, train_run
from esans_sampler.client import SamplerClient


def _config_key(method: Method) -> str:
    """A short digest of a method's whole configuration: a resumed run reuses a finished
    one only when it was trained with exactly this configuration."""
    return hashlib.sha256(repr(method).encode()).hexdigest()[:10]


def _trial(
    data: Prepared, method: Method, sampling: Sampling, client: SamplerClient, budget: Budget
) -> RunResult:
    return train_run(
        data,
        method,
        sampling,
        client,
        budget,
        seed=0,
        epochs=budget.trial_epochs,
        evaluate_test=False,
    )


def run_experiment(
    dataset: Dataset,
    budget: Budget,
    cache_dir: str | Path,
    methods: Sequence[Method] = METHODS,
    log: Callable[[str], None] = print,
    progress_path: str | Path | None = None,
    jobs: int = 1,
) -> ExperimentResult:
    """Tune every method on validation with the same number of trials, then train each
    chosen method for ``budget.seeds`` seeds with early stopping. Finished trials and runs
    go to ``progress_path`` (JSON lines); a rerun with the same budget picks them up. With
    ``jobs`` > 1, trials and runs (not the K_p / K_s sweep) train in that many worker
    processes at once, with the same results (:mod:`esans_eval.runners`)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")

    def cached(key: str, compute: Callable[[], RunResult]) -> RunResult:
        raw = progress.get(key)
        if raw is not None:
            return run_from_dict(raw)
        run = compute()
        progress.put(key, asdict(run))
        return run

    if progress_path is not None:
        Progress.check(progress_path, budget)  # before hours of preparation
    setup_trainer(budget.threads)
    clock = time.perf_counter()
    data = prepare(dataset, budget, cache_dir)
    progress = Progress(progress_path, budget, data.features_digest)
    if progress.stale:
        log(f"{progress.stale} finished trials / runs were trained on other features: retrained")
    split = data.split
    result = ExperimentResult(
        # The features' digest tells whether two evaluations trained on the same inputs: a
        # seed reproduces its run exactly only on identical features (the text encoder's
        # floats may differ between machines).
        dataset={**describe(data.dataset), "features_digest": data.features_digest},
        budget=asdict(budget),
        split={
            "rule": split.rule,
            "valid_users": len(split.valid),
            "valid_targets": split.valid.num_targets,
            "test_users": len(split.test),
            "test_targets": split.test.num_targets,
            "train_events": int(sum(len(s) for s in split.train)),
            "training_examples": len(data.ex_targets),
            "cold_test_targets": int(
                (data.popularity[np.concatenate(split.test.targets)] <= COLD_MAX_COUNT).sum()
            ),
        },
    )
    for which in ("valid", "test"):
        recall, cold = evaluate(None, data, which, cold=True)
        result.reference[f"most popular ({which})"] = {
            **recall,
            **{f"cold {k}": v for k, v in cold.items()},
        }
    result.seconds["prepare"] = time.perf_counter() - clock
    log(
        f"{data.dataset.name}: {data.dataset.num_items} items, {data.dataset.num_users} users, "
        f"{len(data.ex_targets)} training examples ({result.seconds['prepare']:.0f} s to prepare)"
    )
    chosen = {m.name: m for m in methods}
    # Every codebook the run publishes stays stored and loadable (pins by version).
    with local_service(budget) as service:
        clock = time.perf_counter()
        best: tuple[float, int, int] | None = None
        paper = next((m for m in methods if m.role == "paper"), ESANS_PAPER)
        grid = [(kp, ks) for kp in budget.sweep_kp for ks in budget.sweep_ks][:3]
        for kp, ks in tqdm(grid, desc="ESANS (paper): K_p/K_s on validation"):

            def sweep_trial(kp: int = kp, ks: int = ks) -> RunResult:
                artifact = build_codebook(data, FULL, kp, ks, budget, cache_dir)
                sampling = Sampling({FULL: service.publish(artifact)}, {FULL: fine_cells(artifact)})
                return _trial(data, paper, sampling, service.client, budget)

            run = cached(f"trial:{paper.name}:K_p {kp}, K_s {ks}", sweep_trial)
            result.tuning.append(
                {
                    "method": paper.name,
                    "trial": f"K_p {kp}, K_s {ks}",
                    "valid": run.valid,
                    "best_epoch": run.best_epoch,
                    "seconds": run.seconds,
                }
            )
            if best is None or run.valid[50] > best[0]:
                best = (run.valid[50], kp, ks)
        if best is None:
            raise ValueError("the K_p / K_s grid is empty")
        _, kp, ks = best
        result.kp_ks = (kp, ks)
        alphas = {m.pns_alpha for m in methods if m.pns_alpha is not None}
        alphas |= {float(o["pns_alpha"]) for _, o in TUNING.get("PNS", ()) if "pns_alpha" in o}
        plan = CodebookPlan(
            kp, ks, tuple(sorted({m.codebook for m in methods if m.esans} - {FULL})),
            tuple(sorted(alphas)),
        )  # fmt: skip
        sampling, artifacts = publish_codebooks(service, data, plan, budget, cache_dir)
        result.codebooks = {name: codebook_summary(data, a) for name, a in artifacts.items()}
        result.seconds["codebooks"] = time.perf_counter() - clock
        log(f"K_p={kp}, K_s={ks} chosen on validation ({result.seconds['codebooks']:.0f} s)")

        runner: Runner = InProcess(data, sampling, service, budget)
        pool = None
        if jobs > 1:
            pool = runner = WorkerPool(jobs, dataset, budget, str(cache_dir), plan)
        try:
            _tune_and_train(data, budget, methods, chosen, result, progress, runner, log)
        finally:
            if pool is not None:
                pool.close()
    return result


def _tune_and_train(
    data: Prepared,
    budget: Budget,
    methods: Sequence[Method],
    chosen: dict[str, Method],
    result: ExperimentResult,
    progress: Progress,
    runner: Runner,
    log: Callable[[str], None],
) -> None:
    """Every method's validation trials, then the chosen methods' runs, seed by seed."""
    clock = time.perf_counter()
    trials = [
        (method, label, replace(method, **overrides))
        for method in methods
        for label, overrides in (
            DEFAULT_LEVERS if method.role == "default" else TUNING.get(method.name, ())
        )
    ]
    tasks = [
        Task(f"trial:{method.name}:{label}", candidate, 0, budget.trial_epochs, False)
        for method, label, candidate in trials
    ]
    runs = _train_all(tasks, progress, runner, "tuning (validation)")
    scores: dict[str, tuple[float, str]] = {}
    for (method, label, candidate), run in zip(trials, runs, strict=True):
        result.tuning.append(
            {
                "method": method.name,
                "trial": label,
                "valid": run.valid,
                "best_epoch": run.best_epoch,
                "seconds": run.seconds,
                "user_item_share": run.best.user_item_share,
            }
        )
        if method.name not in scores or run.valid[50] > scores[method.name][0]:
            scores[method.name] = (run.valid[50], label)
            chosen[method.name] = candidate
    result.chosen = {name: label for name, (_, label) in scores.items()}
    result.seconds["tuning"] = time.perf_counter() - clock
    log(f"chosen on validation: {result.chosen} ({result.seconds['tuning']:.0f} s)")

    final = [chosen[m.name] for m in methods]
    if budget.per_positive_table:
        final += [
            replace(chosen[m.name], name=f"{m.name} per positive", shared=False)
            for m in methods
            if (m.role in ("paper", "default") or m.name == "UNS") and chosen[m.name].shared
        ]
    result.methods = [
        {"name": m.name, "role": m.role, "negatives": m.describe(budget.m_c, budget.m_o)}
        for m in final
    ]
    clock = time.perf_counter()
    # The main table first, seed by seed, then the ablations and the per-positive table:
    # an interrupted run has the comparisons that matter most.
    in_table = [chosen[m.name] for m in methods]
    tiers = [
        [m for m in in_table if m.role != "ablation"],
        [m for m in in_table if m.role == "ablation"],
        final[len(in_table) :],  # the per-positive table
    ]
    tasks = [
        Task(f"run:{method.name}:{seed}:{_config_key(method)}", method, seed)
        for tier in tiers
        for seed in range(budget.seeds)
        for method in tier
    ]

    def report(task: Task, run: RunResult) -> None:
        log(
            f"{task.method.name:<32} seed {task.seed}: best epoch {run.best_epoch}, valid R@50 "
            f"{run.valid[50]:.4f}, test R@50 {run.test[50]:.4f} R@200 {run.test[200]:.4f} "
            f"({run.seconds:.0f} s)"
        )

    result.runs.extend(_train_all(tasks, progress, runner, "runs (method x seed)", report))
    result.seconds["training"] = time.perf_counter() - clock


def _train_all(
    tasks: Sequence[Task],
    progress: Progress,
    runner: Runner,
    description: str,
    report: Callable[[Task, RunResult], None] | None = None,
) -> list[RunResult]:
    """Results of ``tasks`` in their order: from the progress file when recorded there,
    else trained by ``runner`` and recorded as each finishes (an interrupted evaluation
    keeps every finished one)."""
    done: dict[str, RunResult] = {}
    for task in tasks:
        raw = progress.get(task.key)
        if raw is not None:
            done[task.key] = run_from_dict(raw)
            if report is not None:
                report(task, done[task.key])
    with tqdm(total=len(tasks), initial=len(done), desc=description, position=0) as bar:
        for task, run in runner.run([t for t in tasks if t.key not in done]):
            progress.put(task.key, asdict(run))
            done[task.key] = run
            bar.update()
            if report is not None:
                report(task, run)
    return [done[task.key] for task in tasks]
