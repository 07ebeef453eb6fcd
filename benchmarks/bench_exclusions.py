"""Cost of per-row exclusions: ESANS and UNS batches with 100 excluded ids per row against
the same batches without, in the same run.

Defaults: a 1M-item catalogue with random codes (K_p = 300, K_s = 15), B = 512, m_c = 2,
m_o = 5, m_h = 5, one core. Two kinds of exclusions, 100 per row: ids drawn from the whole
catalogue, and ids from the positive's own primary cluster (a user's history concentrated
where its next item is, the case that hits hard negatives). Each timed call includes
building the exclusions from the request's (ids, offsets). The last line is one JSON object.

    python benchmarks/bench_exclusions.py [--items N] [--batch B] [--per-row K] [--repeats R]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402
from bench_sampler import _time, random_index  # noqa: E402  (one timing loop, one fixture)

from esans_sampler.baselines import UniformSampler  # noqa: E402
from esans_sampler.exclusions import Exclusions  # noqa: E402
from esans_sampler.sampler import EsansSampler  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--primary", type=int, default=300)
    parser.add_argument("--secondary", type=int, default=15)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--per-row", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    n, batch, k = args.items, args.batch, args.per_row
    index = random_index(rng, n, args.primary, args.secondary)
    esans = EsansSampler(index, rng.normal(size=(args.primary, 64)))
    uniform = UniformSampler(index)
    batches = [rng.choice(index.item_ids, batch) for _ in range(16)]
    offsets = np.arange(batch + 1, dtype=np.int64) * k
    anywhere = [rng.choice(index.item_ids, batch * k) for _ in batches]
    same_cluster = []
    for positives in batches:
        clusters = index.primary[index.rows_of(positives)]
        start = index.cluster_offsets[clusters]
        size = index.cluster_offsets[clusters + 1] - start
        picks = start[:, None] + (rng.random((batch, k)) * size[:, None]).astype(np.int64)
        same_cluster.append(index.ordered_ids[picks].ravel())

    def timed(sampler: object, excluded: list[np.ndarray] | None) -> float:
        draw_rng = np.random.default_rng(args.seed + 1)

        def call(i: int) -> object:
            exclude = None
            if excluded is not None:
                exclude = Exclusions.build(index, batch, excluded[i % 16], offsets)
            return sampler.sample(batches[i % 16], draw_rng, exclude=exclude)  # type: ignore[attr-defined]

        return _time("", call, args.repeats, warmup=min(20, args.repeats)).median_ms

    figures = {
        "esans_ms": timed(esans, None),
        "esans_excluding_anywhere_ms": timed(esans, anywhere),
        "esans_excluding_same_cluster_ms": timed(esans, same_cluster),
        "uniform_ms": timed(uniform, None),
        "uniform_excluding_anywhere_ms": timed(uniform, anywhere),
    }
    print(f"{n:,} items, K_p {args.primary}, K_s {args.secondary}, B {batch}, {k} exclusions/row")
    for name, value in figures.items():
        print(f"  {name:<34} {value:8.3f} ms")
    ratios = {
        "esans_anywhere_vs_none": figures["esans_excluding_anywhere_ms"] / figures["esans_ms"],
        "esans_same_cluster_vs_none": figures["esans_excluding_same_cluster_ms"]
        / figures["esans_ms"],
        "uniform_anywhere_vs_none": figures["uniform_excluding_anywhere_ms"]
        / figures["uniform_ms"],
    }
    for name, value in ratios.items():
        print(f"  {name:<34} {value:8.2f}x")
    print(json.dumps({"benchmark": "exclusions", **figures, **ratios, "batch": batch,
                      "exclusions_per_row": k, "items": n}))  # fmt: skip


if __name__ == "__main__":
    main()
