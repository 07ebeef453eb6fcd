"""Time and memory of an MSAC build over a memory-mapped 100k-item, 3-modality catalogue.

The parent writes a planted synthetic catalogue (image 1024, text 384, graph 128 float32
by default) to .npy files in a temporary directory, then runs two fresh child processes,
so each peak RSS is that process's own:

* build:    memory-maps the files and runs ``train_msac`` with the default MSACConfig on
            ``--threads`` torch threads (the issue's target: <= 120 s, peak RSS <= 2x the
            input feature bytes);
* baseline: memory-maps the same files and runs one forward-only epoch (maps, alignment
            and quantisation, no backward) at the same batch size.

    python benchmarks/bench_build.py [--items 100000 --threads 2 --epochs N ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_SECONDS = 120.0
TARGET_MEMORY_RATIO = 2.0


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB. It survives fork + exec, which is why the parent stays
    # small (the catalogue is generated in a child of its own) and VmHWM is printed as well.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _vm_hwm_bytes() -> int:
    """High-water RSS of this process image alone (Linux /proc), 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _open(directory: Path, widths: dict[str, int]) -> dict[str, Any]:
    import numpy as np

    return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in widths}


def _child(args: argparse.Namespace, widths: dict[str, int]) -> None:
    """Runs in a fresh interpreter: writes the catalogue, or runs one build or one baseline
    epoch; prints one JSON line."""
    if args.child == "write":
        input_bytes = _write_catalogue(args, widths, Path(args.child_dir))
        print(json.dumps({"input_bytes": input_bytes}))
        return
    import numpy as np
    import torch

    from esans_sampler.msac import MSACConfig, train_msac
    from esans_sampler.msac_model import MSACModel
    from esans_sampler.stats import hard_coverage
    from esans_sampler.synthetic import adjusted_rand_index

    torch.set_num_threads(args.threads)
    rss_after_imports = _peak_rss_bytes()
    directory = Path(args.child_dir)
    features = _open(directory, widths)
    overrides = {"epochs": args.epochs} if args.epochs is not None else {}
    config = MSACConfig(num_threads=args.threads, secondary=args.secondary, **overrides)
    report: dict[str, Any] = {"rss_after_imports": rss_after_imports}
    started = time.perf_counter()
    if args.child == "build":
        result = train_msac(features, config)
        report["seconds"] = time.perf_counter() - started
        report["epochs"] = [h.as_dict() for h in result.history]
        report["final"] = result.final.as_dict()
        planted = np.load(directory / "planted_primary.npy")
        report["ari_vs_planted"] = adjusted_rand_index(planted, result.primary)
        fine = result.primary.astype(np.int64) * config.num_secondary + result.secondary
        counts = np.bincount(fine, minlength=config.num_primary * config.num_secondary)
        coverage = hard_coverage(counts.reshape(config.num_primary, config.num_secondary))
        report["hard_coverage"] = coverage.as_dict()
    else:
        generator = torch.Generator().manual_seed(config.seed)
        num_items = next(iter(features.values())).shape[0]
        dims = [int(m.shape[1]) for m in features.values()]
        model = MSACModel(dims, config, generator)
        with torch.no_grad():
            for start in range(0, num_items, config.batch_size):
                stop = min(start + config.batch_size, num_items)
                batch = [
                    torch.from_numpy(np.array(m[start:stop], dtype=np.float32))
                    for m in features.values()
                ]
                model(batch)
        report["seconds"] = time.perf_counter() - started
    report["peak_rss"] = _peak_rss_bytes()
    report["vm_hwm"] = _vm_hwm_bytes()
    print(json.dumps(report))


