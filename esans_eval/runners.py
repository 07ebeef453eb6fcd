"""Where the evaluation's trials and runs are trained: in this process, or (``--jobs N``) in N
worker processes at once.

A run is deterministic given its (method, seed), the prepared data and the codebooks, so it
gives the same numbers wherever it trains. Each worker prepares the data itself (from the
cache), starts its own local service and publishes the same codebooks (built or read from the
cache), then trains what it is sent with the budget's torch threads (one by default, so N
workers keep N cores busy, plus their services). Workers share nothing but the
cache directory, which they only read: the parent has built every codebook before it starts
them.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from esans_eval.budget import Budget
from esans_eval.codebooks import build_codebook, fine_cells, popularity_artifact
from esans_eval.datasets import Dataset
from esans_eval.negatives import FULL, Method
from esans_eval.prepared import Prepared, prepare
from esans_eval.results import RunResult
from esans_eval.trainer_process import setup_trainer
from esans_eval.training import Sampling, train_run
from esans_sampler.artifact import CodebookArtifact
from esans_service.harness import LocalService


@dataclass(frozen=True)
class Task:
    """One training: ``key`` names it in the progress file; ``epochs`` None = the budget's
    cap; trials skip the test split."""

    key: str
    method: Method
    seed: int
    epochs: int | None = None
    evaluate_test: bool = True


@dataclass(frozen=True)
class CodebookPlan:
    """The codebooks every method samples from: the full one at (K_p, K_s), its variants
    (ablations) and the PNS exponents served from it."""

    kp: int
    ks: int
    variants: tuple[str, ...]
    pns_alphas: tuple[float, ...]


def publish_codebooks(
    service: LocalService,
    data: Prepared,
    plan: CodebookPlan,
    budget: Budget,
    cache_dir: str | Path,
) -> tuple[Sampling, dict[str, CodebookArtifact]]:
    """Build (or read from the cache) and publish the plan's codebooks; the sampling they
    give and the MSAC artifacts by codebook name."""
    artifacts = {
        name: build_codebook(data, name, plan.kp, plan.ks, budget, cache_dir)
        for name in (FULL, *plan.variants)
    }
    versions = {name: service.publish(artifact) for name, artifact in artifacts.items()}
    fine = {name: fine_cells(artifact) for name, artifact in artifacts.items()}
    for alpha in plan.pns_alphas:
        versions[f"pns-{alpha}"] = service.publish(popularity_artifact(artifacts[FULL], alpha))
    return Sampling(versions, fine), artifacts


def local_service(budget: Budget) -> LocalService:
    """The service an evaluation samples from; every version it publishes stays loadable."""
    return LocalService(
        keep_versions=64, max_loaded_versions=16, max_batch=max(budget.batch_size, 1),
        shutdown_grace_s=0.5,
    )  # fmt: skip


class Runner(Protocol):
    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, RunResult]]:
        """Train ``tasks``; yield each with its result as it finishes."""
        ...


class InProcess:
    """Trains one task after the other, here, on the evaluation's own service."""

    def __init__(self, data: Prepared, sampling: Sampling, service: LocalService, budget: Budget):
        self._data, self._sampling, self._service, self._budget = data, sampling, service, budget

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, RunResult]]:
        for task in tasks:
            yield task, _train(self._data, self._sampling, self._service, self._budget, task)


class WorkerPool:
    """Trains up to ``jobs`` tasks at once, each worker with its own data and service."""

    def __init__(
        self, jobs: int, dataset: Dataset, budget: Budget, cache_dir: str, plan: CodebookPlan
    ) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),  # no forked torch or gRPC state
            initializer=_start_worker,
            initargs=(dataset, budget, cache_dir, plan),
        )

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, RunResult]]:
        futures: dict[Future[RunResult], Task] = {
            self._pool.submit(_train_in_worker, task): task for task in tasks
        }
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BrokenProcessPool as exc:
            self._stop_now()
            raise RuntimeError(
                "a worker process of --jobs died (its own error is printed above it); the "
                "trials and runs finished so far are in the progress file"
            ) from exc
        except BaseException:  # a failed run, Ctrl-C, or the caller giving up on the results
            self._stop_now()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _stop_now(self) -> None:
        """Stop the workers at once rather than after the tasks they have already queued
        (hours on a large catalogue). Each stops its service on SIGTERM."""
        # The executor offers no public way to end its workers before Python 3.14.
        processes = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=30)


def _train(
    data: Prepared,
    sampling: Sampling,
    service: LocalService,
    budget: Budget,
    task: Task,
    show_progress: bool = True,
) -> RunResult:
    return train_run(
        data, task.method, sampling, service.client, budget, task.seed,
        epochs=task.epochs, evaluate_test=task.evaluate_test, show_progress=show_progress,
    )  # fmt: skip


_worker: tuple[Prepared, Sampling, LocalService, Budget] | None = None
_service: LocalService | None = None
_starting_service = False
_stop_requested = False


def _start_worker(dataset: Dataset, budget: Budget, cache_dir: str, plan: CodebookPlan) -> None:
    global _worker, _service, _starting_service
    signal.signal(signal.SIGTERM, _on_sigterm)
    setup_trainer(budget.threads)
    data = prepare(dataset, budget, cache_dir, show_progress=False)
    _starting_service = True  # a SIGTERM now waits until the service is up, then stops it
    try:
        _service = local_service(budget).__enter__()
    finally:
        _starting_service = False
    atexit.register(_stop_service)  # the pool ending the worker normally
    if _stop_requested:
        _on_sigterm(signal.SIGTERM, None)
    sampling, _ = publish_codebooks(_service, data, plan, budget, cache_dir)
    _worker = (data, sampling, _service, budget)


def _stop_service() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM must not cut the stopping short
    if _service is not None:
        _service.__exit__(None, None, None)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM, the pool stopping or breaking: stop the local service and its embedded
    redis-server rather than orphan them, then exit.

    Before the service is started, exiting is enough; while it starts, the stop waits for it.
    After, the service is stopped here and the process ends with os._exit: a SystemExit
    raised in a task would be caught by the pool's worker loop (which then waits for more
    work), and a breaking pool terminates every worker a second time, which must not cut the
    stopping short (further SIGTERMs are ignored, here and in the atexit stop)."""
    global _stop_requested
    if _starting_service:
        _stop_requested = True
        return
    if _service is None:
        sys.exit(128 + signum)
    try:
        _stop_service()
    finally:
        os._exit(128 + signum)


def _train_in_worker(task: Task) -> RunResult:
    assert _worker is not None, "the worker was not started"
    return _train(*_worker, task, show_progress=False)  # the parent shows the progress
