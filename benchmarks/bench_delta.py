"""Publishing a 1% catalogue change as a delta against a full build + publish, same run.

A planted catalogue of N items (default 1M, two modalities of widths 64 and 32) is built
with MSAC (K_p 300, K_s 15, d_m 64, one epoch: a lower bound on a real build, which runs
more) and published to an embedded Redis with its MSAC embedding snapshot. Then 1% new items
from the same distribution are assigned (`esans assign`'s code path) with 1% of the items
retired, and the delta is published (`esans publish DELTA`'s code path: the base is read
back from Redis, the delta applied, the new version written and activated). The last line is
one JSON object.

    python benchmarks/bench_delta.py [--items N] [--change 0.01] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from esans_sampler.artifact import artifact_to_files
from esans_sampler.build import build_artifact
from esans_sampler.catalogue import Catalogue
from esans_sampler.catalogue_delta import assign_delta, delta_to_files
from esans_sampler.msac_model import MSACConfig
from esans_sampler.synthetic import make_planted_catalogue
from esans_service.deltas import publish_delta
from esans_service.embedded_redis import EmbeddedRedis
from esans_service.store import CodebookStore

WIDTHS = {"image": 64, "text": 32}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--change", type=float, default=0.01, help="share added and retired")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.items
    changed = max(1, round(n * args.change))
    planted = make_planted_catalogue(n + changed, WIDTHS, num_clusters=300, seed=args.seed)
    catalogue = Catalogue(
        item_ids=planted.item_ids[:n],
        modalities={k: v[:n] for k, v in planted.features.items()},
        sources={},
    )
    config = MSACConfig(
        embedding_dim=64, num_primary=300, num_secondary=15, epochs=args.epochs, seed=args.seed
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedRedis(Path(tmp) / "redis") as redis_server,
        redis_server.client() as client,
    ):
        store = CodebookStore(client, namespace="bench-delta", keep_versions=3)
        start = time.perf_counter()
        base = build_artifact(catalogue, config, embeddings="msac")
        built_s = time.perf_counter() - start
        store.publish(artifact_to_files(base))
        full_s = time.perf_counter() - start

        rng = np.random.default_rng(args.seed + 1)
        start = time.perf_counter()
        delta = assign_delta(
            base,
            planted.item_ids[n:],
            {k: v[n:] for k, v in planted.features.items()},
            retired_ids=rng.choice(base.index.item_ids, changed, replace=False),
        )
        assigned_s = time.perf_counter() - start
        version, drift = publish_delta(store, delta_to_files(delta))
        delta_s = time.perf_counter() - start
        assert store.active_version() == version
        # Items of another distribution (20 new planted clusters): what drift looks like.
        other = make_planted_catalogue(
            changed, WIDTHS, num_clusters=20, seed=args.seed + 99, id_offset=10**9
        )
        shifted = assign_delta(base, other.item_ids, other.features).drift
    figures = {
        "items": n,
        "changed_items": changed,
        "full_build_and_publish_s": full_s,
        "full_build_s": built_s,
        "delta_assign_s": assigned_s,
        "delta_assign_and_publish_s": delta_s,
        "delta_vs_full": delta_s / full_s,
        "drift_error_ratio_p50": drift.get("error_ratio_p50"),
        "drift_recommendation": drift.get("recommendation"),
        "epochs_of_the_full_build": args.epochs,
        "shifted_error_ratio_p50": shifted.get("error_ratio_p50"),
        "shifted_recommendation": shifted.get("recommendation"),
    }
    print(f"{n:,} items, {changed:,} added and {changed:,} retired")
    print(f"  full build ({args.epochs} epoch) + publish  {full_s:8.1f} s (build {built_s:.1f} s)")
    print(f"  delta assign + publish           {delta_s:8.1f} s (assign {assigned_s:.1f} s)")
    print(f"  delta / full                     {delta_s / full_s:8.3f}")
    print(
        f"  drift, same distribution: {drift.get('recommendation')} "
        f"(error ratio {drift.get('error_ratio_p50'):.2f})"
    )
    print(
        f"  drift, 20 new clusters: {shifted.get('recommendation')} "
        f"(error ratio {shifted.get('error_ratio_p50'):.2f})"
    )
    print(json.dumps({"benchmark": "delta", **figures}))


if __name__ == "__main__":
    main()
