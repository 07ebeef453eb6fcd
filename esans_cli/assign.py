"""``esans assign``: new and retired items against a built artifact, as a delta to publish."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from esans_cli.build import _parse_modality
from esans_sampler.errors import EsansError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "assign",
        help="assign new items with a built artifact's codebooks (no training); write a delta",
        description="Assign new items to the trained codebooks of ARTIFACT and list items to "
        "retire, without training; write the delta that `esans publish` turns into a new "
        "complete version (base + added - retired). Prints the drift report: the new items' "
        "quantisation error against the build's, cluster growth, the share added since the "
        "build, and whether to rebuild.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("artifact", help="the artifact directory the delta applies to")
    p.add_argument("--ids", help="(n,) int64 ids of the new items, .npy")
    p.add_argument(
        "--modality",
        action="append",
        type=_parse_modality,
        default=[],
        metavar="NAME=FILE",
        help="(n, D_m) features of the new items for one modality; one per modality",
    )
    p.add_argument("--retire", help="(r,) int64 ids to retire, .npy")
    p.add_argument(
        "--embeddings",
        help="(n, d) snapshot rows of the new items, .npy; needed when the artifact's snapshot "
        "is not the MSAC mean embedding (otherwise computed)",
    )
    p.add_argument("--popularity", help="(n,) interaction counts of the new items, .npy")
    p.add_argument("--out", required=True, help="delta directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _load(path: str | None, what: str) -> Any:
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise EsansError(f"{what} {path}: cannot read: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    from esans_sampler.artifact import load_artifact
    from esans_sampler.catalogue_delta import assign_delta, delta_to_files

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise EsansError(f"{out} exists; pass --overwrite to replace it")
    if args.ids is None and args.retire is None:
        raise EsansError("nothing to do: give --ids with --modality, and/or --retire")
    base = load_artifact(args.artifact)
    ids = _load(args.ids, "--ids")
    features = {name: _load(path, f"--modality {name}") for name, path in args.modality}
    if ids is not None:
        missing = [n for n in base.codebook.modality_names if n not in features]
        if missing:
            raise EsansError(f"the artifact needs --modality for {missing}")
    delta = assign_delta(
        base,
        np.zeros(0, np.int64) if ids is None else ids,
        features,
        retired_ids=_load(args.retire, "--retire"),
        embeddings=_load(args.embeddings, "--embeddings"),
        popularity=_load(args.popularity, "--popularity"),
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, data in delta_to_files(delta).items():
        (out / name).write_bytes(data)
    print(drift_text(delta.drift))
    print(
        f"delta against {base.version[:16]} written to {out}; publish it with esans publish {out}"
    )
    return 0


def drift_text(drift: dict[str, Any]) -> str:
    """The drift report for people."""
    new = drift.get("new_error") or {}
    built = drift.get("build_error") or {}
    largest = drift.get("largest_cluster_growth") or {}
    new_text = f"{new['p50']:.3f} / {new['p90']:.3f}" if new.get("count") else "none"
    built_text = f"{built['p50']:.3f} / {built['p90']:.3f}" if built else "not recorded"
    ratio = drift.get("error_ratio_p50")
    return "\n".join(
        [
            f"added {drift.get('added', 0)}, retired {drift.get('retired', 0)}; "
            f"{float(drift.get('added_share_since_build', 0.0)):.1%} of the catalogue added "
            "since the build",
            f"quantisation error (median / p90): new items {new_text}, at build {built_text}"
            + ("" if ratio is None else f" (ratio {ratio:.2f})"),
            f"largest cluster growth since the build: cluster {largest.get('cluster')} "
            f"+{float(largest.get('growth', 0.0)):.0%}",
            str(drift.get("recommendation", "")),
        ]
    )
