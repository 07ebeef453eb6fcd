from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from esans_sampler.errors import InvalidInputError
from esans_sampler.msac import EpochStats, MSACConfig, MSACResult, train_msac
from esans_sampler.msac_model import MSACModel, reseed_codewords
from esans_sampler.synthetic import PlantedCatalogue, adjusted_rand_index, make_planted_catalogue

WIDTHS = {"image": 96, "text": 48, "graph": 16}
SMALL = MSACConfig(
    embedding_dim=32,
    num_primary=8,
    num_secondary=3,
    epochs=3,
    batch_size=256,
    kmeans_init_items=2000,
    num_threads=2,
)
# Measured ARI(planted primary, trained primary) with SMALL on the catalogue below: 1.000
# (also 1.000 for training seeds 0-7 on catalogue seeds 0-2). The threshold leaves room for
# float differences across BLAS builds and thread counts.
MIN_PLANTED_ARI = 0.9


@pytest.fixture(scope="module")
def planted() -> PlantedCatalogue:
    return make_planted_catalogue(3000, WIDTHS, num_clusters=8, num_subclusters=3, seed=0)


@pytest.fixture(scope="module")
def trained(planted: PlantedCatalogue) -> MSACResult:
    return train_msac(planted.features, SMALL)


def _codes_agree(result: MSACResult, features: Mapping[str, npt.ArrayLike]) -> float:
    primary, secondary = result.codebook.assign(features)
    return float(np.mean((primary == result.primary) & (secondary == result.secondary)))


# --- end to end ---------------------------------------------------------------------------


def test_recovers_planted_primary_clusters(planted: PlantedCatalogue, trained: MSACResult) -> None:
    ari = adjusted_rand_index(planted.planted_primary, trained.primary)
    assert ari >= MIN_PLANTED_ARI


def test_final_codes_equal_numpy_assign(planted: PlantedCatalogue, trained: MSACResult) -> None:
    assert trained.primary.dtype == np.int32 and trained.secondary.dtype == np.int32
    assert trained.primary.shape == trained.secondary.shape == (3000,)
    assert _codes_agree(trained, planted.features) >= 0.999


def test_global_secondary_is_the_papers_shared_codebook(planted: PlantedCatalogue) -> None:
    result = train_msac(planted.features, replace(SMALL, secondary="global"))
    assert result.codebook.secondary_codewords.shape == (3, 3 * 32)
    assert result.codebook.secondary_mode == "global"
    assert _codes_agree(result, planted.features) >= 0.999


def test_result_shapes_and_stats(trained: MSACResult) -> None:
    cb = trained.codebook
    assert cb.modality_names == ("image", "text", "graph")
    assert cb.input_dims == (96, 48, 16)
    assert cb.primary_codewords.shape == (8, 32)
    assert cb.secondary_codewords.shape == (8, 3, 3 * 32)  # per primary cluster
    assert cb.secondary_mode == "per_cluster"
    assert all(w.dtype == np.float32 for w in cb.map_weights)
    assert [h.epoch for h in trained.history] == [0, 1, 2]
    assert trained.final.num_items == 3000
    assert trained.final.primary_used == 8
    assert trained.final.primary_used == np.unique(trained.primary).size
    last = trained.history[-1]
    assert last.total_loss == pytest.approx(last.alignment_loss + last.sq_loss, rel=1e-5)
    assert 0.0 < last.quantisation_error <= last.sq_loss
    assert 1.0 <= last.primary_perplexity <= 8.0


def test_alignment_loss_decreases_with_three_modalities(trained: MSACResult) -> None:
    losses = [h.alignment_loss for h in trained.history]
    assert losses[-1] < losses[0]
    assert all(b <= a for a, b in itertools.pairwise(losses))


def test_single_modality_has_no_alignment_term(planted: PlantedCatalogue) -> None:
    features = {"image": planted.features["image"]}
    result = train_msac(features, replace(SMALL, epochs=2))
    assert all(h.alignment_loss == 0.0 for h in result.history)
    assert all(h.total_loss == pytest.approx(h.sq_loss) for h in result.history)
    assert result.codebook.secondary_codewords.shape == (8, 3, 32)
    assert adjusted_rand_index(planted.planted_primary, result.primary) >= MIN_PLANTED_ARI
    assert _codes_agree(result, features) >= 0.999


def test_same_seed_same_result(planted: PlantedCatalogue) -> None:
    config = replace(SMALL, epochs=2)
    a = train_msac(planted.features, config)
    b = train_msac(planted.features, config)
    assert np.array_equal(a.primary, b.primary) and np.array_equal(a.secondary, b.secondary)
    assert np.array_equal(a.codebook.primary_codewords, b.codebook.primary_codewords)
    for wa, wb in zip(a.codebook.map_weights, b.codebook.map_weights, strict=True):
        assert np.array_equal(wa, wb)
    c = train_msac(planted.features, replace(config, seed=1))
    assert not np.array_equal(a.codebook.map_weights[0], c.codebook.map_weights[0])


