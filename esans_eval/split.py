"""Leave-last-out split and the training examples built from it.

Per user, events are ordered by timestamp (ties: file order) and a repeated (user, item)
pair keeps only its latest event, so a held-out item never also sits in that user's
training data. Users with at least ``min_interactions`` distinct items are evaluated: their
last item is the test target, the second last the validation target, the rest is training.
Users with fewer items keep all of them in training and are not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from esans_eval.datasets import Dataset

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """train: per user, its training items in time order (all users).
    eval_users: (E,) users with a validation and a test target; valid_items, test_items:
    (E,) their targets."""

    num_users: int
    num_items: int
    train: list[IntArray]
    eval_users: IntArray
    valid_items: IntArray
    test_items: IntArray
    min_interactions: int

    def train_counts(self) -> npt.NDArray[np.float64]:
        """(I,) training interactions per item (the popularity the service gets)."""
        counts = np.zeros(self.num_items, dtype=np.float64)
        for seq in self.train:
            np.add.at(counts, seq, 1.0)
        return counts

    def train_pairs(self) -> tuple[IntArray, IntArray]:
        """(users, items) of every training event."""
        users = np.concatenate(
            [np.full(len(s), u, dtype=np.int64) for u, s in enumerate(self.train)]
        )
        return users, np.concatenate(self.train).astype(np.int64)


def leave_last_out(dataset: Dataset, min_interactions: int = 5) -> Split:
    """The split described in the module docstring."""
    order = np.lexsort((np.arange(dataset.num_events), dataset.timestamps, dataset.users))
    users, items = dataset.users[order], dataset.items[order]
    bounds = np.searchsorted(users, np.arange(dataset.num_users + 1))
    train: list[IntArray] = []
    eval_users: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for user in range(dataset.num_users):
        seq = items[bounds[user] : bounds[user + 1]]
        # keep the latest event of a repeated item: reverse, first occurrence, restore order
        rev = seq[::-1]
        _, first = np.unique(rev, return_index=True)
        seq = rev[np.sort(first)][::-1].astype(np.int64)
        if len(seq) >= min_interactions:
            eval_users.append(user)
            valid.append(int(seq[-2]))
            test.append(int(seq[-1]))
            train.append(seq[:-2].copy())
        else:
            train.append(seq.copy())
    return Split(
        num_users=dataset.num_users,
        num_items=dataset.num_items,
        train=train,
        eval_users=np.asarray(eval_users, dtype=np.int64),
        valid_items=np.asarray(valid, dtype=np.int64),
        test_items=np.asarray(test, dtype=np.int64),
        min_interactions=min_interactions,
    )


def training_examples(
    split: Split, history: int, pad: int
) -> tuple[IntArray, npt.NDArray[np.int32], IntArray]:
    """Next-item examples from the training sequences.

    For every training event at position t >= 1 of a user's sequence: the target item and
    the (up to) ``history`` items before it, left-padded with ``pad``. Returns users (n,)
    int64, histories (n, history) int32 and targets (n,) int64.
    """
    users: list[IntArray] = []
    hists: list[npt.NDArray[np.int32]] = []
    targets: list[IntArray] = []
    for user, seq in enumerate(split.train):
        if len(seq) < 2:
            continue
        padded = np.concatenate([np.full(history, pad, dtype=np.int64), seq])
        # window ending just before target t (t = 1..len-1) in padded coordinates
        starts = np.arange(1, len(seq))
        idx = starts[:, None] + np.arange(history)[None, :]
        hists.append(padded[idx].astype(np.int32))
        targets.append(seq[1:])
        users.append(np.full(len(seq) - 1, user, dtype=np.int64))
    return np.concatenate(users), np.concatenate(hists), np.concatenate(targets)


def recent_history(
    sequences: list[IntArray], users: IntArray, history: int, pad: int
) -> npt.NDArray[np.int32]:
    """(len(users), history) int32: each user's last ``history`` items, left-padded."""
    out = np.full((len(users), history), pad, dtype=np.int32)
    for row, user in enumerate(users):
        seq = sequences[int(user)][-history:]
        if len(seq):
            out[row, history - len(seq) :] = seq
    return out
