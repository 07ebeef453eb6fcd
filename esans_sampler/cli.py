"""The ``esans`` command line: build, inspect and demo codebooks.

Every subcommand exits 0 on success, 2 on a usage or input error (with a one-line message
on stderr naming what to fix), never with a traceback for a problem the user can fix.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esans_sampler import versions_cli
from esans_sampler.errors import (
    EsansError,
    FailedPreconditionError,
    InvalidInputError,
    UnavailableError,
)

if TYPE_CHECKING:
    from esans_sampler.artifact import CodebookArtifact


def _parse_modality(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, path


def _add_build_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _cmd_build(args: argparse.Namespace) -> int:
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
    print(_history_table(artifact.metadata["history"]))
    print()
    print(_summary(artifact))
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


def _history_table(history: list[dict[str, Any]]) -> str:
    columns = [
        ("epoch", "epoch", "{:d}"),
        ("align", "alignment_loss", "{:.4f}"),
        ("L_SQ", "sq_loss", "{:.4f}"),
        ("quant.err", "quantisation_error", "{:.4f}"),
        ("Kp used", "primary_used", "{:d}"),
        ("Kp perpl.", "primary_perplexity", "{:.1f}"),
        ("Ks used", "secondary_used", "{:d}"),
        ("Ks perpl.", "secondary_perplexity", "{:.1f}"),
        ("reseeded", "reseeded_primary", "{:d}"),
        ("sizes min/p10/med/p90/max", "cluster_size_quantiles", "{}"),
        ("s", "seconds", "{:.1f}"),
    ]
    rows = [[title for title, _, _ in columns]]
    for epoch in history:
        rows.append([_cell(fmt, epoch.get(key)) for _, key, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def _cell(fmt: str, value: Any) -> str:
    if isinstance(value, list | tuple):
        return "/".join(str(v) for v in value) or "-"
    return "-" if value is None else fmt.format(value)


def _summary(artifact: CodebookArtifact) -> str:
    """The closing summary of `esans build` and the body of `esans inspect`."""
    from esans_sampler.cluster_choice import effective_clusters
    from esans_sampler.stats import hard_coverage, histogram_label

    metadata, cluster_choice = artifact.metadata, artifact.cluster_choice
    stats = metadata["stats"]
    params = metadata["parameters"]
    catalogue = metadata["catalogue"]
    rows_with_choice = cluster_choice.sum(axis=1) > 0
    effective = effective_clusters(cluster_choice)[rows_with_choice]
    if effective.size == 0:
        effective = np.zeros(1)
    snapshot = metadata.get("embeddings")
    histogram = ", ".join(
        f"{histogram_label(lo, hi)}: {count}"
        for lo, hi, count in zip(
            stats["cluster_size_bin_edges"][:-1],
            stats["cluster_size_bin_edges"][1:],
            stats["cluster_size_counts"],
            strict=True,
        )
    )
    coverage = hard_coverage(artifact.index.fine_sizes)  # from the index: old artifacts too
    rows = [
        ("items", str(catalogue["num_items"])),
        ("modalities", ", ".join(f"{k} ({v})" for k, v in catalogue["modalities"].items())),
        (
            "K_p / K_s / d_m",
            f"{params['num_primary']} / {params['num_secondary']} / {params['embedding_dim']}",
        ),
        ("secondary codebook", _secondary_description(artifact.codebook.secondary_mode)),
        (
            "primary used",
            f"{stats['primary_used']} of {params['num_primary']}"
            f" (perplexity {stats['primary_perplexity']:.1f})",
        ),
        (
            "secondary used",
            f"{stats['secondary_used']} of {params['num_secondary']}"
            f" (perplexity {stats['secondary_perplexity']:.1f})",
        ),
        (
            "fine cells used",
            f"{stats['fine_cells_used']} (perplexity {stats['fine_perplexity']:.1f})",
        ),
        (
            "fine cells/cluster",
            f"min {coverage.cells_per_cluster_min}, median "
            f"{coverage.cells_per_cluster_median:g}, max {coverage.cells_per_cluster_max}",
        ),
        (
            "hard candidates",
            f"{coverage.share_with_m_h:.1%} of items have >= {coverage.m_h} (m_h), "
            f"{coverage.share_with_any:.1%} have >= 1",
        ),
        (
            "cluster sizes",
            f"min {stats['cluster_size_min']}, median {stats['cluster_size_median']:g},"
            f" max {stats['cluster_size_max']}, empty {stats['empty_clusters']}",
        ),
        ("size histogram", histogram),
        (
            "cluster choice",
            f"gamma {params['gamma']:g}; effective clusters per row min {effective.min():.1f},"
            f" median {np.median(effective):.1f}, max {effective.max():.1f}",
        ),
        ("embedding snapshot", f"d={snapshot['dim']}" if snapshot else "none"),
    ]
    lines = [f"{label:<20}{value}" for label, value in rows]
    warning = coverage.warning()
    if warning:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def _secondary_description(mode: str) -> str:
    if mode == "per_cluster":
        return "per primary cluster (K_s codewords each)"
    return "global (one shared codebook, as in the paper)"


def _add_inspect_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect", help="show a codebook artifact's parameters and cluster statistics"
    )
    p.add_argument("artifact", help="artifact directory written by `esans build`")
    p.add_argument(
        "--codes", metavar="FILE.csv", help="write item_id,primary,secondary for every item"
    )
    p.add_argument(
        "--json", action="store_true", help="print the metadata as JSON instead of a table"
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    from esans_sampler.artifact import load_artifact

    artifact = load_artifact(args.artifact)
    if args.json:
        print(json.dumps({"version": artifact.version, **artifact.metadata}, indent=2))
    else:
        print(f"{'artifact':<20}{args.artifact}")
        print(f"{'version':<20}{artifact.version}")
        print(_summary(artifact))
    if args.codes:
        index = artifact.index
        table = np.column_stack([index.item_ids, index.primary, index.secondary])
        with open(args.codes, "w", encoding="utf-8") as out:
            out.write("item_id,primary,secondary\n")
            np.savetxt(out, table, fmt="%d", delimiter=",")
        print(f"wrote {index.num_items} rows to {args.codes}", file=sys.stderr)
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _cmd_demo(args: argparse.Namespace) -> int:
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
    print(_summary(artifact))
    print(f"\nwrote demo catalogue to {out / 'catalogue'} and artifact to {artifact_dir}")
    print(f"version {version[:16]}; try: esans inspect {artifact_dir}")
    return 0


def _settings_epilog() -> str:
    """Every ESANS_ setting with its default and description, for `serve --help`."""
    try:
        from service.settings import ENV_PREFIX, Settings
    except ImportError:  # a client-only install has no server
        return "settings: the server is not installed here"
    lines = ["settings (environment variables; the flags above win):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        text = f"  {ENV_PREFIX}{name.upper()} (default {default!s})"
        lines.append(text + (f": {field.description}" if field.description else ""))
    return "\n".join(lines)


def _add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve SampleNegatives over gRPC and HTTP",
        description="Serve SampleNegatives over gRPC and HTTP. Every setting can also be given "
        "as an ESANS_ environment variable (listed below); flags win.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--redis-url", help="codebook store (ESANS_REDIS_URL); default: an embedded redis-server"
    )
    p.add_argument(
        "--data-dir", help="embedded Redis data directory (ESANS_DATA_DIR; default var/redis)"
    )
    p.add_argument("--grpc-port", type=int, help="gRPC port (ESANS_GRPC_PORT; default 50051)")
    p.add_argument("--http-port", type=int, help="HTTP port (ESANS_HTTP_PORT; default 8000)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ... (ESANS_LOG_LEVEL; default INFO)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="if no codebook is active, build a demo codebook (esans demo) and publish it first",
    )
    p.add_argument(
        "--demo-dir", default="var/demo", help="where --demo keeps its catalogue (default var/demo)"
    )


def _serve_settings(args: argparse.Namespace) -> Any:
    from service.settings import load_settings

    flags = {
        "redis_url": getattr(args, "redis_url", None),
        "data_dir": getattr(args, "data_dir", None),
        "grpc_port": getattr(args, "grpc_port", None),
        "http_port": getattr(args, "http_port", None),
        "log_level": getattr(args, "log_level", None),
        "redis_namespace": getattr(args, "namespace", None),
        "keep_versions": getattr(args, "keep_versions", None),
    }
    return load_settings(flags)


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.app import run_server

    settings = _serve_settings(args)
    if args.demo:
        _publish_demo_if_empty(settings, Path(args.demo_dir))
    run_server(settings)
    return 0


def _publish_demo_if_empty(settings: Any, demo_dir: Path) -> None:
    from esans_sampler.artifact import read_artifact_files
    from service.app import connect_redis
    from service.store import CodebookStore

    client, embedded = connect_redis(settings)
    try:
        store = CodebookStore(client, settings.redis_namespace, settings.keep_versions)
        active = store.active_version()
        if active is not None:
            print(f"codebook {active[:16]} is active; not publishing the demo")
            return
        _cmd_demo(argparse.Namespace(out=str(demo_dir), items=20_000, seed=0, quiet=False))
        version = store.publish(read_artifact_files(demo_dir / "artifact"), activate=True)
        print(f"published and activated demo codebook {version[:16]}")
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()


def _add_publish_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="store a codebook artifact in Redis as a new version and activate it",
        description="Verify an artifact, write it to Redis under a new version and flip the "
        "active pointer atomically; running replicas swap to it without a restart.",
    )
    p.add_argument("artifact", help="artifact directory written by `esans build`")
    p.add_argument("--redis-url", help="default: ESANS_REDIS_URL, else the embedded Redis")
    p.add_argument("--data-dir", help="embedded Redis data directory (default var/redis)")
    p.add_argument("--namespace", help="Redis key namespace (default esans)")
    p.add_argument("--keep-versions", type=int, help="complete versions kept (default 5)")
    p.add_argument("--no-activate", action="store_true", help="store without activating")


def _cmd_publish(args: argparse.Namespace) -> int:
    import redis

    from esans_sampler.artifact import read_artifact_files
    from service.app import connect_redis
    from service.embedded_redis import running_embedded_url
    from service.store import CodebookStore

    settings = _serve_settings(args)
    files = read_artifact_files(args.artifact)
    # A publish must reach the Redis the servers read. Starting a throwaway embedded Redis
    # here (as `serve` does) would report success while every server stays on its version.
    if not settings.redis_url and running_embedded_url(settings.data_dir) is None:
        raise FailedPreconditionError(
            "no Redis to publish to: ESANS_REDIS_URL (or --redis-url) is not set and no "
            f"embedded Redis is serving {Path(settings.data_dir).resolve()}; start `esans "
            "serve` first, or pass --data-dir with the data directory of the running one"
        )
    client, embedded = connect_redis(settings)
    target = _redacted(client)
    try:
        store = CodebookStore(client, settings.redis_namespace, settings.keep_versions)
        version = store.publish(files, activate=not args.no_activate)
    except redis.RedisError as exc:
        raise UnavailableError(
            f"cannot publish to {target}: Redis does not answer ({exc})"
        ) from exc
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
    state = "stored" if args.no_activate else "published and activated"
    print(f"{state} version {version} in {target} (namespace {settings.redis_namespace!r})")
    return 0


def _redacted(client: Any) -> str:
    """Where a Redis client points, without credentials: redis://host:port/db."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esans-sampler")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esans", description="ESANS negative sampling")
    parser.add_argument("--version", action="version", version=f"esans {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build_parser(sub)
    _add_inspect_parser(sub)
    _add_demo_parser(sub)
    _add_serve_parser(sub)
    _add_publish_parser(sub)
    versions_cli.add_parser(sub)
    sub.add_parser(  # parsed by esans_eval.cli, which needs the `eval` extra
        "eval", add_help=False, help="Recall@50/200 of a two-tower model trained on negatives "
        "from the service: UNS, PNS, MNS, ESANS, ablations (esans eval --help)",
    )  # fmt: skip
    return parser


_COMMANDS = {
    "build": _cmd_build,
    "inspect": _cmd_inspect,
    "demo": _cmd_demo,
    "serve": _cmd_serve,
    "publish": _cmd_publish,
    "versions": versions_cli.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["eval"]:
        from esans_eval.cli import main as eval_main

        return eval_main(arguments[1:], prog="esans eval")
    args = build_parser().parse_args(arguments)
    try:
        return _COMMANDS[args.command](args)
    except (EsansError, FileNotFoundError) as exc:
        print(f"esans {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `esans inspect ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"esans {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