# --- inputs -------------------------------------------------------------------------------


class _SpyMatrix:
    """A row-sliceable matrix that records the size of every read."""

    def __init__(self, data: npt.NDArray[Any]) -> None:
        self._data = data
        self.reads: list[int] = []

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._data.dtype

    def __getitem__(self, key: slice, /) -> npt.NDArray[Any]:
        out = self._data[key]
        self.reads.append(int(out.shape[0]))
        return out


def test_streams_memmaps_of_any_dtype_in_batches(planted: PlantedCatalogue, tmp_path: Path) -> None:
    np.save(tmp_path / "image.npy", planted.features["image"].astype(np.float16))
    image = np.load(tmp_path / "image.npy", mmap_mode="r")
    text = _SpyMatrix(planted.features["text"].astype(np.float64))
    config = replace(SMALL, epochs=1)
    result = train_msac({"image": image, "text": text}, config)
    assert max(text.reads) <= config.batch_size
    assert sum(text.reads) >= 3000 * 2  # init + epoch + final assignment
    assert _codes_agree(result, {"image": image, "text": planted.features["text"]}) >= 0.999


def test_progress_callback_and_bar(
    planted: PlantedCatalogue, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[EpochStats] = []
    result = train_msac(
        planted.features, replace(SMALL, epochs=2), progress=seen.append, show_progress_bar=True
    )
    assert seen == result.history
    assert "MSAC" in capsys.readouterr().err


def test_thread_setting_is_restored(planted: PlantedCatalogue) -> None:
    before = torch.get_num_threads()
    train_msac(planted.features, replace(SMALL, epochs=1, num_threads=1))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "features",
    [
        {},
        {"a": np.zeros(10, dtype=np.float32)},
        {"a": np.zeros((10, 0), dtype=np.float32)},
        {"a": np.zeros((10, 4), dtype=np.float32), "b": np.zeros((9, 4), dtype=np.float32)},
        {"a": np.array([["x"] * 4] * 10)},
    ],
)
def test_malformed_features_are_rejected(features: dict[str, npt.NDArray[Any]]) -> None:
    with pytest.raises(InvalidInputError):
        train_msac(features, replace(SMALL, num_primary=2, num_secondary=2))


def test_non_finite_features_are_rejected() -> None:
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    x[37, 2] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        train_msac({"a": x}, replace(SMALL, num_primary=2, num_secondary=2, batch_size=16))


def test_catalogue_smaller_than_codebook_is_rejected() -> None:
    x = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(InvalidInputError, match="cannot train"):
        train_msac({"a": x}, SMALL)


@pytest.mark.parametrize(
    "overrides",
    [
        {"embedding_dim": 0},
        {"num_primary": 0},
        {"num_secondary": -1},
        {"beta": -1.0},
        {"beta": float("nan")},
        {"beta": "2"},
        {"alignment_temperature": 0.0},
        {"epochs": 0},
        {"batch_size": 0},
        {"learning_rate": 0.0},
        {"learning_rate": float("inf")},
        {"kmeans_init_items": 0},
        {"kmeans_iters": -1},
        {"kmeans_restarts": 0},
        {"reseed_min_count": 0},
        {"seed": -1},
        {"num_threads": 0},
        {"num_primary": 2.5},
        {"epochs": True},
    ],
)
def test_bad_config_is_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        MSACConfig(**overrides)


# --- training mechanics -------------------------------------------------------------------


@pytest.mark.parametrize("secondary", ["per_cluster", "global"])
def test_one_step_moves_maps_and_both_codebooks(secondary: str) -> None:
    config = replace(SMALL, num_primary=4, num_secondary=2, secondary=secondary)
    gen = torch.Generator().manual_seed(0)
    model = MSACModel([6, 5], config, gen)
    with torch.no_grad():
        model.primary_codewords.copy_(torch.randn(4, 32, generator=gen) * 0.1)
        shape = model.secondary_codewords.shape
        model.secondary_codewords.copy_(torch.randn(shape, generator=gen) * 0.1)
    batch = [torch.randn(64, 6, generator=gen), torch.randn(64, 5, generator=gen)]
    before = [p.detach().clone() for p in model.parameters()]
    out = model(batch)
    out.total_loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0.0, name
    # Only codewords some item was assigned to receive a gradient from L_SQ.
    used = torch.zeros(4, dtype=torch.bool)
    used[out.primary] = True
    grad_rows = model.primary_codewords.grad.abs().sum(dim=1) > 0  # type: ignore[union-attr]
    assert torch.equal(grad_rows, used)
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    for (name, param), old in zip(model.named_parameters(), before, strict=True):
        assert not torch.equal(param.detach(), old), name


