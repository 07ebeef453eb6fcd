"""MSAC training: multimodal alignment plus cascaded primary/secondary codebooks (sec. 3.3.1-2).

Each modality's frozen features R_m (N, D_m) go through a learned linear map H_m to an
aligned embedding M_m (N, d_m) (eq. 3). A CLIP-style symmetric InfoNCE pulls the views of
one item together (eq. 4); the mean of the views is quantised by the primary codebook
(eq. 5) and the concatenated per-view residuals by one global secondary codebook (eq. 6);
L_SQ (eq. 7) is added to the weighted alignment losses (eq. 8) and everything is trained
jointly with mini-batch Adam.

Deviations from the paper (equation numbers below are the paper's):

* M_m is L2-normalised before quantisation (see ``codebook.py``): the alignment loss is
  scale-free, so otherwise L_SQ is minimised by shrinking the maps.
* The alignment loss is the symmetric (a->b and b->a) InfoNCE of CLIP, with a fixed
  temperature; eq. 4 writes one direction.
* L_SQ is the batch mean rather than the sum, so the learning rate does not depend on the
  batch size. Gradients reach both the maps and the codewords (no stop-gradient split).
* Codewords used by fewer than ``reseed_min_count`` items during an epoch are re-seeded on
  recent batch inputs (not after the last epoch, so the returned codebook is a trained one).

The catalogue is streamed: mini-batches are contiguous row ranges read one at a time, in a
shuffled order each epoch, so memory-mapped features larger than RAM work. Rows inside a
batch are catalogue neighbours, so a catalogue sorted by category gets harder in-batch
negatives; shuffle such a catalogue's rows once before the build. The k-means
initialisation reads ``kmeans_init_items`` rows in contiguous blocks spread evenly over the
catalogue, so it sees every part of a sorted one.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from esans_sampler.codebook import Codebook
from esans_sampler.errors import InvalidInputError
from esans_sampler.kmeans import kmeans
from esans_sampler.stats import CodebookStats, codebook_stats, usage_perplexity

CodeArray = npt.NDArray[np.int32]

# Std of the Gaussian jitter added to a re-seeded codeword, relative to the RMS coordinate
# of the inputs it is copied from (keeps two re-seeds of one input apart).
_RESEED_NOISE = 0.01
# Recent batches whose embeddings are kept as re-seeding candidates.
_RESEED_BATCHES = 2


def _is_real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class FeatureMatrix(Protocol):
    """A 2-D (N, D_m) matrix that can be sliced by rows: ndarray, np.memmap, h5py dataset."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice, /) -> Any: ...


@dataclass(frozen=True)
class MSACConfig:
    """Hyper-parameters of an MSAC build (defaults: paper Table 6 and ESANS-SPEC).

    alignment_temperature: fixed CLIP temperature on cosine similarity. 0.07 is CLIP's
        starting value: logits span +-14, sharp enough to separate the one positive from a
        batch of ~1000, while much smaller values make the loss chase the hardest in-batch
        "negatives", which in a clustered catalogue are often items of the same cluster.
    epochs: passes over the catalogue; 3 keeps a 100k-item, 3-modality build on 2 CPU
        threads well inside two minutes (see benchmarks/bench_build.py).
    kmeans_init_items: this many items, in blocks spread over the catalogue, seed k-means.
    kmeans_restarts: k-means++ seedings per codebook; the one with the lowest potential is
        refined by Lloyd. A bad seeding (two codewords in one cluster, none in another) is
        rarely repaired later, neither by Lloyd nor by the joint training.
    reseed_min_count: with ``reseed_dead``, codewords assigned fewer items than this over
        an epoch are re-seeded (1 = only unused ones).
    num_threads: torch intra-op threads during the build (None = leave torch's setting).
    """

    embedding_dim: int = 512
    num_primary: int = 300
    num_secondary: int = 15
    beta: float = 2.0
    alignment_temperature: float = 0.07
    epochs: int = 3
    batch_size: int = 1024
    learning_rate: float = 1e-3
    kmeans_init_items: int = 20_000
    kmeans_iters: int = 20
    kmeans_restarts: int = 3
    reseed_dead: bool = True
    reseed_min_count: int = 1
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        positive_ints = {
            "embedding_dim": self.embedding_dim,
            "num_primary": self.num_primary,
            "num_secondary": self.num_secondary,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "kmeans_init_items": self.kmeans_init_items,
            "kmeans_restarts": self.kmeans_restarts,
            "reseed_min_count": self.reseed_min_count,
        }
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        for name, value in {"kmeans_iters": self.kmeans_iters, "seed": self.seed}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{name} must be a non-negative integer, got {value!r}")
        if not (_is_real(self.beta) and self.beta >= 0.0):
            raise InvalidInputError(f"beta must be finite and >= 0, got {self.beta!r}")
        for name, fvalue in {
            "alignment_temperature": self.alignment_temperature,
            "learning_rate": self.learning_rate,
        }.items():
            if not (_is_real(fvalue) and fvalue > 0.0):
                raise InvalidInputError(f"{name} must be finite and > 0, got {fvalue!r}")
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool)
            or not isinstance(self.num_threads, int)
            or self.num_threads < 1
        ):
            raise InvalidInputError(f"num_threads must be None or >= 1, got {self.num_threads!r}")

    def check_catalogue(self, num_items: int) -> None:
        """Raise InvalidInputError if a catalogue of ``num_items`` cannot fill the codebooks."""
        if num_items < self.num_primary or num_items < self.num_secondary:
            raise InvalidInputError(
                f"a catalogue of {num_items} items cannot train {self.num_primary} primary and "
                f"{self.num_secondary} secondary codewords; lower num_primary/num_secondary"
            )


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
    """A trained codebook, every item's codes (N,) int32, per-epoch history, final usage."""

    codebook: Codebook
    primary: CodeArray
    secondary: CodeArray
    history: list[EpochStats]
    final: CodebookStats