def _run_child(kind: str, directory: Path, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *argv, "--child", kind, "--child-dir", str(directory)]
    env = {**os.environ, "OMP_NUM_THREADS": argv[argv.index("--threads") + 1]}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _write_catalogue(args: argparse.Namespace, widths: dict[str, int], directory: Path) -> int:
    import numpy as np

    from esans_sampler.synthetic import make_planted_catalogue

    catalogue = make_planted_catalogue(
        args.items, widths, num_clusters=args.clusters, num_subclusters=args.subclusters, seed=0
    )
    total = 0
    for name, matrix in catalogue.features.items():
        np.save(directory / f"{name}.npy", matrix)
        total += matrix.nbytes
    np.save(directory / "planted_primary.npy", catalogue.planted_primary)
    return total


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--widths", default="image=1024,text=384,graph=128")
    parser.add_argument("--clusters", type=int, default=300, help="planted primary clusters")
    parser.add_argument("--subclusters", type=int, default=5, help="planted sub-clusters each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default: MSACConfig's")
    parser.add_argument("--secondary", choices=["per_cluster", "global"], default="per_cluster")
    parser.add_argument("--child", choices=["write", "build", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    widths = {k: int(v) for k, v in (part.split("=") for part in args.widths.split(","))}
    if args.child:
        _child(args, widths)
        return

    argv = [
        "--items",
        str(args.items),
        "--widths",
        args.widths,
        "--clusters",
        str(args.clusters),
        "--subclusters",
        str(args.subclusters),
        "--threads",
        str(args.threads),
        "--secondary",
        args.secondary,
    ]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    with tempfile.TemporaryDirectory(prefix="esans-bench-build-") as tmp:
        directory = Path(tmp)
        t0 = time.perf_counter()
        input_bytes = int(_run_child("write", directory, argv)["input_bytes"])
        print(
            f"catalogue: {args.items} items, {widths}, written in {time.perf_counter() - t0:.1f} s"
        )
        build = _run_child("build", directory, argv)
        baseline = _run_child("baseline", directory, argv)

    final = build["final"]
    ratio = build["peak_rss"] / input_bytes
    print(f"threads:                 {args.threads}")
    print(f"build wall:              {build['seconds']:.1f} s over {len(build['epochs'])} epochs")
    for epoch in build["epochs"]:
        print(
            f"  epoch {epoch['epoch']}: {epoch['seconds']:.1f} s"
            f", align {epoch['alignment_loss']:.3f}"
            f", L_SQ {epoch['sq_loss']:.4f}, K_p used {epoch['primary_used']}"
            f", reseeded {epoch['reseeded_primary']}/{epoch['reseeded_secondary']}"
        )
    print(
        f"primary:                 {final['primary_used']} of {final['num_primary']} used, "
        f"perplexity {final['primary_perplexity']:.1f}, sizes {final['cluster_size_min']}"
        f"..{final['cluster_size_max']} (median {final['cluster_size_median']:g})"
    )
    print(
        f"secondary:               {final['secondary_used']} of {final['num_secondary']} used, "
        f"perplexity {final['secondary_perplexity']:.1f}; fine cells {final['fine_cells_used']}"
    )
    coverage = build["hard_coverage"]
    print(
        f"hard candidates:         {coverage['share_with_m_h']:.1%} of items have >= "
        f"{coverage['m_h']} ({args.secondary} secondary); fine cells per cluster median "
        f"{coverage['cells_per_cluster_median']:g}"
    )
    print(f"ARI vs planted primary:  {build['ari_vs_planted']:.3f}")
    print(f"input features:          {_mb(input_bytes)}")
    print(f"peak RSS (build child):  {_mb(build['peak_rss'])} = {ratio:.2f}x input")
    print(f"  VmHWM (same process):  {_mb(build['vm_hwm'])}")
    print(f"  after imports:         {_mb(build['rss_after_imports'])}")
    print(
        f"baseline (1 forward-only epoch): {baseline['seconds']:.1f} s, "
        f"peak RSS {_mb(baseline['peak_rss'])}"
    )
    print(
        f"build / baseline:        {build['seconds'] / baseline['seconds']:.1f}x time, "
        f"{build['peak_rss'] / baseline['peak_rss']:.2f}x peak RSS"
    )
    ok_time = build["seconds"] <= TARGET_SECONDS
    ok_mem = ratio <= TARGET_MEMORY_RATIO
    print(
        f"targets:                 wall <= {TARGET_SECONDS:.0f} s {'PASS' if ok_time else 'FAIL'}; "
        f"peak <= {TARGET_MEMORY_RATIO:.0f}x input {'PASS' if ok_mem else 'FAIL'}"
    )
    figures = {
        "benchmark": "build",
        "secondary": args.secondary,
        "items": args.items,
        "seconds": build["seconds"],
        "peak_rss_ratio": ratio,
        "hard_candidate_share": coverage["share_with_m_h"],
        "targets": {"seconds": TARGET_SECONDS, "peak_rss_ratio": TARGET_MEMORY_RATIO},
        "met": ok_time and ok_mem,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
