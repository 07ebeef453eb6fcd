"""Reading a catalogue's modality matrices in row blocks, for training and k-means samples.

A matrix is anything 2-D and row-sliceable (ndarray, np.memmap, h5py dataset); only one block
of rows is ever in memory, so features larger than RAM can be trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from esans_sampler.errors import InvalidInputError


class FeatureMatrix(Protocol):
    """A 2-D (N, D_m) matrix that can be sliced by rows: ndarray, np.memmap, h5py dataset."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice, /) -> Any: ...


def check_features(
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


def read_batch(
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


_MIN_INIT_BLOCKS = 16


def spread_blocks(num_items: int, n_init: int, block_rows: int) -> list[tuple[int, int]]:
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
