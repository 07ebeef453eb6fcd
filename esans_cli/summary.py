"""What build and inspect print: the per-epoch table and the codebook summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from esans_sampler.artifact import CodebookArtifact


def history_table(history: list[dict[str, Any]]) -> str:
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


def summary(artifact: CodebookArtifact) -> str:
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
