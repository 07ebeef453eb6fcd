"""The MSAC model: multimodal alignment plus cascaded primary/secondary codebooks (sec. 3.3.1-2).

Each modality's frozen features R_m (N, D_m) go through a learned linear map H_m to an
aligned embedding M_m (N, d_m) (eq. 3). A CLIP-style symmetric InfoNCE pulls the views of
one item together (eq. 4); the mean of the views is quantised by the primary codebook
(eq. 5) and the concatenated per-view residuals by the secondary codebook (eq. 6);
L_SQ (eq. 7) is added to the weighted alignment losses (eq. 8). The training loop that fits
this model to a catalogue is ``msac.py``.

Deviations from the paper (equation numbers below are the paper's):

* By default the secondary codebook is one set of K_s codewords *per primary cluster*
  (``secondary="per_cluster"``), not one global set (``secondary="global"``, the paper's
  form). Where the residual after the primary codeword is dominated by an offset that differs
  per cluster, K_s global codewords quantise those offsets: every cluster collapses into one
  fine cell and no positive gets hard negatives. Per-cluster codewords quantise the structure
  inside each cluster, so every cluster splits into up to K_s fine cells.

* M_m is L2-normalised before quantisation (see ``codebook.py``): the alignment loss is
  scale-free, so otherwise L_SQ is minimised by shrinking the maps.
* The alignment loss is the symmetric (a->b and b->a) InfoNCE of CLIP, with a fixed
  temperature; eq. 4 writes one direction.
* L_SQ is the batch mean rather than the sum, so the learning rate does not depend on the
  batch size. Gradients reach both the maps and the codewords (no stop-gradient split).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from esans_sampler.codebook import Codebook
from esans_sampler.errors import InvalidInputError

PER_CLUSTER = "per_cluster"
GLOBAL = "global"
SECONDARY_MODES = (PER_CLUSTER, GLOBAL)

# Std of the Gaussian jitter added to a re-seeded codeword, relative to the RMS coordinate
# of the inputs it is copied from (keeps two re-seeds of one input apart).
_RESEED_NOISE = 0.01


def _is_real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MSACConfig:
    """Hyper-parameters of an MSAC build (defaults: the paper's Table 6 and the README).

    alignment_temperature: fixed CLIP temperature on cosine similarity. 0.07 is CLIP's
        starting value: logits span +-14, sharp enough to separate the one positive from a
        batch of ~1000, while much smaller values make the loss chase the hardest in-batch
        "negatives", which in a clustered catalogue are often items of the same cluster.
    secondary: ``"per_cluster"`` (default: K_s codewords for each primary cluster) or
        ``"global"`` (the paper: one codebook of K_s codewords shared by all clusters).
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
    secondary: str = PER_CLUSTER
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
        if self.secondary not in SECONDARY_MODES:
            raise InvalidInputError(
                f"secondary must be one of {', '.join(SECONDARY_MODES)}, got {self.secondary!r}"
            )
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


def nearest_code_in_cluster(
    x: torch.Tensor, primary: torch.Tensor, codewords: torch.Tensor
) -> torch.Tensor:
    """``argmin_k ||x_i - z[p_i, k]||`` (B,) int64 for per-cluster ``codewords`` (K_p, K_s, D).

    x: (B, D) residuals; primary: (B,) int64 primary codes p_i. One small matmul per cluster
    present in the batch: gathering every row's (K_s, D) codewords costs B * K_s * D floats
    (94 MB at B = 1024 and the paper's sizes) and twice the time.
    """
    codes = torch.empty(x.shape[0], dtype=torch.int64)
    order = torch.argsort(primary)
    clusters, counts = torch.unique_consecutive(primary[order], return_counts=True)
    for p, rows in zip(clusters.tolist(), torch.split(order, counts.tolist()), strict=True):
        codes[rows] = nearest_code(x[rows], codewords[p])
    return codes


def clip_alignment_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of two L2-normalised views (B, d): row i of ``a`` matches row i of ``b``.

    The other rows of the batch are the negatives; cosine similarity / temperature (eq. 4).
    """
    logits = (a @ b.T) / temperature
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class MSACModel(nn.Module):
    """Linear maps H_m, primary codebook (K_p, d_m) and secondary codebook: (K_p, K_s, M * d_m)
    per cluster, or (K_s, M * d_m) global (``config.secondary``)."""

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
        per_cluster = (config.num_primary,) if config.secondary == PER_CLUSTER else ()
        self.secondary_codewords = nn.Parameter(
            torch.zeros(*per_cluster, config.num_secondary, len(input_dims) * d)
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

    @property
    def per_cluster(self) -> bool:
        """Whether each primary cluster has its own K_s secondary codewords."""
        return self.secondary_codewords.ndim == 3

    def secondary_code(self, r_s: torch.Tensor, primary: torch.Tensor) -> torch.Tensor:
        """Nearest secondary codeword (B,) int64 of residuals ``r_s`` in clusters ``primary``."""
        if self.per_cluster:
            return nearest_code_in_cluster(r_s, primary, self.secondary_codewords)
        return nearest_code(r_s, self.secondary_codewords)

    def secondary_codeword(self, primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
        """The codewords z_s (B, M * d_m) of the cells (primary, secondary)."""
        if self.per_cluster:
            return self.secondary_codewords[primary, secondary]
        return self.secondary_codewords[secondary]

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
            secondary = self.secondary_code(r_s, primary)
        # eq. 7 (batch mean): gradients flow into the maps and into both codebooks.
        primary_error = (r_p - self.primary_codewords[primary]).pow(2).sum(dim=1).mean()
        z_s = self.secondary_codeword(primary, secondary)
        secondary_error = (r_s - z_s).pow(2).sum(dim=1).mean()
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
