"""MSAC training: fit an :class:`MSACModel` to a catalogue with mini-batch Adam (sec. 3.3.1-2).

The model, its losses and :class:`MSACConfig` are in ``msac_model.py``; this module
initialises the codebooks by k-means, runs the epochs, re-seeds dead codewords, refines
per-cluster secondary codewords (``secondary.py``) and assigns every item its codes.
``MSACConfig`` is re-exported here, next to :func:`train_msac`.

Deviation from the paper: codewords used by fewer than ``reseed_min_count`` items during an
epoch are re-seeded on recent batch inputs (not after the last epoch, so the returned
codebook is a trained one).

The catalogue is streamed (``feature_stream.py``): mini-batches are contiguous row ranges
read one at a time, in a shuffled order each epoch, so memory-mapped features larger than RAM
work. Rows inside a batch are catalogue neighbours, so a catalogue sorted by category gets
harder in-batch negatives; shuffle such a catalogue's rows once before the build. The k-means
initialisation (and the refinement) reads ``kmeans_init_items`` rows in contiguous blocks
spread evenly over the catalogue, so it sees every part of a sorted one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from esans_sampler.codebook import Codebook
from esans_sampler.feature_stream import FeatureMatrix, check_features, read_batch, spread_blocks
from esans_sampler.kmeans import kmeans
from esans_sampler.msac_model import (
    MSACConfig,
    MSACModel,
    nearest_code,
    reseed_codewords,
)
from esans_sampler.secondary import init_per_cluster, refine_per_cluster
from esans_sampler.stats import CodebookStats, codebook_stats, usage_perplexity

__all__ = [
    "CLUSTER_SIZE_QUANTILES",
    "EpochStats",
    "FeatureMatrix",
    "MSACConfig",
    "MSACResult",
    "train_msac",
]

CodeArray = npt.NDArray[np.int32]

# Recent batches whose embeddings are kept as re-seeding candidates.
_RESEED_BATCHES = 2


@dataclass(frozen=True)
class EpochStats:
    """What one training epoch did. Losses are item-weighted means over the epoch's batches.

    sq_loss is L_SQ (both levels); quantisation_error is its primary part alone, the mean
    ``||R_p - z_p[c_p]||^2`` of the coarse clusters the sampler draws from. Usage counts and
    perplexities are of the codes assigned while training; ``reseeded_*`` are the codewords
    re-seeded at the end of this epoch. ``cluster_size_quantiles``: primary cluster sizes
    (items assigned this epoch) at the 0/10/50/90/100th percentiles, a compact histogram.
    """

    epoch: int
    alignment_loss: float
    sq_loss: float
    total_loss: float
    primary_used: int
    primary_perplexity: float
    secondary_used: int
    secondary_perplexity: float
    quantisation_error: float
    reseeded_primary: int
    reseeded_secondary: int
    seconds: float
    cluster_size_quantiles: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MSACResult:
    """A trained codebook, every item's codes (N,) int32, per-epoch history, final usage.

    refined_clusters: primary clusters whose secondary codewords the final refinement replaced
    by a fresh k-means solution (per-cluster secondary codebooks only; see ``secondary.py``).
    """

    codebook: Codebook
    primary: CodeArray
    secondary: CodeArray
    history: list[EpochStats]
    final: CodebookStats
    refined_clusters: int = 0


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _init_codebooks(
    model: MSACModel,
    names: Sequence[str],
    mats: Sequence[FeatureMatrix],
    num_items: int,
    generator: torch.Generator,
    show_progress_bar: bool = False,
) -> None:
    """k-means on a spread sample of the items' initial embeddings: primary on R_p,
    secondary on R_s. The bar shows the sample being read, then each k-means."""
    config = model.config
    n_init = _sample_size(config, num_items)
    blocks = spread_blocks(num_items, n_init, config.batch_size)
    bar = tqdm(
        total=len(blocks) + 2,
        desc=f"codebook init: reading {n_init} items",
        unit="step",
        disable=not show_progress_bar,
    )
    d = config.embedding_dim
    num_modalities = model.num_modalities
    with torch.no_grad():
        # One (n_init, M * d_m) buffer holds the embeddings M_m side by side and, after the
        # primary k-means, becomes R_s in place; R_p is accumulated alongside.
        r_s = torch.empty(n_init, num_modalities * d)
        r_p = torch.zeros(n_init, d)
        filled = 0
        for start, stop in blocks:
            rows = slice(filled, filled + stop - start)
            for m, emb in enumerate(model.embed(read_batch(names, mats, start, stop))):
                r_s[rows, m * d : (m + 1) * d] = emb
                r_p[rows] += emb
            filled += stop - start
            bar.update()
        r_p /= num_modalities  # eq. 5
        bar.set_description(f"codebook init: primary k-means (K_p {config.num_primary})")
        z_p, primary = kmeans(
            r_p,
            config.num_primary,
            config.kmeans_iters,
            generator,
            num_restarts=config.kmeans_restarts,
        )
        del r_p
        bar.update()
        bar.set_description(f"codebook init: secondary k-means (K_s {config.num_secondary})")
        model.primary_codewords.copy_(z_p)
        assigned = z_p[primary]
        for m in range(num_modalities):
            r_s[:, m * d : (m + 1) * d] -= assigned  # eq. 6
        del assigned
        if model.per_cluster:
            z_s = init_per_cluster(
                r_s,
                primary,
                config.num_primary,
                config.num_secondary,
                config.kmeans_iters,
                config.kmeans_restarts,
                generator,
            )
        else:
            z_s, _ = kmeans(
                r_s,
                config.num_secondary,
                config.kmeans_iters,
                generator,
                num_restarts=config.kmeans_restarts,
            )
        model.secondary_codewords.copy_(z_s)
        bar.update()
        bar.close()


def _sample_size(config: MSACConfig, num_items: int) -> int:
    """Items sampled (spread over the catalogue) to fit the codebooks by k-means."""
    return min(num_items, max(config.kmeans_init_items, config.num_primary))


def _refine_secondary(
    model: MSACModel,
    names: Sequence[str],
    mats: Sequence[FeatureMatrix],
    num_items: int,
    generator: torch.Generator,
) -> int:
    """Refine per-cluster secondary codewords on the final residuals of the k-means sample
    (see ``secondary.py``); returns the clusters that took a fresh k-means solution."""
    config = model.config
    n = _sample_size(config, num_items)
    # Half precision halves the sample at the build's memory peak; residuals of unit vectors
    # keep ~3 significant digits, plenty for k-means. Each cluster's rows go back to float32.
    r_s = torch.empty(n, model.secondary_codewords.shape[-1], dtype=torch.float16)
    primary = torch.empty(n, dtype=torch.int64)
    filled = 0
    with torch.no_grad():
        for start, stop in spread_blocks(num_items, n, config.batch_size):
            rows = slice(filled, filled + stop - start)
            embedded = model.embed(read_batch(names, mats, start, stop))
            primary[rows] = nearest_code(torch.stack(embedded).mean(dim=0), model.primary_codewords)
            r_s[rows] = model.residuals(embedded, primary[rows])
            filled += stop - start
        return refine_per_cluster(
            model.secondary_codewords.data,
            r_s,
            primary,
            config.kmeans_iters,
            config.kmeans_restarts,
            generator,
        )


CLUSTER_SIZE_QUANTILES = (0, 10, 50, 90, 100)


def _size_quantiles(counts: torch.Tensor) -> tuple[int, ...]:
    """Primary cluster sizes of an epoch at :data:`CLUSTER_SIZE_QUANTILES` (a compact histogram)."""
    sizes = counts.numpy()
    return tuple(int(v) for v in np.percentile(sizes, CLUSTER_SIZE_QUANTILES, method="nearest"))


def _reset_adam_rows(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor
) -> None:
    """Forget Adam's moments for re-seeded codewords so old momentum does not drag them."""
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows] = 0.0


