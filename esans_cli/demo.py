"""``esans demo``: a synthetic catalogue and a codebook built from it."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from esans_cli.summary import summary


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="generate a demo catalogue and build a codebook from it",
        description="Generate a synthetic catalogue with three clustered modalities and build a "
        "codebook from it (what `esans serve --demo` publishes when no codebook is active).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="var/demo", help="directory for the catalogue and artifact")
    p.add_argument("--items", type=int, default=20_000, help="catalogue size")
    p.add_argument("--seed", type=int, default=0, help="random seed of the catalogue and build")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from esans_sampler.artifact import load_artifact, save_artifact
    from esans_sampler.build import build_artifact
    from esans_sampler.catalogue import load_npy_catalogue, write_npy_catalogue
    from esans_sampler.msac import MSACConfig
    from esans_sampler.synthetic import make_planted_catalogue

    out = Path(args.out)
    artifact_dir = out / "artifact"
    if (artifact_dir / "manifest.json").exists():
        artifact = load_artifact(artifact_dir)
        print(f"demo artifact already at {artifact_dir} (version {artifact.version[:16]})")
        return 0
    planted = make_planted_catalogue(
        args.items, {"image": 256, "text": 128, "graph": 32}, num_clusters=40, seed=args.seed
    )
    paths = write_npy_catalogue(out / "catalogue", planted.item_ids, planted.features)
    catalogue = load_npy_catalogue(paths["ids"], {k: v for k, v in paths.items() if k != "ids"})
    config = MSACConfig(embedding_dim=64, num_primary=48, num_secondary=6, epochs=3, seed=args.seed)
    # Zipf-like interaction counts, so the popularity baseline has something to draw by.
    ranks = np.random.default_rng(args.seed).permutation(args.items) + 1
    popularity = np.floor(10_000.0 / ranks).astype(np.float64)
    artifact = build_artifact(
        catalogue,
        config,
        embeddings="msac",
        popularity=popularity,
        show_progress_bar=not args.quiet,
    )
    version = save_artifact(artifact, artifact_dir, overwrite=True)
    print(summary(artifact))
    print(f"\nwrote demo catalogue to {out / 'catalogue'} and artifact to {artifact_dir}")
    print(f"version {version[:16]}; try: esans inspect {artifact_dir}")
    return 0