@pytest.mark.parametrize("secondary", ["per_cluster", "global"])
def test_forward_matches_the_equations(secondary: str) -> None:
    config = replace(SMALL, num_primary=3, num_secondary=2, beta=1.5, secondary=secondary)
    gen = torch.Generator().manual_seed(1)
    model = MSACModel([4, 4], config, gen)
    with torch.no_grad():
        model.primary_codewords.copy_(torch.randn(3, 32, generator=gen) * 0.3)
        shape = model.secondary_codewords.shape
        model.secondary_codewords.copy_(torch.randn(shape, generator=gen) * 0.3)
    batch = [torch.randn(16, 4, generator=gen), torch.randn(16, 4, generator=gen)]
    out = model(batch)
    with torch.no_grad():
        m = [
            torch.nn.functional.normalize(x @ w.T + b, dim=1)
            for x, w, b in zip(batch, model.map_weights, model.map_biases, strict=True)
        ]
        r_p = (m[0] + m[1]) / 2
        c_p = torch.cdist(r_p, model.primary_codewords).argmin(dim=1)
        z = model.primary_codewords[c_p]
        r_s = torch.cat([m[0] - z, m[1] - z], dim=1)
        if secondary == "global":  # eq. 6-7: one codebook for every cluster
            own = model.secondary_codewords.expand(16, -1, -1)
        else:  # each item's own cluster's codewords
            own = model.secondary_codewords[c_p]
        c_s = torch.stack([torch.cdist(r_s[i : i + 1], own[i]).argmin() for i in range(16)])
        z_s = own[torch.arange(16), c_s]
        sq = ((r_p - z) ** 2).sum(1).mean() + ((r_s - z_s) ** 2).sum(1).mean()
        logits = m[0] @ m[1].T / config.alignment_temperature
        target = torch.arange(16)
        clip = 0.5 * (
            torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.T, target)
        )
    assert torch.equal(out.primary, c_p) and torch.equal(out.secondary, c_s)
    assert out.sq_loss.item() == pytest.approx(float(sq), rel=1e-5)
    assert out.alignment_loss.item() == pytest.approx(1.5 * float(clip), rel=1e-5)


def test_reseed_moves_only_dead_codewords_onto_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    codewords = torch.nn.Parameter(torch.zeros(5, 3))
    candidates = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    dead = torch.tensor([False, True, False, True, False])
    assert reseed_codewords(codewords, dead, candidates, gen) == 2
    assert torch.equal(codewords[~dead], torch.zeros(3, 3))
    distance_to_inputs = torch.cdist(codewords[dead].detach(), candidates).min(dim=1).values
    assert float(distance_to_inputs.max()) < 1.0  # a candidate plus small jitter
    assert not torch.equal(codewords[1], codewords[3])
    assert reseed_codewords(codewords, torch.zeros(5, dtype=torch.bool), candidates, gen) == 0


def _four_distinct_items() -> dict[str, npt.NDArray[np.float32]]:
    # 400 items that are copies of 4 distinct ones: 8 primary codewords cannot all be used.
    rng = np.random.default_rng(0)
    base = {name: rng.normal(size=(4, width)).astype(np.float32) for name, width in WIDTHS.items()}
    return {name: np.tile(rows, (100, 1)) for name, rows in base.items()}


def test_dead_codewords_are_reseeded_and_counted() -> None:
    config = replace(SMALL, epochs=2, batch_size=100)
    result = train_msac(_four_distinct_items(), config)
    first = result.history[0]
    assert first.primary_used <= 4
    assert first.reseeded_primary >= config.num_primary - 4
    assert result.history[-1].reseeded_primary == 0  # never after the last epoch
    off = train_msac(_four_distinct_items(), replace(config, reseed_dead=False))
    assert all(h.reseeded_primary == h.reseeded_secondary == 0 for h in off.history)


def test_reseed_threshold_counts_rare_codewords_as_dead(planted: PlantedCatalogue) -> None:
    # Every codeword holds ~375 items; a threshold above that re-seeds all of them.
    config = replace(SMALL, epochs=2, reseed_min_count=3001)
    result = train_msac(planted.features, config)
    assert result.history[0].reseeded_primary == config.num_primary
    # per primary cluster: every fine cell's codeword
    assert result.history[0].reseeded_secondary == config.num_primary * config.num_secondary
    result = train_msac(planted.features, replace(config, secondary="global"))
    assert result.history[0].reseeded_secondary == config.num_secondary


@pytest.mark.parametrize(
    ("num_items", "n_init", "block_rows"),
    [(100_000, 20_000, 1024), (1500, 1400, 1024), (3000, 3000, 1024), (10_000, 300, 1024)],
)
def test_init_blocks_cover_n_init_rows_spread_without_overlap(
    num_items: int, n_init: int, block_rows: int
) -> None:
    from esans_sampler.feature_stream import spread_blocks

    blocks = spread_blocks(num_items, n_init, block_rows)
    assert sum(stop - start for start, stop in blocks) == n_init
    assert all(0 <= start < stop <= num_items for start, stop in blocks)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(blocks))
    if n_init * 2 <= num_items:
        assert blocks[-1][0] >= num_items // 2, "the sample must reach the catalogue's end"
