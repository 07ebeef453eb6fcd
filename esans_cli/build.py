"""``esans build``: train MSAC on a catalogue and write a codebook artifact."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from esans_cli.summary import history_table, summary
from esans_sampler.errors import EsansError, InvalidInputError


def _parse_modality(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        help="train MSAC codebooks on a catalogue and write a codebook artifact",
        description="Train MSAC on a catalogue (.npy files or one parquet file) and write a "
        "versioned codebook artifact directory.",
    )
    src = p.add_argument_group("catalogue (either --ids with --modality, or --parquet)")
    src.add_argument("--ids", help="(N,) int64 item ids, .npy")
    src.add_argument(
        "--modality",
        action="append",
        type=_parse_modality,
        default=[],
        metavar="NAME=FILE.npy",
        help="(N, D_m) float features of one modality; repeat for each modality",
    )
    src.add_argument(
        "--parquet", help="one parquet file: an id column + one list column per modality"
    )
    src.add_argument(
        "--id-column", default="item_id", help="id column of --parquet (default item_id)"
    )
    src.add_argument(
        "--embeddings", help="optional (N, d) item-tower snapshot .npy for server-side EDIS"
    )
    src.add_argument(
        "--msac-embeddings",
        action="store_true",
        help="store the MSAC mean aligned embedding as the EDIS snapshot (without --embeddings)",
    )
    src.add_argument(
        "--popularity", help="optional (N,) interaction counts .npy, for the popularity baseline"
    )
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    hp = p.add_argument_group("MSAC parameters (defaults: paper, Table 6)")
    hp.add_argument(
        "--kp", "--num-primary", dest="num_primary", type=int, default=300,
        help="primary codewords K_p (default 300)",
    )  # fmt: skip
    hp.add_argument(
        "--ks", "--num-secondary", dest="num_secondary", type=int, default=15,
        help="secondary codewords K_s, per primary cluster or shared (default 15)",
    )  # fmt: skip
    hp.add_argument(
        "--secondary",
        choices=("per_cluster", "global"),
        default="per_cluster",
        help="per_cluster (default): K_s secondary codewords for each primary cluster, so every "
        "cluster splits into fine cells and positives get hard negatives; global: the paper's "
        "one shared secondary codebook (can collapse each cluster into one fine cell)",
    )
    hp.add_argument(
        "--dm", "--embedding-dim", dest="embedding_dim", type=int, default=512,
        help="width d_m of each aligned modality embedding (default 512)",
    )  # fmt: skip
    hp.add_argument(
        "--beta", type=float, default=2.0, help="weight of each alignment loss (default 2.0)"
    )
    hp.add_argument(
        "--gamma", type=float, default=1.0, help="cluster-choice sharpness (stored default)"
    )
    hp.add_argument(
        "--epochs", type=int, default=None, help="MSAC passes over the catalogue (default 3)"
    )
    hp.add_argument(
        "--batch-size", type=int, default=None, help="MSAC mini-batch of items (default 1024)"
    )
    hp.add_argument(
        "--learning-rate", type=float, default=None, help="MSAC Adam learning rate (default 1e-3)"
    )
    hp.add_argument("--seed", type=int, default=0, help="random seed of the build (default 0)")
    hp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from esans_sampler.artifact import save_artifact
    from esans_sampler.build import build_artifact, load_embedding_snapshot, load_popularity
    from esans_sampler.catalogue import file_sha256, load_npy_catalogue, load_parquet_catalogue
    from esans_sampler.msac import MSACConfig

    if args.parquet and (args.ids or args.modality):
        raise EsansError("give either --parquet or --ids with --modality, not both")
    if args.parquet:
        catalogue = load_parquet_catalogue(args.parquet, id_column=args.id_column)
        inputs = [args.parquet]
    elif args.ids and args.modality:
        names = [name for name, _ in args.modality]
        if len(set(names)) != len(names):
            raise EsansError(f"modality names must be unique, got {names}")
        catalogue = load_npy_catalogue(args.ids, dict(args.modality))
        inputs = [args.ids, *(path for _, path in args.modality)]
    else:
        raise EsansError("no catalogue: give --ids with at least one --modality, or --parquet")

    optional = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "num_threads": args.threads,
    }
    overrides = {key: value for key, value in optional.items() if value is not None}
    out = Path(args.out)
    if out.exists() and not args.overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise EsansError(f"--out {out} already exists; pass --overwrite to replace it")
    try:
        config = MSACConfig(
            embedding_dim=args.embedding_dim,
            num_primary=args.num_primary,
            num_secondary=args.num_secondary,
            secondary=args.secondary,
            beta=args.beta,
            seed=args.seed,
            **overrides,
        )
        config.check_catalogue(catalogue.num_items)
    except InvalidInputError as exc:
        raise InvalidInputError(_with_flag_names(str(exc))) from exc
    embeddings: Any = None
    if args.embeddings:
        embeddings = load_embedding_snapshot(args.embeddings, catalogue.num_items)
    elif args.msac_embeddings:
        embeddings = "msac"
    popularity = None
    if args.popularity:
        popularity = load_popularity(args.popularity, catalogue.num_items)
        inputs.append(args.popularity)
    started = time.perf_counter()
    checksums = {path: file_sha256(path) for path in inputs}
    artifact = build_artifact(
        catalogue,
        config,
        gamma=args.gamma,
        embeddings=embeddings,
        popularity=popularity,
        input_checksums=checksums,
        show_progress_bar=not args.quiet,
    )
    version = save_artifact(artifact, args.out, overwrite=args.overwrite)
    elapsed = time.perf_counter() - started
    print(history_table(artifact.metadata["history"]))
    print()
    print(summary(artifact))
    print(f"\nwrote {args.out} (version {version[:16]}) in {elapsed:.1f} s")
    return 0


_FLAGS = {
    "num_primary": "--kp",
    "num_secondary": "--ks",
    "embedding_dim": "--dm",
    "batch_size": "--batch-size",
    "learning_rate": "--learning-rate",
    "num_threads": "--threads",
    "epochs": "--epochs",
    "beta": "--beta",
    "secondary": "--secondary",
}


def _with_flag_names(message: str) -> str:
    """A configuration error in the words of the command line (--kp, not num_primary)."""
    for name, flag in _FLAGS.items():
        message = re.sub(rf"\b{name}\b", flag, message)
    return message