@dataclass(frozen=True)
class MSACOutput:
    """One forward pass over a batch of B items.

    Scalars: alignment_loss, primary_error, secondary_error, sq_loss, total_loss.
    primary, secondary: (B,) int64 codes. embedded: the M L2-normalised embeddings M_m,
    each (B, d_m).
    """

    alignment_loss: torch.Tensor
    primary_error: torch.Tensor
    secondary_error: torch.Tensor
    sq_loss: torch.Tensor
    total_loss: torch.Tensor
    primary: torch.Tensor
    secondary: torch.Tensor
    embedded: list[torch.Tensor]


def nearest_code(x: torch.Tensor, codewords: torch.Tensor) -> torch.Tensor:
    """``argmin_k ||x - z_k||`` (B,) int64, computed like ``codebook.nearest_codeword``."""
    scores = x @ codewords.T
    scores = scores * -2.0 + (codewords * codewords).sum(dim=1)[None, :]
    return scores.argmin(dim=1)


def clip_alignment_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of two L2-normalised views (B, d): row i of ``a`` matches row i of ``b``.

    The other rows of the batch are the negatives; cosine similarity / temperature (eq. 4).
    """
    logits = (a @ b.T) / temperature
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class MSACModel(nn.Module):
    """Linear maps H_m, primary codebook (K_p, d_m) and secondary codebook (K_s, M * d_m)."""

    def __init__(
        self, input_dims: Sequence[int], config: MSACConfig, generator: torch.Generator
    ) -> None:
        super().__init__()
        if not input_dims or any(d < 1 for d in input_dims):
            raise InvalidInputError(f"need >= 1 modality of width >= 1, got {list(input_dims)}")
        self.config = config
        d = config.embedding_dim
        weights, biases = [], []
        for dim in input_dims:
            # nn.Linear's default init (uniform +-1/sqrt(D_m)), drawn from our generator.
            bound = 1.0 / math.sqrt(dim)
            weights.append(
                nn.Parameter(torch.empty(d, dim).uniform_(-bound, bound, generator=generator))
            )
            biases.append(nn.Parameter(torch.empty(d).uniform_(-bound, bound, generator=generator)))
        self.map_weights = nn.ParameterList(weights)
        self.map_biases = nn.ParameterList(biases)
        # Placeholders until k-means (init_codebooks) fills them.
        self.primary_codewords = nn.Parameter(torch.zeros(config.num_primary, d))
        self.secondary_codewords = nn.Parameter(
            torch.zeros(config.num_secondary, len(input_dims) * d)
        )

    @property
    def num_modalities(self) -> int:
        return len(self.map_weights)

    def embed(self, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """L2-normalised aligned embeddings M_m (B, d_m), one per modality (eq. 3)."""
        if len(batch) != self.num_modalities:
            raise InvalidInputError(
                f"expected {self.num_modalities} modality batches, got {len(batch)}"
            )
        return [
            F.normalize(F.linear(x, w, b), dim=1)
            for x, w, b in zip(batch, self.map_weights, self.map_biases, strict=True)
        ]

    def residuals(self, embedded: Sequence[torch.Tensor], primary: torch.Tensor) -> torch.Tensor:
        """R_s (B, M * d_m): each view minus its item's primary codeword, concatenated (eq. 6)."""
        z_p = self.primary_codewords[primary]
        return torch.cat([m - z_p for m in embedded], dim=1)

    def alignment_loss(self, embedded: Sequence[torch.Tensor]) -> torch.Tensor:
        """beta * sum over unordered modality pairs of the CLIP loss; 0 when M = 1 (eq. 4, 8)."""
        total = torch.zeros(())
        for a, b in itertools.combinations(embedded, 2):
            total = total + self.config.beta * clip_alignment_loss(
                a, b, self.config.alignment_temperature
            )
        return total

    def forward(self, batch: Sequence[torch.Tensor]) -> MSACOutput:
        embedded = self.embed(batch)
        r_p = torch.stack(embedded).mean(dim=0)  # eq. 5
        with torch.no_grad():
            primary = nearest_code(r_p, self.primary_codewords)
        r_s = self.residuals(embedded, primary)  # eq. 6
        with torch.no_grad():
            secondary = nearest_code(r_s, self.secondary_codewords)
        # eq. 7 (batch mean): gradients flow into the maps and into both codebooks.
        primary_error = (r_p - self.primary_codewords[primary]).pow(2).sum(dim=1).mean()
        secondary_error = (r_s - self.secondary_codewords[secondary]).pow(2).sum(dim=1).mean()
        sq_loss = primary_error + secondary_error
        alignment = self.alignment_loss(embedded)
        return MSACOutput(
            alignment_loss=alignment,
            primary_error=primary_error,
            secondary_error=secondary_error,
            sq_loss=sq_loss,
            total_loss=alignment + sq_loss,  # eq. 8
            primary=primary,
            secondary=secondary,
            embedded=embedded,
        )

    def to_codebook(self, modality_names: Sequence[str]) -> Codebook:
        """The trained maps and codewords as a numpy :class:`Codebook`."""

        def arr(t: torch.Tensor) -> npt.NDArray[np.float32]:
            return t.detach().cpu().numpy().astype(np.float32, copy=True)

        return Codebook(
            modality_names=tuple(modality_names),
            map_weights=tuple(arr(w) for w in self.map_weights),
            map_biases=tuple(arr(b) for b in self.map_biases),
            primary_codewords=arr(self.primary_codewords),
            secondary_codewords=arr(self.secondary_codewords),
        )


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


