"""Everything derived once from a dataset and its split, shared by all runs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from esans_eval.budget import Budget
from esans_eval.datasets import Dataset
from esans_eval.features import all_features
from esans_eval.split import Split, dataset_split, recent_history, training_examples
from esans_eval.two_tower import TOWER_INPUTS, principal_features

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Prepared:
    """Everything derived from the training split, shared by all runs."""

    dataset: Dataset
    split: Split
    modalities: dict[str, npt.NDArray[np.float32]]
    tower_inputs: torch.Tensor
    """(I, <= 64) the item tower's input features, reduced once (:func:`principal_features`)
    rather than by every run's model (a 68k x 448 SVD per run)."""
    popularity: npt.NDArray[np.float64]
    popularity_percentile: npt.NDArray[np.float64]
    log_frequency: npt.NDArray[np.float64]
    ex_users: IntArray
    ex_hist: npt.NDArray[np.int32]
    ex_targets: IntArray
    valid_hist: npt.NDArray[np.int32]
    test_hist: npt.NDArray[np.int32]
    train_ptr: IntArray
    train_items: IntArray
    features_digest: str  # of the modalities and popularity: keys cached codebooks


def prepare(
    dataset: Dataset, budget: Budget, cache_dir: str | Path, show_progress: bool = True
) -> Prepared:
    if budget.max_users is not None:
        dataset = dataset.subset_users(budget.max_users)
    split = dataset_split(dataset)
    modalities = all_features(
        dataset, split, cache_dir, budget.text_encoder, show_progress=show_progress
    )
    pad = dataset.num_items
    users, hist, targets = training_examples(split, budget.history, pad)
    popularity = split.train_counts()
    ranks = np.argsort(np.argsort(popularity, kind="stable"), kind="stable")
    target_counts = np.bincount(targets, minlength=dataset.num_items).astype(np.float64)
    sorted_train = [np.sort(s) for s in split.train]
    ptr = np.concatenate([[0], np.cumsum([len(s) for s in sorted_train])]).astype(np.int64)
    return Prepared(
        dataset=dataset,
        split=split,
        modalities=modalities,
        tower_inputs=principal_features(
            np.concatenate([modalities["text"], modalities["metadata"]], axis=1), TOWER_INPUTS
        ),
        popularity=popularity,
        popularity_percentile=ranks / max(dataset.num_items - 1, 1),
        log_frequency=np.log(np.maximum(target_counts, 0.5) / max(len(targets), 1)),
        ex_users=users,
        ex_hist=hist,
        ex_targets=targets,
        valid_hist=recent_history(
            split.valid.history, np.arange(len(split.valid)), budget.history, pad
        ),
        test_hist=recent_history(
            split.test.history, np.arange(len(split.test)), budget.history, pad
        ),
        train_ptr=ptr,
        train_items=np.concatenate(sorted_train or [np.zeros(0, dtype=np.int64)]).astype(np.int64),
        features_digest=_digest([*(modalities[m] for m in sorted(modalities)), popularity]),
    )


def _digest(arrays: Sequence[npt.NDArray[Any]]) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(str((array.shape, array.dtype)).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()
