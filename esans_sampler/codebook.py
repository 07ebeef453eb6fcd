"""Trained MSAC maps and cascaded codebooks as plain arrays, with torch-free assignment.

The training (``msac.py``) produces a :class:`Codebook`; serving and ``assign`` only need
numpy. Deviation from the paper (documented in README): every aligned embedding ``M_m`` is
L2-normalised before quantisation. The alignment loss is scale-free, so without it L_SQ
could be driven to zero by shrinking the maps; on the unit sphere it cannot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from esans_sampler.errors import InvalidInputError

FloatArray = npt.NDArray[np.float32]
CodeArray = npt.NDArray[np.int32]

_NORM_EPS = 1e-12


def l2_normalize(x: FloatArray) -> FloatArray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    normalized: FloatArray = (x / np.maximum(norms, _NORM_EPS)).astype(np.float32, copy=False)
    return normalized


def nearest_codeword(x: FloatArray, codewords: FloatArray) -> CodeArray:
    """``argmin_k ||x - z_k||`` for each row of ``x`` (n, d) against ``codewords`` (K, d)."""
    # ||x - z||^2 = ||x||^2 - 2 x.z + ||z||^2; the ||x||^2 term does not change the argmin.
    scores = x @ codewords.T
    scores *= -2.0
    scores += np.einsum("kd,kd->k", codewords, codewords)[None, :]
    codes: CodeArray = np.argmin(scores, axis=1).astype(np.int32)
    return codes


@dataclass(frozen=True)
class Codebook:
    """Per-modality linear maps ``H_m`` and the primary/secondary codewords (eq. 5-7).

    map_weights[m]: (d_m, D_m) float32, map_biases[m]: (d_m,) float32,
    primary_codewords: (K_p, d_m) float32, secondary_codewords: (K_p, K_s, M * d_m) float32
    with one secondary codebook per primary cluster (the default), or (K_s, M * d_m) with one
    global secondary codebook (the paper's form). The secondary code of an item is the index
    of its nearest codeword among those of its own primary cluster, or among the global ones.
    """

    modality_names: tuple[str, ...]
    map_weights: tuple[FloatArray, ...]
    map_biases: tuple[FloatArray, ...]
    primary_codewords: FloatArray
    secondary_codewords: FloatArray

    def __post_init__(self) -> None:
        m = len(self.modality_names)
        if m == 0:
            raise InvalidInputError("a codebook needs at least one modality")
        if len(self.map_weights) != m or len(self.map_biases) != m:
            raise InvalidInputError("one map weight and one bias per modality are required")
        d = self.embedding_dim
        for name, w, b in zip(self.modality_names, self.map_weights, self.map_biases, strict=True):
            if w.ndim != 2 or w.shape[0] != d or b.shape != (d,):
                raise InvalidInputError(
                    f"modality {name!r}: map weight {w.shape} / bias {b.shape} do not match d_m={d}"
                )
        z_s = self.secondary_codewords
        shapes = {2: "(K_s, M * d_m)", 3: f"(K_p={self.num_primary}, K_s, M * d_m)"}
        if (
            z_s.ndim not in shapes
            or z_s.shape[-1] != m * d
            or (z_s.ndim == 3 and z_s.shape[0] != self.num_primary)
        ):
            raise InvalidInputError(
                f"secondary codewords {z_s.shape} must be (K_s, {m * d}) or "
                f"({self.num_primary}, K_s, {m * d})"
            )

    @property
    def embedding_dim(self) -> int:
        """d_m, the width of each aligned modality embedding."""
        return int(self.primary_codewords.shape[1])

    @property
    def num_primary(self) -> int:
        return int(self.primary_codewords.shape[0])

    @property
    def num_secondary(self) -> int:
        """K_s, secondary codewords per primary cluster (or in all, when global)."""
        return int(self.secondary_codewords.shape[-2])

    @property
    def secondary_mode(self) -> str:
        """``"per_cluster"`` or ``"global"``: how the secondary codebook is shared."""
        return "per_cluster" if self.secondary_codewords.ndim == 3 else "global"

    @property
    def input_dims(self) -> tuple[int, ...]:
        """D_m of each modality, in ``modality_names`` order."""
        return tuple(int(w.shape[1]) for w in self.map_weights)

    def _ordered(
        self, features: Mapping[str, npt.ArrayLike] | Sequence[npt.ArrayLike]
    ) -> list[FloatArray]:
        if isinstance(features, Mapping):
            missing = [n for n in self.modality_names if n not in features]
            if missing:
                raise InvalidInputError(f"features lack modalities {missing}")
            seq = [features[n] for n in self.modality_names]
        else:
            seq = list(features)
            if len(seq) != len(self.modality_names):
                raise InvalidInputError(
                    f"expected {len(self.modality_names)} modality matrices, got {len(seq)}"
                )
        arrays = [np.asarray(a, dtype=np.float32) for a in seq]
        rows = {a.shape[0] if a.ndim == 2 else -1 for a in arrays}
        if len(rows) != 1 or -1 in rows:
            raise InvalidInputError("modality matrices must be 2-D with the same number of rows")
        for name, a, dim in zip(self.modality_names, arrays, self.input_dims, strict=True):
            if a.shape[1] != dim:
                raise InvalidInputError(f"modality {name!r} has width {a.shape[1]}, expected {dim}")
            if not np.isfinite(a).all():
                raise InvalidInputError(f"modality {name!r} contains NaN or inf")
        return arrays

    def embed(
        self, features: Mapping[str, npt.ArrayLike] | Sequence[npt.ArrayLike]
    ) -> list[FloatArray]:
        """Aligned, L2-normalised embeddings ``M_m`` (n, d_m) of each modality (eq. 3)."""
        arrays = self._ordered(features)
        return [
            l2_normalize(a @ w.T + b)
            for a, w, b in zip(arrays, self.map_weights, self.map_biases, strict=True)
        ]

    def assign(
        self,
        features: Mapping[str, npt.ArrayLike] | Sequence[npt.ArrayLike],
        batch_size: int = 65_536,
    ) -> tuple[CodeArray, CodeArray]:
        """(primary, secondary) codes, each (n,) int32, of items given their raw features."""
        arrays = self._ordered(features)
        n = arrays[0].shape[0]
        primary = np.empty(n, dtype=np.int32)
        secondary = np.empty(n, dtype=np.int32)
        for start in range(0, n, batch_size):
            chunk = [a[start : start + batch_size] for a in arrays]
            p, s = self.assign_embedded(self.embed(chunk))
            primary[start : start + batch_size] = p
            secondary[start : start + batch_size] = s
        return primary, secondary

    def fuse(self, embedded: list[FloatArray]) -> FloatArray:
        """The fused embedding ``r_p`` (n, d_m) of items' aligned embeddings (eq. 5)."""
        r_p: FloatArray = np.mean(np.stack(embedded), axis=0)
        return r_p

    def assign_embedded(self, embedded: list[FloatArray]) -> tuple[CodeArray, CodeArray]:
        """(primary, secondary) codes of items given their aligned embeddings (:meth:`embed`)."""
        r_p = self.fuse(embedded)  # eq. 5
        primary = nearest_codeword(
            r_p, self.primary_codewords
        )  # nearest primary codeword (text after eq. 5)
        z_p = self.primary_codewords[primary]
        r_s = np.concatenate([m - z_p for m in embedded], axis=1)  # eq. 6: residuals, concatenated
        if self.secondary_codewords.ndim == 2:
            return primary, nearest_codeword(r_s, self.secondary_codewords)
        secondary = np.empty_like(primary)
        order = np.argsort(primary, kind="stable")
        clusters, starts = np.unique(primary[order], return_index=True)
        for p, rows in zip(clusters, np.split(order, starts[1:]), strict=True):
            secondary[rows] = nearest_codeword(r_s[rows], self.secondary_codewords[p])
        return primary, secondary