def _check_features(
    features: Mapping[str, FeatureMatrix],
) -> tuple[list[str], list[FeatureMatrix], int]:
    if not isinstance(features, Mapping) or not features:
        raise InvalidInputError("features must be a non-empty mapping of modality name -> matrix")
    names = [str(n) for n in features]
    mats = list(features.values())
    rows = set()
    for name, mat in zip(names, mats, strict=True):
        shape = getattr(mat, "shape", None)
        if shape is None or len(shape) != 2 or shape[1] < 1:
            raise InvalidInputError(f"modality {name!r} must be a 2-D (N, D_m) matrix, got {shape}")
        dtype = getattr(mat, "dtype", None)
        if dtype is not None and not (
            np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
        ):
            raise InvalidInputError(f"modality {name!r} has non-numeric dtype {dtype}")
        rows.add(int(shape[0]))
    if len(rows) != 1:
        raise InvalidInputError(f"modalities disagree on the number of items: {sorted(rows)}")
    return names, mats, rows.pop()


def _read_batch(
    names: Sequence[str], mats: Sequence[FeatureMatrix], start: int, stop: int
) -> list[torch.Tensor]:
    """Rows [start, stop) of every modality as fresh float32 tensors (one batch in memory)."""
    out = []
    for name, mat in zip(names, mats, strict=True):
        block = np.array(mat[start:stop], dtype=np.float32)  # copy: memmaps are read-only
        if not np.isfinite(block).all():
            raise InvalidInputError(f"modality {name!r} has NaN or inf in rows {start}..{stop - 1}")
        out.append(torch.from_numpy(block))
    return out


def _init_codebooks(
    model: MSACModel,
    names: Sequence[str],
    mats: Sequence[FeatureMatrix],
    num_items: int,
    generator: torch.Generator,
) -> None:
    """k-means on a spread sample of the items' initial embeddings: primary on R_p,
    secondary on R_s."""
    config = model.config
    n_init = min(num_items, max(config.kmeans_init_items, config.num_primary))
    blocks = _init_blocks(num_items, n_init, config.batch_size)
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
            for m, emb in enumerate(model.embed(_read_batch(names, mats, start, stop))):
                r_s[rows, m * d : (m + 1) * d] = emb
                r_p[rows] += emb
            filled += stop - start
        r_p /= num_modalities  # eq. 5
        z_p, primary = kmeans(
            r_p,
            config.num_primary,
            config.kmeans_iters,
            generator,
            num_restarts=config.kmeans_restarts,
        )
        del r_p
        model.primary_codewords.copy_(z_p)
        assigned = z_p[primary]
        for m in range(num_modalities):
            r_s[:, m * d : (m + 1) * d] -= assigned  # eq. 6
        del assigned
        z_s, _ = kmeans(
            r_s,
            config.num_secondary,
            config.kmeans_iters,
            generator,
            num_restarts=config.kmeans_restarts,
        )
        model.secondary_codewords.copy_(z_s)


