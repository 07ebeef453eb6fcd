"""Per-batch latency of ESANS sampling against a per-positive Python loop and UNS.

Defaults: a 1M-item catalogue with random codes (K_p = 300, K_s = 15, random codewords),
B = 512, m_c = 2, m_o = 5, m_h = 5, on one core. Each timed call returns ids and log-q.
Two per-positive loops implement the same rules, one with the ``random`` module (the fast
pure-Python way) and one with numpy calls per positive; both are measured in the same
run. Target: ESANS <= 0.2 ms per batch and >= 50x faster than the loop.

    python benchmarks/bench_sampler.py [--items N] [--batch B] [--repeats R] [--pin-cpu C]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from esans_sampler.baselines import UniformSampler  # noqa: E402
from esans_sampler.cluster_choice import AliasTable, cluster_choice_matrix  # noqa: E402
from esans_sampler.cluster_index import ClusterIndex  # noqa: E402
from esans_sampler.sampler import EsansSampler  # noqa: E402


@dataclass(frozen=True)
class Timing:
    name: str
    median_ms: float
    p99_ms: float
    repeats: int


class LoopSampler:
    """The same ESANS rules written the straightforward way: one positive at a time."""

    def __init__(self, index: ClusterIndex, matrix: npt.NDArray[np.float64]) -> None:
        self.row_of = {int(i): r for r, i in enumerate(index.item_ids.tolist())}
        self.primary = index.primary.tolist()
        self.secondary = index.secondary.tolist()
        self.num_secondary = index.num_secondary
        self.cluster_offsets = index.cluster_offsets.tolist()
        self.fine_offsets = index.fine_offsets.tolist()
        self.ordered_ids = index.ordered_ids.tolist()
        self.clusters = list(range(index.num_primary))
        self.cum_weights = [np.cumsum(row).tolist() for row in matrix]
        self.log_p = np.log(np.where(matrix > 0, matrix, 1.0)).tolist()

    def sample(
        self, positive_ids: Sequence[int], rnd: random.Random, m_c: int, m_o: int, m_h: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        simple_ids: list[int] = []
        simple_log_q: list[float] = []
        hard_ids: list[int] = []
        for item in positive_ids:
            row = self.row_of[item]
            p, s = self.primary[row], self.secondary[row]
            for c in rnd.choices(self.clusters, cum_weights=self.cum_weights[p], k=m_c):
                lo, hi = self.cluster_offsets[c], self.cluster_offsets[c + 1]
                log_q = self.log_p[p][c] - math.log(hi - lo)
                for _ in range(m_o):
                    simple_ids.append(self.ordered_ids[lo + rnd.randrange(hi - lo)])
                    simple_log_q.append(log_q)
            lo, hi = self.cluster_offsets[p], self.cluster_offsets[p + 1]
            cell_lo = self.fine_offsets[p * self.num_secondary + s]
            cell_hi = self.fine_offsets[p * self.num_secondary + s + 1]
            available = (hi - lo) - (cell_hi - cell_lo)
            picks = rnd.sample(range(available), min(m_h, available))
            row_hard = [
                self.ordered_ids[lo + k if lo + k < cell_lo else cell_hi + (lo + k - cell_lo)]
                for k in picks
            ]
            hard_ids.extend(row_hard + [-1] * (m_h - len(row_hard)))
        b = len(positive_ids)
        return (
            np.array(simple_ids, dtype=np.int64).reshape(b, -1, m_o),
            np.array(simple_log_q, dtype=np.float32).reshape(b, -1, m_o),
            np.array(hard_ids, dtype=np.int64).reshape(b, m_h),
        )


class NumpyLoopSampler(LoopSampler):
    """The same rules one positive at a time with numpy calls per positive and cluster."""

    def __init__(self, index: ClusterIndex, matrix: npt.NDArray[np.float64]) -> None:
        super().__init__(index, matrix)
        self.matrix = matrix
        self.index = index

    def sample_np(
        self, positive_ids: Sequence[int], rng: np.random.Generator, m_c: int, m_o: int, m_h: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        index = self.index
        b = len(positive_ids)
        simple_ids = np.empty((b, m_c, m_o), dtype=np.int64)
        simple_log_q = np.empty((b, m_c, m_o), dtype=np.float32)
        hard_ids = np.full((b, m_h), -1, dtype=np.int64)
        for i, item in enumerate(positive_ids):
            row = self.row_of[item]
            p, s = self.primary[row], self.secondary[row]
            clusters = rng.choice(index.num_primary, size=m_c, p=self.matrix[p])
            for j, c in enumerate(clusters):
                lo, hi = index.cluster_offsets[c], index.cluster_offsets[c + 1]
                simple_ids[i, j] = index.ordered_ids[lo + rng.integers(0, hi - lo, m_o)]
                simple_log_q[i, j] = np.log(self.matrix[p, c]) - np.log(hi - lo)
            lo, hi = index.cluster_offsets[p], index.cluster_offsets[p + 1]
            fine = p * self.num_secondary + s
            cell_lo, cell_hi = index.fine_offsets[fine], index.fine_offsets[fine + 1]
            available = int((hi - lo) - (cell_hi - cell_lo))
            picks = rng.choice(available, size=min(m_h, available), replace=False)
            position = lo + picks + np.where(lo + picks >= cell_lo, cell_hi - cell_lo, 0)
            hard_ids[i, : picks.size] = index.ordered_ids[position]
        return simple_ids, simple_log_q, hard_ids


def random_index(
    rng: np.random.Generator, n: int, num_primary: int, num_secondary: int
) -> ClusterIndex:
    """A catalogue of ``n`` items with random codes (the benchmarks' common fixture)."""
    return ClusterIndex.build(
        rng.permutation(n).astype(np.int64) + 10_000_000,
        rng.integers(0, num_primary, n),
        rng.integers(0, num_secondary, n),
        num_primary,
        num_secondary,
    )


def _time(name: str, call: Callable[[int], object], repeats: int, warmup: int) -> Timing:
    for i in range(warmup):
        call(i)
    samples = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter_ns()
        call(i)
        samples[i] = time.perf_counter_ns() - start
    ms = samples / 1e6
    return Timing(name, float(np.median(ms)), float(np.percentile(ms, 99)), repeats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--primary", type=int, default=300)
    parser.add_argument("--secondary", type=int, default=15)
    parser.add_argument("--dim", type=int, default=64, help="codeword width")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--m-c", type=int, default=2)
    parser.add_argument("--m-o", type=int, default=5)
    parser.add_argument("--m-h", type=int, default=5)
    parser.add_argument("--gamma", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3000, help="timed ESANS/UNS batches")
    parser.add_argument("--loop-repeats", type=int, default=30, help="timed loop batches")
    parser.add_argument("--pin-cpu", type=int, default=None, help="pin to this CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})

    rng = np.random.default_rng(args.seed)
    n = args.items
    build_start = time.perf_counter()
    index = random_index(rng, n, args.primary, args.secondary)
    esans = EsansSampler(index, rng.normal(size=(args.primary, args.dim)), gamma=args.gamma)
    uniform = UniformSampler(index)
    loop = NumpyLoopSampler(index, esans.cluster_choice())
    setup_s = time.perf_counter() - build_start
    batches = [rng.choice(index.item_ids, args.batch) for _ in range(64)]
    batch_lists = [b.tolist() for b in batches]
    sizes = (args.m_c, args.m_o, args.m_h)
    draw_rng = np.random.default_rng(args.seed + 1)
    loop_rng = random.Random(args.seed + 1)
    loop_np_rng = np.random.default_rng(args.seed + 1)

    timings = [
        _time(
            "esans (vectorised)",
            lambda i: esans.sample(batches[i % 64], draw_rng, *sizes),
            args.repeats,
            warmup=50,
        ),
        _time(
            "esans (loop, random module)",
            lambda i: loop.sample(batch_lists[i % 64], loop_rng, *sizes),
            args.loop_repeats,
            warmup=2,
        ),
        _time(
            "esans (loop, numpy calls)",
            lambda i: loop.sample_np(batch_lists[i % 64], loop_np_rng, *sizes),
            args.loop_repeats,
            warmup=2,
        ),
        _time(
            "uniform (UNS)",
            lambda i: uniform.sample(batches[i % 64], draw_rng, *sizes),
            args.repeats,
            warmup=50,
        ),
    ]

    print(
        f"catalogue N={n:,} K_p={args.primary} K_s={args.secondary}  "
        f"B={args.batch} m_c={args.m_c} m_o={args.m_o} m_h={args.m_h} gamma={args.gamma}"
    )
    print(
        f"numpy {np.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, one thread; setup {setup_s:.2f} s"
    )
    print(f"{'sampler':28s} {'median ms':>10s} {'p99 ms':>10s} {'repeats':>8s}")
    for t in timings:
        print(f"{t.name:28s} {t.median_ms:10.3f} {t.p99_ms:10.3f} {t.repeats:8d}")
    vectorised, looped, looped_np, uns = timings
    per_positive_us = vectorised.median_ms * 1e3 / args.batch
    print(f"esans per positive: {per_positive_us:.3f} us")
    for loop_timing in (looped, looped_np):
        ratio = loop_timing.median_ms / vectorised.median_ms
        print(f"speed-up over {loop_timing.name} (median): {ratio:.0f}x")
    print(f"esans / uniform (median): {vectorised.median_ms / uns.median_ms:.2f}")
    target = "met" if vectorised.median_ms <= 0.2 else "MISSED"
    print(f"target <= 0.2 ms per batch: {target}")
    alias = _alias_build_ms(rng, args.primary)
    target = "met" if alias <= 100 else "MISSED"
    print(
        f"alias table of K_p={args.primary} rows, best of 3: {alias:.1f} ms (<= 100 ms: {target})"
    )
    print(
        json.dumps(
            {
                "benchmark": "sampler",
                "esans_ms": vectorised.median_ms,
                "esans_p99_ms": vectorised.p99_ms,
                "esans_target_ms": 0.2,
                "uniform_ms": uns.median_ms,
                "loop_random_ms": looped.median_ms,
                "loop_numpy_ms": looped_np.median_ms,
                "speedup_vs_loop_random": looped.median_ms / vectorised.median_ms,
                "speedup_vs_loop_numpy": looped_np.median_ms / vectorised.median_ms,
                "alias_build_ms": alias,
                "alias_build_target_ms": 100,
                "batch": args.batch,
                "items": n,
            }
        )
    )


def _alias_build_ms(rng: np.random.Generator, num_primary: int) -> float:
    """Best of three builds of the cluster-choice alias table (done at every codebook load)."""
    sizes = rng.integers(0, 50, num_primary)
    matrix = cluster_choice_matrix(rng.normal(size=(num_primary, 32)), sizes, 1.0)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        AliasTable.build(matrix)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


if __name__ == "__main__":
    main()
