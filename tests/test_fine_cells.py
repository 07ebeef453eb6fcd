"""Hard negatives for every positive: fine cells recovered on planted catalogues.

Each shape of :data:`PLANTED_SHAPES` (weak sub-structure, unequal sizes, one to three views of
different widths and noise) is built with K_p and K_s equal to its planted clusters and
sub-clusters, and the default (per-cluster) secondary codebook must meet the thresholds below.
``benchmarks/bench_fine_cells.py`` prints the same figures for the paper's global secondary
codebook too (measured there, 12x4: fine ARI 0.39, hard-slot fill 12%).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from esans_cli import main
from esans_sampler.catalogue import write_npy_catalogue
from esans_sampler.cluster_index import ClusterIndex
from esans_sampler.msac import MSACConfig, train_msac
from esans_sampler.synthetic import (
    PLANTED_SHAPE_LIMITS,
    PLANTED_SHAPES,
    PlantedShape,
    fine_cell_recovery,
)

MIN_FINE_ARI = 0.8
MIN_HARD_FILL = 0.95  # of the requested slots at the default m_h = 5
MAX_HARD_FALSE_NEGATIVES = 0.05  # hard negatives in the positive's planted cell
CONFIG = MSACConfig(embedding_dim=32, epochs=3, batch_size=256, kmeans_init_items=4000)
SHAPES = [s for name, s in PLANTED_SHAPES.items() if name not in PLANTED_SHAPE_LIMITS]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_per_cluster_secondary_resolves_planted_fine_cells(shape: PlantedShape) -> None:
    planted = shape.make(seed=0)
    config = replace(CONFIG, num_primary=shape.clusters, num_secondary=shape.subclusters)
    assert config.secondary == "per_cluster"  # the default
    result = train_msac(planted.features, config)
    index = ClusterIndex.build(
        planted.item_ids, result.primary, result.secondary, shape.clusters, shape.subclusters
    )
    recovery = fine_cell_recovery(planted, index, m_h=5, seed=0)
    assert recovery.fine_ari >= MIN_FINE_ARI, recovery
    assert recovery.hard_fill >= MIN_HARD_FILL, recovery
    assert recovery.hard_false_negatives <= MAX_HARD_FALSE_NEGATIVES, recovery


def test_recovery_measures_what_it_says() -> None:
    """The oracle itself: planted codes score perfectly, one cell per cluster fills nothing."""
    planted = PLANTED_SHAPES["12x4"].make(seed=0)
    sub = planted.planted_fine % 4
    exact = ClusterIndex.build(planted.item_ids, planted.planted_primary, sub, 12, 4)
    recovery = fine_cell_recovery(planted, exact)
    assert recovery.fine_ari == 1.0 and recovery.fine_cells_used == 48
    assert recovery.hard_fill == 1.0 and recovery.hard_false_negatives == 0.0
    collapsed = ClusterIndex.build(
        planted.item_ids, planted.planted_primary, np.zeros_like(sub), 12, 4
    )
    assert fine_cell_recovery(planted, collapsed).hard_fill == 0.0
    # Random secondary codes ignore the planted sub-clusters: a hard negative lies in each of
    # the cluster's 4 planted cells with about equal chance, the positive's own included.
    shuffled = ClusterIndex.build(
        planted.item_ids,
        planted.planted_primary,
        np.random.default_rng(0).integers(0, 4, sub.size),
        12,
        4,
    )
    assert fine_cell_recovery(planted, shuffled).hard_false_negatives == pytest.approx(
        0.25, abs=0.03
    )


def _build(tmp_path: Path, secondary: str) -> Path:
    shape = PLANTED_SHAPES["12x4"]
    planted = shape.make(seed=0)
    paths = write_npy_catalogue(tmp_path / "catalogue", planted.item_ids, planted.features)
    out = tmp_path / secondary
    argv = [
        "build", "--ids", str(paths["ids"]),
        "--modality", f"image={paths['image']}", "--modality", f"text={paths['text']}",
        "--kp", "12", "--ks", "4", "--dm", "32", "--secondary", secondary,
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def test_build_and_inspect_report_hard_candidates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = _build(tmp_path, "per_cluster")
    built = capsys.readouterr().out
    assert main(["inspect", str(default)]) == 0
    inspected = capsys.readouterr().out
    for text in (built, inspected):
        assert "per primary cluster" in text
        assert "fine cells/cluster  min 4, median 4, max 4" in text
        assert "100.0% of items have >= 5 (m_h)" in text
        assert "WARNING" not in text
        assert "size histogram" in text


def test_global_secondary_warns_in_plain_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paper = _build(tmp_path, "global")
    capsys.readouterr()
    assert main(["inspect", str(paper)]) == 0
    inspected = capsys.readouterr().out
    assert "global (one shared codebook, as in the paper)" in inspected
    assert "WARNING: only" in inspected and "--secondary per_cluster" in inspected
