"""The real-data evaluation (esans_eval): loaders, split, features, metrics, pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from esans_eval.cli import main
from esans_eval.datasets import Dataset, ItemSchema, load_dataset, load_movielens
from esans_eval.features import behaviour_features, metadata_features, text_features
from esans_eval.metrics import recall_at_k
from esans_eval.split import leave_last_out, recent_history, training_examples

pytest.importorskip("recbole", reason="pip install --no-deps recbole==1.2.1")


@pytest.fixture(scope="module")
def ml100k() -> Dataset:
    return load_movielens("ml-100k")


def test_movielens_100k_loads(ml100k: Dataset) -> None:
    assert (ml100k.num_items, ml100k.num_users, ml100k.num_events) == (1682, 943, 100_000)
    assert ml100k.dropped_events == 0
    toy = ml100k.item_keys.index("1")
    assert ml100k.item_titles[toy] == "Toy Story" and ml100k.item_years[toy] == 1995
    assert ml100k.item_categories[toy] == ["Animation", "Children's", "Comedy"]


def test_generic_loader_reads_the_documented_format(tmp_path: Path) -> None:
    (tmp_path / "items.tsv").write_text(
        "item_id:token\ttext\tyear\tgenre\nA\tFirst film\t1990\tDrama War\n"
        "B\tSecond film\tunknown\tComedy\nA\tduplicate row\t2000\tX\n"
    )
    (tmp_path / "events.tsv").write_text(
        "user_id\titem_id\ttimestamp\nu1\tA\t5\nu1\tB\t3\nu2\tZ\t1\nu2\tB\t2\n"
    )
    ds = load_dataset(
        tmp_path / "events.tsv", tmp_path / "items.tsv", items=ItemSchema(categories=("genre",))
    )
    assert ds.item_keys == ["A", "B"] and ds.item_text[0] == "First film"
    assert np.isnan(ds.item_years[1]) and ds.item_categories[0] == ["Drama", "War"]
    assert ds.user_keys == ["u1", "u2"] and ds.dropped_events == 1  # Z is not an item
    assert ds.items.tolist() == [0, 1, 1] and ds.timestamps.tolist() == [5, 3, 2]


def test_split_has_no_leakage(ml100k: Dataset) -> None:
    split = leave_last_out(ml100k, min_interactions=5)
    assert len(split.eval_users) == 943  # every ML-100K user has >= 20 ratings
    order = np.lexsort((ml100k.timestamps, ml100k.users))
    for e, user in enumerate(split.eval_users):
        train = set(split.train[user].tolist())
        assert split.test_items[e] not in train and split.valid_items[e] not in train
        assert split.valid_items[e] != split.test_items[e]
        events = order[ml100k.users[order] == user]
        last = ml100k.timestamps[events].max()
        assert ml100k.timestamps[events][ml100k.items[events] == split.test_items[e]][0] == last
    total = sum(len(s) for s in split.train) + 2 * len(split.eval_users)
    assert total == ml100k.num_events
    users, hist, targets = training_examples(split, history=4, pad=ml100k.num_items)
    seq = split.train[int(users[2])]
    assert targets[2] == seq[3] and hist[2].tolist() == [ml100k.num_items, *seq[:3].tolist()]


def _toy() -> Dataset:
    """Four users; item 5 is only ever a held-out (last) item, item 4 only a validation one."""
    seqs = [[0, 1, 2, 4, 5], [1, 2, 3, 4, 5], [0, 2, 3, 4, 5], [0, 1]]
    users = np.concatenate([np.full(len(s), u) for u, s in enumerate(seqs)])
    items = np.concatenate(seqs)
    times = np.concatenate([np.arange(len(s), dtype=np.float64) for s in seqs])
    return Dataset(
        name="toy", item_keys=[str(i) for i in range(6)], item_titles=["t"] * 6,
        item_text=["t"] * 6, item_years=np.full(6, 1990.0),
        item_categories=[["Drama"]] * 6, user_keys=["a", "b", "c", "d"],
        users=users.astype(np.int64), items=items.astype(np.int64), timestamps=times,
    )  # fmt: skip


def test_behaviour_and_popularity_come_from_training_events_only() -> None:
    split = leave_last_out(_toy(), min_interactions=5)
    assert split.eval_users.tolist() == [0, 1, 2] and split.train[3].tolist() == [0, 1]
    assert split.train_counts()[4:].tolist() == [0.0, 0.0]
    emb = behaviour_features(split, dim=3)
    assert np.all(emb[4:] == 0) and np.all(np.linalg.norm(emb[:4], axis=1) > 0.99)
    meta = metadata_features(_toy(), split)
    popularity = meta[:, -10:]
    assert popularity[4].argmax() < popularity[0].argmax()  # held-out items are "unpopular"


def test_text_features_are_cached_by_content(tmp_path: Path) -> None:
    ds = _toy()
    first = text_features(ds, tmp_path, encoder="hash")
    assert first.shape == (6, 256) and len(list(tmp_path.glob("text-hash-*.npy"))) == 1
    np.testing.assert_array_equal(text_features(ds, tmp_path, encoder="hash"), first)


def test_recall_on_a_hand_made_example() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.1],  # target 2 ranks 3rd, 2nd once item 0 is masked
            [0.1, 0.2, 0.3, 0.4],  # target 0 ranks last
            [0.5, 0.5, 0.9, 0.0],  # target 1 ties item 0: ties count against it
        ]
    )
    got = recall_at_k(scores, [2, 0, 1], [[0], [], [3]], ks=(1, 2, 3))
    assert got == pytest.approx({1: 0.0, 2: 1 / 3, 3: 2 / 3})
    assert recent_history([np.array([1, 2, 3])], np.array([0]), 5, 9).tolist() == [[9, 9, 1, 2, 3]]


def test_pipeline_end_to_end_on_a_tiny_subset(tmp_path: Path) -> None:
    """Service up, codebooks published, every method trained over gRPC, report written."""
    out = tmp_path / "results.md"
    args = [
        "--dataset", "ml-100k", "--max-users", "80", "--epochs", "1", "--seeds", "2",
        "--max-steps", "2", "--text-encoder", "hash", "--cache-dir", str(tmp_path),
        "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    text = out.read_text()
    for name in ("UNS", "PNS", "MNS", "ESANS w/o EDIS", "ESANS w/o multimodal"):
        assert f"| {name} |" in text
    assert (tmp_path / "results-recall.png").stat().st_size > 0
    assert '"K_p"' in (tmp_path / "results.json").read_text()
    assert "## Findings" in text and "ESANS vs UNS" in text
    assert (
        "| ESANS + log-q correction | 0.1 | yes |" in text
        and "| ESANS lambda 0.5 | 0.5 | no |" in text
    )
    # The report can be rewritten from its JSON alone, number for number.
    again = tmp_path / "again" / "results.md"
    assert main(["--render", str(tmp_path / "results.json"), "--out", str(again)]) == 0
    assert again.read_text() == text


def test_quick_mode_runs_and_metrics_are_sane(tmp_path: Path) -> None:
    """The CI smoke run as users call it: ML-100K, MiniLM text features, every method trained
    over gRPC (~1.5 min). Asserts sanity, not a winner."""
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "r.md"
    assert main(["--quick", "--cache-dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    chance = {k: k / result["dataset"]["items"] for k in (50, 200)}
    assert {run["method"] for run in result["runs"]} >= {"UNS", "PNS", "MNS", "ESANS"}
    for run in result["runs"]:
        test = {int(k): v for k, v in run["test"].items()}
        assert 0 <= test[50] <= test[200] <= 1, run
        # a trained model beats a random ranking by far (chance R@50 = 0.03 on ML-100K)
        assert test[50] > 3 * chance[50] and test[200] > 2 * chance[200], run
        assert run["heldout_negative_rate"] < 0.05 and run["steps"] > 0
    assert list(result["chosen"]) in [[kp, 4] for kp in (16, 32)]
    assert "## Codebooks" in out.read_text()


def test_esans_eval_reports_bad_input_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from esans_sampler.cli import main as esans_main

    assert esans_main(["eval", "--dataset", "custom"]) == 2
    assert "needs --interactions and --items" in capsys.readouterr().err
    (tmp_path / "items.tsv").write_text("item_id\ttext\nA\tA film\n")
    (tmp_path / "events.tsv").write_text("user_id\titem_id\ttimestamp\nu1\tA\tyesterday\n")
    args = ["eval", "--dataset", "custom", "--items", str(tmp_path / "items.tsv")]
    assert esans_main([*args, "--interactions", str(tmp_path / "missing.tsv")]) == 2
    assert "missing.tsv: file not found" in capsys.readouterr().err
    assert esans_main([*args, "--interactions", str(tmp_path / "events.tsv")]) == 2
    assert "events.tsv:2: timestamp 'yesterday' is not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        esans_main(["eval", "--help"])
    assert "esans eval" in capsys.readouterr().out
