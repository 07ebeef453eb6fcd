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
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from esans_eval.budget import Budget
from esans_eval.codebooks import (
    build_codebook,
    codebook_summary,
    fine_cells,
    popularity_artifact,
)
from esans_eval.datasets import Dataset, describe
from esans_eval.methods import DEFAULT_LEVERS, ESANS_PAPER, METHODS, TUNING
from esans_eval.negatives import (
    FULL,
    Method,
)
from esans_eval.prepared import Prepared, prepare
from esans_eval.results import ExperimentResult, Progress, RunResult, run_from_dict
from esans_eval.training import COLD_MAX_COUNT, Sampling, evaluate, train_run
from esans_sampler.client import SamplerClient
from esans_service.harness import LocalService

IntArray = npt.NDArray[np.int64]


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
) -> ExperimentResult:
    """Tune every method on validation with the same number of trials, then train each
    chosen method for ``budget.seeds`` seeds with early stopping. Finished trials and runs
    go to ``progress_path`` (JSON lines); a rerun with the same budget picks them up."""

    def cached(key: str, compute: Callable[[], RunResult]) -> RunResult:
        raw = progress.get(key)
        if raw is not None:
            return run_from_dict(raw)
        run = compute()
        progress.put(key, asdict(run))
        return run

    if progress_path is not None:
        Progress.check(progress_path, budget)  # before hours of preparation
    if budget.threads is not None:
        torch.set_num_threads(budget.threads)
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
    with LocalService(
        keep_versions=64, max_loaded_versions=16, max_batch=max(budget.batch_size, 1),
        shutdown_grace_s=0.5,
    ) as service:  # fmt: skip
        clock = time.perf_counter()
        versions: dict[str, str] = {}
        fine: dict[str, IntArray] = {}
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
        full = build_codebook(data, FULL, kp, ks, budget, cache_dir)
        result.kp_ks = (kp, ks)
        versions[FULL], fine[FULL] = service.publish(full), fine_cells(full)
        result.codebooks[FULL] = codebook_summary(data, full)
        for variant in sorted({m.codebook for m in methods if m.esans} - {FULL}):
            artifact = build_codebook(data, variant, kp, ks, budget, cache_dir)
            versions[variant], fine[variant] = service.publish(artifact), fine_cells(artifact)
            result.codebooks[variant] = codebook_summary(data, artifact)
        alphas = {m.pns_alpha for m in methods if m.pns_alpha is not None}
        alphas |= {float(o["pns_alpha"]) for _, o in TUNING.get("PNS", ()) if "pns_alpha" in o}
        for alpha in sorted(alphas):
            versions[f"pns-{alpha}"] = service.publish(popularity_artifact(full, alpha))
        sampling = Sampling(versions, fine)
        result.seconds["codebooks"] = time.perf_counter() - clock
        log(f"K_p={kp}, K_s={ks} chosen on validation ({result.seconds['codebooks']:.0f} s)")

        clock = time.perf_counter()
        trials = [
            (method, label, overrides)
            for method in methods
            for label, overrides in (
                DEFAULT_LEVERS if method.role == "default" else TUNING.get(method.name, ())
            )
        ]
        scores: dict[str, tuple[float, str]] = {}
        for method, label, overrides in tqdm(trials, desc="tuning (validation)", position=0):
            candidate = replace(method, **overrides)
            run = cached(
                f"trial:{method.name}:{label}",
                partial(_trial, data, candidate, sampling, service.client, budget),
            )
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
        jobs = [(seed, m) for tier in tiers for seed in range(budget.seeds) for m in tier]
        for seed, method in tqdm(jobs, desc="runs (method x seed)", position=0):
            run = cached(
                f"run:{method.name}:{seed}:{_config_key(method)}",
                partial(train_run, data, method, sampling, service.client, budget, seed),
            )
            result.runs.append(run)
            log(
                f"{method.name:<32} seed {seed}: best epoch {run.best_epoch}, valid R@50 "
                f"{run.valid[50]:.4f}, test R@50 {run.test[50]:.4f} R@200 {run.test[200]:.4f} "
                f"({run.seconds:.0f} s)"
            )
        result.seconds["training"] = time.perf_counter() - clock
    return result