_MIN_INIT_BLOCKS = 16
CLUSTER_SIZE_QUANTILES = (0, 10, 50, 90, 100)


def _size_quantiles(counts: torch.Tensor) -> tuple[int, ...]:
    """Primary cluster sizes of an epoch at :data:`CLUSTER_SIZE_QUANTILES` (a compact histogram)."""
    sizes = counts.numpy()
    return tuple(int(v) for v in np.percentile(sizes, CLUSTER_SIZE_QUANTILES, method="nearest"))


def _init_blocks(num_items: int, n_init: int, block_rows: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, ``n_init`` rows in all, spread evenly over the catalogue.

    Contiguous so a memory-mapped file is read sequentially; spread so a catalogue sorted by
    category still seeds k-means with every part of it, not just its first rows.
    """
    num_blocks = max(-(-n_init // block_rows), min(_MIN_INIT_BLOCKS, n_init))
    rows_per_block = -(-n_init // num_blocks)
    stride = num_items // num_blocks
    if stride < rows_per_block:
        return [(start, min(start + block_rows, n_init)) for start in range(0, n_init, block_rows)]
    blocks = []
    for k in range(num_blocks):
        size = min(rows_per_block, n_init - k * rows_per_block)
        if size > 0:
            blocks.append((k * stride, k * stride + size))
    return blocks


def reseed_codewords(
    codewords: torch.Tensor,
    dead: torch.Tensor,
    candidates: torch.Tensor,
    generator: torch.Generator,
) -> int:
    """Move the codewords flagged in ``dead`` (K,) bool onto random rows of ``candidates``.

    codewords: (K, d) parameter, changed in place. candidates: (n, d) recent inputs of this
    codebook. A little Gaussian jitter keeps two copies of one input apart. Returns the count.
    """
    idx = torch.nonzero(dead).flatten()
    k = int(idx.numel())
    if k == 0 or candidates.shape[0] == 0:
        return 0
    n = candidates.shape[0]
    if k <= n:
        rows = torch.randperm(n, generator=generator)[:k]
    else:
        rows = torch.randint(n, (k,), generator=generator)
    picked = candidates[rows]
    scale = _RESEED_NOISE * float(candidates.pow(2).mean().sqrt().item())
    noise = torch.randn(picked.shape, generator=generator, dtype=picked.dtype) * scale
    with torch.no_grad():
        codewords[idx] = picked + noise
    return k


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
        r_s = model.residuals(embedded, nearest_code(r_p, model.primary_codewords))
        dead_s = secondary_counts < threshold
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
            embedded = model.embed(_read_batch(names, mats, start, stop))
            r_p = torch.stack(embedded).mean(dim=0)  # eq. 5
            c_p = nearest_code(r_p, model.primary_codewords)
            c_s = nearest_code(model.residuals(embedded, c_p), model.secondary_codewords)
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
    names, mats, num_items = _check_features(features)
    config.check_catalogue(num_items)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    starts = np.arange(0, num_items, config.batch_size)
    history: list[EpochStats] = []
    with _torch_threads(config.num_threads):
        model = MSACModel([int(m.shape[1]) for m in mats], config, generator)
        _init_codebooks(model, names, mats, num_items, generator)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
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
                secondary_counts = torch.zeros(config.num_secondary, dtype=torch.int64)
                recent: deque[list[torch.Tensor]] = deque(maxlen=_RESEED_BATCHES)
                for start in rng.permutation(starts):
                    stop = min(int(start) + config.batch_size, num_items)
                    out = model(_read_batch(names, mats, int(start), stop))
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
                    secondary_counts += torch.bincount(
                        out.secondary, minlength=config.num_secondary
                    )
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
                stats = EpochStats(
                    epoch=epoch,
                    alignment_loss=float(means[0]),
                    sq_loss=float(means[1]),
                    total_loss=float(means[2]),
                    primary_used=int(torch.count_nonzero(primary_counts).item()),
                    primary_perplexity=usage_perplexity(primary_counts.numpy()),
                    secondary_used=int(torch.count_nonzero(secondary_counts).item()),
                    secondary_perplexity=usage_perplexity(secondary_counts.numpy()),
                    quantisation_error=float(means[3]),
                    reseeded_primary=reseeded[0],
                    reseeded_secondary=reseeded[1],
                    seconds=time.perf_counter() - t0,
                    cluster_size_quantiles=_size_quantiles(primary_counts),
                )
                history.append(stats)
                if progress is not None:
                    progress(stats)
        codebook = model.to_codebook(names)
        primary, secondary = _assign_all(model, names, mats, num_items)
    final = codebook_stats(primary, secondary, config.num_primary, config.num_secondary)
    return MSACResult(
        codebook=codebook, primary=primary, secondary=secondary, history=history, final=final
    )
