"""Time EDIS over a stored embedding table on one core: vectorised vs a per-positive loop.

Each batch gathers B positives, B * m_c * m_o simple anchors and B * m_h hard negatives
from a random (items x dim) float32 table, then runs eq. 11-13. Every batch uses fresh
random rows, so the gathers pay for cache misses as the service does.

    python benchmarks/bench_edis.py [--items 1000000 --dim 64 --batch 512 ...]
"""

from __future__ import annotations

import os

# One core: pin every BLAS / OpenMP pool before numpy is imported.
for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from esans_sampler.edis import EdisResult, edis_from_rows, interpolation_schedule  # noqa: E402

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
TARGET_MS = 1.5


def loop_edis(
    table: FloatArray,
    positive_rows: IdArray,
    simple_rows: IdArray,
    hard_rows: IdArray,
    eta: float,
    lam: float,
) -> tuple[FloatArray, FloatArray]:
    """The straightforward version: one positive, one cluster, one virtual point at a time."""
    batch, m_c, m_o = simple_rows.shape
    anchor_idx, prefix = interpolation_schedule(m_o)
    virtual_simple = np.zeros((batch, m_c, anchor_idx.shape[0], table.shape[1]), np.float32)
    virtual_hard = np.zeros((batch, hard_rows.shape[1], table.shape[1]), np.float32)
    for b in range(batch):
        for c in range(m_c):
            anchors = table[simple_rows[b, c]]
            unit = anchors / np.maximum(np.linalg.norm(anchors, axis=1, keepdims=True), 1e-12)
            for t, (a, n_o) in enumerate(zip(anchor_idx, prefix, strict=True)):
                sim = np.clip((unit[:n_o] @ unit[a] + 1) / 2, 1e-6, 1) ** eta  # eq. 11
                virtual_simple[b, c, t] = (sim / sim.sum()) @ anchors[:n_o]
        pos = table[positive_rows[b]]
        for h, row in enumerate(hard_rows[b]):
            if row >= 0:
                virtual_hard[b, h] = lam * pos + (1 - lam) * table[row]  # eq. 13
    return virtual_simple, virtual_hard


def time_batches(fn: Callable[[int], object], batches: int) -> npt.NDArray[np.float64]:
    """Milliseconds per call of ``fn(batch_index)``."""
    times = np.empty(batches)
    for i in range(batches):
        start = time.perf_counter()
        fn(i)
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--m-c", type=int, default=2)
    parser.add_argument("--m-o", type=int, default=5)
    parser.add_argument("--m-h", type=int, default=5)
    parser.add_argument("--eta", type=float, default=0.6)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--batches", type=int, default=300, help="timed vectorised batches")
    parser.add_argument("--loop-batches", type=int, default=3, help="timed loop batches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    table = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    warmup = 10
    n = warmup + args.batches
    positive_rows = rng.integers(0, args.items, (n, args.batch))
    simple_rows = rng.integers(0, args.items, (n, args.batch, args.m_c, args.m_o))
    hard_rows = rng.integers(0, args.items, (n, args.batch, args.m_h))

    def vectorised(i: int) -> EdisResult:
        return edis_from_rows(
            table, positive_rows[i], simple_rows[i], hard_rows[i], args.eta, args.lam
        )

    def looped(i: int) -> tuple[FloatArray, FloatArray]:
        return loop_edis(table, positive_rows[i], simple_rows[i], hard_rows[i], args.eta, args.lam)

    # The two must agree before their times mean anything.
    result, (ref_simple, ref_hard) = vectorised(0), looped(0)
    if not (
        np.allclose(result.virtual_simple, ref_simple, atol=1e-5)
        and np.allclose(result.virtual_hard, ref_hard, atol=1e-5)
    ):
        raise SystemExit("vectorised and loop EDIS disagree")

    time_batches(vectorised, warmup)
    vec = time_batches(lambda i: vectorised(warmup + i), args.batches)
    loop = time_batches(lambda i: looped(warmup + i), min(args.loop_batches, args.batches))

    t = args.m_o * (args.m_o + 1) // 2 - 1
    print(
        f"EDIS, one core: table {args.items:,} x {args.dim} float32, B={args.batch}, "
        f"m_c={args.m_c}, m_o={args.m_o} (T={t}), m_h={args.m_h}, eta={args.eta}, "
        f"lam={args.lam}"
    )
    print(
        f"  per batch: {args.batch * args.m_c * t:,} virtual simple + "
        f"{args.batch * args.m_h:,} virtual hard negatives, "
        f"{args.batch * (1 + args.m_c * args.m_o + args.m_h):,} rows gathered"
    )
    vec_median, vec_p99 = np.median(vec), np.percentile(vec, 99)
    loop_median = np.median(loop)
    print(
        f"  edis_from_rows : median {vec_median:8.3f} ms   p99 {vec_p99:8.3f} ms"
        f"   ({args.batches} batches)"
    )
    print(f"  python loop    : median {loop_median:8.3f} ms   ({loop.size} batches)")
    print(f"  speed-up       : {loop_median / vec_median:,.0f}x")
    verdict = "met" if vec_median <= TARGET_MS else "MISSED"
    print(f"  target <= {TARGET_MS} ms per batch (median): {verdict}")
    print(
        json.dumps(
            {
                "benchmark": "edis",
                "edis_ms": float(vec_median),
                "edis_p99_ms": float(vec_p99),
                "edis_target_ms": TARGET_MS,
                "loop_ms": float(loop_median),
                "speedup_vs_loop": float(loop_median / vec_median),
                "batch": args.batch,
                "items": args.items,
                "dim": args.dim,
            }
        )
    )


if __name__ == "__main__":
    main()