def _reseed_dead(
    model: MSACModel,
    optimizer: torch.optim.Optimizer,
    primary_counts: torch.Tensor,
    secondary_counts: torch.Tensor,
    recent: Sequence[list[torch.Tensor]],
    generator: torch.Generator,
) -> tuple[int, int]:
    threshold = model.config.reseed_min_count
    embedded = [torch.cat(parts) for parts in zip(*recent, strict=True)]
    with torch.no_grad():
        dead_p = primary_counts < threshold
        r_p = torch.stack(embedded).mean(dim=0)  # eq. 5
        n_p = reseed_codewords(model.primary_codewords, dead_p, r_p, generator)
        _reset_adam_rows(optimizer, model.primary_codewords, dead_p)
        # Residuals against the updated primary codebook (eq. 6).
        c_p = nearest_code(r_p, model.primary_codewords)
        r_s = model.residuals(embedded, c_p)
        dead_s = secondary_counts.reshape(model.secondary_codewords.shape[:-1]) < threshold
        if model.per_cluster:
            # A cluster's dead codewords move onto its own recent residuals, never another's.
            n_s = 0
            for p in torch.nonzero(dead_s.any(dim=1)).flatten().tolist():
                n_s += reseed_codewords(
                    model.secondary_codewords[p], dead_s[p], r_s[c_p == p], generator
                )
        else:
            n_s = reseed_codewords(model.secondary_codewords, dead_s, r_s, generator)
        _reset_adam_rows(optimizer, model.secondary_codewords, dead_s)
    return n_p, n_s


def _assign_all(
    model: MSACModel, names: Sequence[str], mats: Sequence[FeatureMatrix], num_items: int
) -> tuple[CodeArray, CodeArray]:
    primary = np.empty(num_items, dtype=np.int32)
    secondary = np.empty(num_items, dtype=np.int32)
    with torch.no_grad():
        for start in range(0, num_items, model.config.batch_size):
            stop = min(start + model.config.batch_size, num_items)
            embedded = model.embed(read_batch(names, mats, start, stop))
            r_p = torch.stack(embedded).mean(dim=0)  # eq. 5
            c_p = nearest_code(r_p, model.primary_codewords)
            c_s = model.secondary_code(model.residuals(embedded, c_p), c_p)
            primary[start:stop] = c_p.numpy()
            secondary[start:stop] = c_s.numpy()
    return primary, secondary


