"""Train / validation / test splits and the training examples built from them.

Leave last out (MovieLens): per user, events are ordered by timestamp (ties: file order)
and a repeated (user, item) pair keeps only its latest event, so a held-out item never also
sits in that user's training data. Users with at least ``min_interactions`` distinct items
are evaluated: their last item is the test target, the second last the validation target,
the rest is training. Users with fewer items keep all of them in training.

By time (Complete Journey, :func:`time_split`): two cut times split each user's first
events into training, a validation window and a test window; a window's targets are the
items the user meets there for the first time, with several targets per user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from esans_eval.datasets import Dataset

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class EvalSet:
    """Users evaluated on one window. history[e]: user e's items known before the window, in
    time order (the user tower reads its tail; ranking masks all of it); targets[e]: the items
    to retrieve, never in history[e]."""

    users: IntArray
    history: list[IntArray]
    targets: list[IntArray]

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_targets(self) -> int:
        return int(sum(len(t) for t in self.targets))


@dataclass(frozen=True)
class Split:
    """train: per user, its training items in time order (all users); valid / test: the
    evaluation windows; rule: the split in one sentence, for reports."""

    num_users: int
    num_items: int
    train: list[IntArray]
    valid: EvalSet
    test: EvalSet
    rule: str

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


def _first_events(dataset: Dataset) -> tuple[IntArray, IntArray, npt.NDArray[np.float64]]:
    """(users, items, times) of each user's FIRST event on each item, ordered by user, then
    time (ties: file order)."""
    order = np.lexsort((np.arange(dataset.num_events), dataset.timestamps, dataset.users))
    users, items = dataset.users[order], dataset.items[order]
    key = users * dataset.num_items + items
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    return users[keep], items[keep], dataset.timestamps[order][keep]


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
    users_arr = np.asarray(eval_users, dtype=np.int64)
    return Split(
        num_users=dataset.num_users,
        num_items=dataset.num_items,
        train=train,
        valid=EvalSet(
            users=users_arr,
            history=[train[u] for u in eval_users],
            targets=[np.asarray([v], dtype=np.int64) for v in valid],
        ),
        test=EvalSet(
            users=users_arr,
            history=[np.append(train[u], v) for u, v in zip(eval_users, valid, strict=True)],
            targets=[np.asarray([t], dtype=np.int64) for t in test],
        ),
        rule=(
            f"leave last out: per user with >= {min_interactions} distinct items, the last is "
            "the test target, the second last the validation target, the rest is training"
        ),
    )


def time_split(
    dataset: Dataset, valid_start: float, test_start: float, min_history: int = 1
) -> Split:
    """First purchases by time window: training before ``valid_start``, validation targets
    from then to ``test_start``, test targets after.

    Only a user's first event on an item counts (repeat purchases are what a re-order list
    serves, not retrieval). A target is an item the user meets for the first time in the
    window; everything met before is history, masked in the ranking. Users need
    ``min_history`` training items and one target to be evaluated in a window.
    """
    if not valid_start < test_start:
        raise ValueError(f"valid_start {valid_start} must precede test_start {test_start}")
    users, items, times = _first_events(dataset)
    bounds = np.searchsorted(users, np.arange(dataset.num_users + 1))
    train: list[IntArray] = []
    windows: dict[str, tuple[list[int], list[IntArray], list[IntArray]]] = {
        "valid": ([], [], []),
        "test": ([], [], []),
    }
    for user in range(dataset.num_users):
        seq, when = items[bounds[user] : bounds[user + 1]], times[bounds[user] : bounds[user + 1]]
        cut_v, cut_t = np.searchsorted(when, [valid_start, test_start], side="left")
        train.append(seq[:cut_v].astype(np.int64))
        if cut_v < min_history:
            continue
        for name, lo, hi in (("valid", cut_v, cut_t), ("test", cut_t, len(seq))):
            if hi > lo:
                ids, hist, targets = windows[name]
                ids.append(user)
                hist.append(seq[:lo].astype(np.int64))
                targets.append(seq[lo:hi].astype(np.int64))

    def window(name: str) -> EvalSet:
        ids, hist, targets = windows[name]
        return EvalSet(np.asarray(ids, dtype=np.int64), hist, targets)

    return Split(
        num_users=dataset.num_users,
        num_items=dataset.num_items,
        train=train,
        valid=window("valid"),
        test=window("test"),
        rule=(
            "by time, first purchases only: training before the validation window; targets "
            "are the items a user buys for the first time in the validation window (history: "
            "training) or in the test window (history: training + validation window), "
            f"users with >= {min_history} training items"
        ),
    )


def dataset_split(dataset: Dataset) -> Split:
    """The time split where the dataset names its cuts, else leave last out."""
    if dataset.time_cuts is not None:
        return time_split(dataset, *dataset.time_cuts)
    return leave_last_out(dataset)


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
