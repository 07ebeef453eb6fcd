"""How far does ranking by RECENT popularity go on Complete Journey? A reference without a model.

The evaluation's "most popular" ranks by first purchases over the whole training period. A
grocery catalogue drifts (seasons, new products), so this probe ranks by all purchase lines in
the last W weeks before a window starts (what a shop's "trending" shelf would show), each
household's own items masked as in the evaluation. W is chosen on the validation window; the
test window is read once for that W, counting the weeks before the test cut (as a deployed
ranker would) and, like for like with the models, the weeks before the validation cut.

    .venv/bin/python scripts/probe_recent_popularity.py          # prints a markdown table
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from esans_eval.completejourney import load_completejourney
from esans_eval.datasets import Dataset
from esans_eval.metrics import recall_from_ranks, target_ranks
from esans_eval.split import EvalSet, dataset_split

WEEK = 7 * 86_400.0
WINDOWS: tuple[int | None, ...] = (2, 4, 8, 13, 26, None)  # None: every week before the cut
KS = (50, 200)


def recall(window: EvalSet, counts: npt.NDArray[np.float64]) -> dict[int, float]:
    """Recall@50/200 of ranking every user's unmasked items by ``counts`` (ties by id)."""
    order = np.lexsort((-np.arange(len(counts)), counts))
    scores = torch.empty(len(counts))
    scores[torch.as_tensor(order)] = torch.arange(len(counts), dtype=torch.float32)
    ranks = [
        target_ranks(
            scores.expand(len(window.users[s : s + 256]), -1),
            window.targets[s : s + 256],
            window.history[s : s + 256],
            max(KS),
        )
        for s in range(0, len(window), 256)
    ]
    pair_user = np.concatenate([np.full(len(t), e) for e, t in enumerate(window.targets)])
    return recall_from_ranks(np.concatenate(ranks), pair_user, KS)


def purchases_before(dataset: Dataset, cut: float, weeks: int | None) -> npt.NDArray[np.float64]:
    """(I,) purchase lines of every item in the ``weeks`` before ``cut`` (None: all before)."""
    start = -np.inf if weeks is None else cut - weeks * WEEK
    inside = (dataset.timestamps < cut) & (dataset.timestamps >= start)
    return np.bincount(dataset.items[inside], minlength=dataset.num_items).astype(np.float64)


def main() -> None:
    dataset = load_completejourney()
    assert dataset.time_cuts is not None
    valid_start, test_start = dataset.time_cuts
    split = dataset_split(dataset)
    rows = ["| purchases counted | valid R@50 | valid R@200 |", "|---|---|---|"]
    valid = {}
    for weeks in WINDOWS:
        valid[weeks] = recall(split.valid, purchases_before(dataset, valid_start, weeks))
        label = "all before the window" if weeks is None else f"last {weeks} weeks"
        rows.append(f"| {label} | {valid[weeks][50]:.4f} | {valid[weeks][200]:.4f} |")
    best = max(WINDOWS, key=lambda w: valid[w][50])
    # A deployed ranker counts up to the test window; the models only ever trained on what
    # precedes the validation window, so the second count is the like-for-like one.
    deployed = recall(split.test, purchases_before(dataset, test_start, best))
    like_models = recall(split.test, purchases_before(dataset, valid_start, best))
    print("\n".join(rows))
    print(
        f"\nChosen on validation: {'all' if best is None else f'the last {best} weeks'}. Test: "
        f"R@50 {deployed[50]:.4f}, R@200 {deployed[200]:.4f} counting the weeks before the test "
        f"window (validation window included); R@50 {like_models[50]:.4f}, R@200 "
        f"{like_models[200]:.4f} counting only the weeks before the validation window, the "
        "data the models trained on."
    )


if __name__ == "__main__":
    main()