def train_msac(
    features: Mapping[str, FeatureMatrix],
    config: MSACConfig,
    progress: Callable[[EpochStats], None] | None = None,
    show_progress_bar: bool = False,
) -> MSACResult:
    """Train the MSAC maps and cascaded codebooks on a catalogue and assign every item.

    Args:
        features: modality name -> (N, D_m) matrix of any real dtype (ndarray, np.memmap,
            anything row-sliceable). Read one mini-batch at a time, never whole.
        config: hyper-parameters; ``config.seed`` fixes the result (for a fixed thread count).
        progress: called with each epoch's :class:`EpochStats` as it finishes.
        show_progress_bar: draw a tqdm bar over the training batches.

    Returns:
        :class:`MSACResult`; ``result.primary`` / ``result.secondary`` (N,) int32 equal
        ``result.codebook.assign(features)`` up to float ties.
    """
    names, mats, num_items = check_features(features)
    config.check_catalogue(num_items)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    starts = np.arange(0, num_items, config.batch_size)
    history: list[EpochStats] = []
    with _torch_threads(config.num_threads):
        model = MSACModel([int(m.shape[1]) for m in mats], config, generator)
        _init_codebooks(model, names, mats, num_items, generator, show_progress_bar)
        # fused: one kernel over every parameter, 6x faster than the default on CPU, which
        # matters for per-cluster secondary codebooks (K_p * K_s * M * d_m parameters).
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, fused=True)
        with tqdm(
            total=config.epochs * len(starts),
            desc="MSAC",
            unit="batch",
            disable=not show_progress_bar,
        ) as bar:
            for epoch in range(config.epochs):
                t0 = time.perf_counter()
                sums = np.zeros(4)  # alignment, sq, total, primary error (item-weighted)
                primary_counts = torch.zeros(config.num_primary, dtype=torch.int64)
                # Per codeword: one per fine cell with per-cluster codebooks.
                secondary_counts = torch.zeros(
                    model.secondary_codewords.shape[:-1].numel(), dtype=torch.int64
                )
                recent: deque[list[torch.Tensor]] = deque(maxlen=_RESEED_BATCHES)
                for start in rng.permutation(starts):
                    stop = min(int(start) + config.batch_size, num_items)
                    out = model(read_batch(names, mats, int(start), stop))
                    optimizer.zero_grad(set_to_none=True)
                    out.total_loss.backward()
                    optimizer.step()
                    size = stop - int(start)
                    sums += size * np.array(
                        [
                            out.alignment_loss.item(),
                            out.sq_loss.item(),
                            out.total_loss.item(),
                            out.primary_error.item(),
                        ]
                    )
                    primary_counts += torch.bincount(out.primary, minlength=config.num_primary)
                    codeword = out.secondary
                    if model.per_cluster:
                        codeword = out.primary * config.num_secondary + out.secondary
                    secondary_counts += torch.bincount(codeword, minlength=secondary_counts.numel())
                    recent.append([m.detach() for m in out.embedded])
                    bar.update(1)
                    bar.set_postfix(
                        epoch=epoch + 1, loss=f"{out.total_loss.item():.4f}", refresh=False
                    )
                reseeded = (0, 0)
                if config.reseed_dead and epoch < config.epochs - 1:
                    reseeded = _reseed_dead(
                        model, optimizer, primary_counts, secondary_counts, recent, generator
                    )
                means = sums / num_items
                local_counts = secondary_counts.reshape(-1, config.num_secondary).sum(dim=0)
                stats = EpochStats(
                    epoch=epoch,
                    alignment_loss=float(means[0]),
                    sq_loss=float(means[1]),
                    total_loss=float(means[2]),
                    primary_used=int(torch.count_nonzero(primary_counts).item()),
                    primary_perplexity=usage_perplexity(primary_counts.numpy()),
                    secondary_used=int(torch.count_nonzero(local_counts).item()),
                    secondary_perplexity=usage_perplexity(local_counts.numpy()),
                    quantisation_error=float(means[3]),
                    reseeded_primary=reseeded[0],
                    reseeded_secondary=reseeded[1],
                    seconds=time.perf_counter() - t0,
                    cluster_size_quantiles=_size_quantiles(primary_counts),
                )
                history.append(stats)
                if progress is not None:
                    progress(stats)
        refined = 0
        if model.per_cluster:
            # Adam's moments and the gradients are done with: free them before the sample.
            del optimizer
            model.zero_grad(set_to_none=True)
            refined = _refine_secondary(model, names, mats, num_items, generator)
        codebook = model.to_codebook(names)
        primary, secondary = _assign_all(model, names, mats, num_items)
    final = codebook_stats(primary, secondary, config.num_primary, config.num_secondary)
    return MSACResult(
        codebook=codebook,
        primary=primary,
        secondary=secondary,
        history=history,
        final=final,
        refined_clusters=refined,
    )
