"""``esans inspect``: an artifact's summary, metadata or per-item codes."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from esans_cli.assign import drift_text
from esans_cli.summary import summary


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def run(args: argparse.Namespace) -> int:
    from esans_sampler.artifact import load_artifact

    artifact = load_artifact(args.artifact)
    if args.json:
        print(json.dumps({"version": artifact.version, **artifact.metadata}, indent=2))
    else:
        print(f"{'artifact':<20}{args.artifact}")
        print(f"{'version':<20}{artifact.version}")
        print(summary(artifact))
        drift = artifact.metadata.get("delta")
        baseline = artifact.metadata.get("quantisation_error")
        if drift:
            print(f"catalogue delta on {str(drift.get('base_version', ''))[:16]}:")
            print("  " + drift_text(drift).replace("\n", "\n  "))
        elif baseline:
            errors = f"median {baseline['p50']:.3f}, p90 {baseline['p90']:.3f}"
            print(f"{'quantisation error':<20}{errors} at build (the baseline of esans assign)")
    if args.codes:
        index = artifact.index
        table = np.column_stack([index.item_ids, index.primary, index.secondary])
        with open(args.codes, "w", encoding="utf-8") as out:
            out.write("item_id,primary,secondary\n")
            np.savetxt(out, table, fmt="%d", delimiter=",")
        print(f"wrote {index.num_items} rows to {args.codes}", file=sys.stderr)
    return 0
