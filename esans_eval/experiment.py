"""The experiment: codebooks published to a running service, one two-tower model per
(method, seed) trained on negatives sampled from it over gRPC, Recall@K on validation
(every epoch, for early stopping) and on test (once, at the best validation epoch).

Every method gets the same model, initialisation per seed, example order per seed, batch
size, learning rate, epoch cap and patience; only the negatives differ (see
:mod:`esans_eval.negatives`). Each method's own knob is chosen on the VALIDATION split with
the same number of trials (:data:`TUNING`); the test split is read once per reported run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from esans_eval.datasets import Dataset, describe, item_label
from esans_eval.features import all_features
from esans_eval.metrics import recall_from_ranks, target_ranks
from esans_eval.negatives import (
    BEHAVIOUR_ONLY,
    FULL,
    GLOBAL_SECONDARY,
    Context,
    Method,
    StepStats,
    step_loss,
)
from esans_eval.service import LocalSamplerService
from esans_eval.split import EvalSet, Split, dataset_split, recent_history, training_examples
from esans_eval.two_tower import TwoTower
from esans_sampler.artifact import CodebookArtifact, load_artifact, save_artifact
from esans_sampler.build import build_artifact
from esans_sampler.catalogue import Catalogue, validate_catalogue
from esans_sampler.client import SamplerClient, SampleResponse
from esans_sampler.msac import MSACConfig
from esans_sampler.stats import hard_coverage

IntArray = npt.NDArray[np.int64]
KS = (50, 200)
COLD_MAX_COUNT = 2
"""A target is cold when it has at most this many training purchases / ratings."""
SERVICE_PNS_ALPHA = 0.75
"""The exponent the service's PNS sampler applies to (count + 1); other exponents are served
from an artifact whose counts are pre-warped (see :func:`popularity_artifact`)."""

ESANS_PAPER = Method("ESANS (paper)", "esans", role="paper", m_h=5, use_edis=True)

METHODS: tuple[Method, ...] = (
    Method("UNS", "uniform"),
    Method("PNS", "popularity", pns_alpha=SERVICE_PNS_ALPHA),
    Method("debiased MNS", "uniform", in_batch=True, log_q=True),
    Method("in-batch + log-q", None, in_batch=True, log_q=True),
    ESANS_PAPER,
    Method(
        "ESANS (default)",
        "esans",
        role="default",
        m_h=5,
        use_edis=True,
        log_q=True,
        mask_history=True,
    ),
    Method("ESANS w/o EDIS", "esans", role="ablation", m_h=5),
    Method("ESANS w/o secondary codebook", "esans", role="ablation", use_edis=True),
    Method(
        "ESANS w/o multimodal",
        "esans",
        role="ablation",
        codebook=BEHAVIOUR_ONLY,
        m_h=5,
        use_edis=True,
    ),
    Method(
        "ESANS global secondary",
        "esans",
        role="ablation",
        codebook=GLOBAL_SECONDARY,
        m_h=5,
        use_edis=True,
    ),
)
"""The main table's methods, ablations (of the paper's ESANS) last."""

TUNING: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "PNS": (
        ("alpha 0.25", {"pns_alpha": 0.25}),
        ("alpha 0.5", {"pns_alpha": 0.5}),
        ("alpha 1.0", {"pns_alpha": 1.0}),
    ),
    "debiased MNS": (
        ("2 uniform", {"per_positive": 2}),
        ("5 uniform", {"per_positive": 5}),
        ("10 uniform", {"per_positive": 10}),
    ),
    "in-batch + log-q": (
        ("log-q", {}),
        ("+ user's items masked", {"mask_history": True}),
        ("no log-q", {"log_q": False}),
    ),
    "UNS": (
        ("10 uniform", {}),
        ("+ user's items masked", {"mask_history": True}),
        ("20 uniform", {"per_positive": 20}),
    ),
}
"""Three validation trials per baseline, on the knob a trainer would turn; ESANS (paper)
spends its three on K_p / K_s, the default on its levers (see :data:`DEFAULT_LEVERS`)."""

DEFAULT_LEVERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("log-q + user's items masked", {}),
    (
        "in-batch softmax + ESANS hard negatives",
        {"in_batch": True, "simple_negatives": False, "correct_drawn": False},
    ),
    (
        "in-batch softmax + each row's own ESANS hard negatives",
        {"in_batch": True, "simple_negatives": False, "correct_drawn": False, "shared": False},
    ),
)
"""The product default's validation trials: levers over paper ESANS that the issue names."""


@dataclass(frozen=True)
class Budget:
    """What every method gets. An epoch is one pass over the training examples, or
    ``max_steps`` steps when that is smaller; training stops after ``patience`` epochs
    without a better validation Recall@50, or at ``epochs``."""

    epochs: int = 20
    patience: int = 2
    batch_size: int = 512
    learning_rate: float = 1e-3
    history: int = 20
    max_steps: int | None = None
    seeds: int = 3
    temperature: float = 0.05
    dim: int = 64
    m_c: int = 2
    m_o: int = 5
    hard_lambda: float = 0.1
    eta: float = 0.6
    msac_epochs: int = 20
    msac_dim: int = 64
    sweep_kp: tuple[int, ...] = (16, 32, 64)
    sweep_ks: tuple[int, ...] = (4, 8)
    trial_epochs: int = 2
    max_users: int | None = None
    text_encoder: str = "minilm"
    threads: int | None = 1
    """torch threads of the trainer; 1 leaves the other core to the in-process service
    (2 threads on 2 cores oversubscribe and make a step 10x slower)."""
    per_positive_table: bool = True
    """Also train UNS, ESANS (paper) and ESANS (default) per positive (secondary table)."""


@dataclass
class EpochStats:
    valid: dict[int, float]
    user_item_share: float  # visible real negatives that are the row's user's training items
    coverage: float  # distinct items used as negatives / catalogue
    popularity_percentile: float  # mean popularity percentile of the negatives (uniform 0.5)
    steps: int
    seconds: float


@dataclass
class RunResult:
    method: str
    seed: int
    epochs: list[EpochStats]
    best_epoch: int  # 1-based
    valid: dict[int, float]
    test: dict[int, float]
    test_cold: dict[int, float]
    hard_fill: float
    seconds: float
    steps: int
    protocol: str = "shared"

    @property
    def best(self) -> EpochStats:
        return self.epochs[self.best_epoch - 1]


def _by_k(values: dict[Any, Any]) -> dict[int, float]:
    return {int(k): (math.nan if v is None else float(v)) for k, v in values.items()}


def run_from_dict(raw: dict[str, Any]) -> RunResult:
    """A :class:`RunResult` back from ``dataclasses.asdict`` after a JSON round trip."""
    epochs = [EpochStats(**{**e, "valid": _by_k(e["valid"])}) for e in raw["epochs"]]
    return RunResult(
        **{
            **raw,
            "epochs": epochs,
            "valid": _by_k(raw["valid"]),
            "test": _by_k(raw["test"]),
            "test_cold": _by_k(raw["test_cold"]),
            "hard_fill": math.nan if raw["hard_fill"] is None else raw["hard_fill"],
        }
    )


def jsonable(value: Any) -> Any:
    """``value`` with NaN / inf as None and tuples as lists: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value


class Progress:
    """Finished trials and runs, one JSON line each, so that an interrupted evaluation
    resumes where it stopped (same budget: the first line records it). ``path`` None:
    nothing is kept."""

    def __init__(self, path: str | Path | None, budget: Budget) -> None:
        self.path = None if path is None else Path(path)
        self.done: dict[str, dict[str, Any]] = {}
        stamp = jsonable(asdict(budget))
        if self.path is None:
            return
        if self.path.is_file():
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            if lines and lines[0].get("budget") == stamp:
                self.done = {line["key"]: line["value"] for line in lines[1:]}
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"budget": stamp}) + "\n")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.done[key] = value
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"key": key, "value": jsonable(value)}) + "\n")


@dataclass
class ExperimentResult:
    dataset: dict[str, Any]
    budget: dict[str, Any]
    split: dict[str, Any]
    tuning: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, str] = field(default_factory=dict)
    kp_ks: tuple[int, int] = (0, 0)
    codebooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, dict[Any, float]] = field(default_factory=dict)
    """Rankers without training, e.g. by training popularity: a floor for every model."""


@dataclass(frozen=True)
class Prepared:
    """Everything derived from the training split, shared by all runs."""

    dataset: Dataset
    split: Split
    modalities: dict[str, npt.NDArray[np.float32]]
    tower_features: npt.NDArray[np.float32]
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


def prepare(dataset: Dataset, budget: Budget, cache_dir: str | Path) -> Prepared:
    if budget.max_users is not None:
        dataset = dataset.subset_users(budget.max_users)
    split = dataset_split(dataset)
    modalities = all_features(dataset, split, cache_dir, budget.text_encoder, show_progress=True)
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
        tower_features=np.concatenate([modalities["text"], modalities["metadata"]], axis=1),
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


def _config_key(method: Method) -> str:
    """A short digest of a method's whole configuration: a resumed run reuses a finished
    one only when it was trained with exactly this configuration."""
    return hashlib.sha256(repr(method).encode()).hexdigest()[:10]


def _digest(arrays: Sequence[npt.NDArray[Any]]) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(str((array.shape, array.dtype)).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def build_codebook(
    data: Prepared,
    variant: str,
    num_primary: int,
    num_secondary: int,
    budget: Budget,
    cache_dir: str | Path | None = None,
) -> CodebookArtifact:
    """MSAC on the three modalities (``full``; ``global``: with the paper's global secondary
    codebook instead of the default per-cluster one) or on behaviour only. With
    ``cache_dir``, a build is saved there, keyed by its inputs and settings, and reused."""
    names = ("behaviour",) if variant == BEHAVIOUR_ONLY else ("text", "behaviour", "metadata")
    n = data.dataset.num_items
    catalogue = Catalogue(
        item_ids=np.arange(n, dtype=np.int64),
        modalities={m: data.modalities[m] for m in names},
        sources={m: f"<{data.dataset.name} {m}>" for m in names},
    )
    validate_catalogue(catalogue)
    config = MSACConfig(
        embedding_dim=budget.msac_dim,
        num_primary=num_primary,
        num_secondary=num_secondary,
        secondary="global" if variant == GLOBAL_SECONDARY else "per_cluster",
        epochs=budget.msac_epochs,
        batch_size=256,
        kmeans_init_items=min(n, 20_000),
        seed=0,
        num_threads=budget.threads,
    )
    key = hashlib.sha256(repr((data.features_digest, names, asdict(config))).encode()).hexdigest()[
        :20
    ]
    cached = None if cache_dir is None else Path(cache_dir) / f"codebook-{key}"
    if cached is not None and cached.is_dir():
        return load_artifact(cached)
    artifact = build_artifact(catalogue, config, popularity=data.popularity)
    if cached is not None:
        save_artifact(artifact, cached, overwrite=True)
    return artifact


def popularity_artifact(artifact: CodebookArtifact, alpha: float) -> CodebookArtifact:
    """``artifact`` with counts warped so the service's PNS, (count + 1) ** 0.75, draws by
    (count + 1) ** alpha: count' = (count + 1) ** (alpha / 0.75) - 1."""
    counts = artifact.popularity
    if counts is None:
        raise ValueError("the artifact has no popularity counts")
    warped = np.power(counts + 1.0, alpha / SERVICE_PNS_ALPHA) - 1.0
    metadata = {**artifact.metadata, "pns_alpha": alpha}
    return replace(artifact, popularity=warped.astype(np.float64), metadata=metadata)


def fine_cells(artifact: CodebookArtifact) -> IntArray:
    """(I,) each item's fine cell, primary * K_s + secondary."""
    index = artifact.index
    return index.primary.astype(np.int64) * index.num_secondary + index.secondary.astype(np.int64)


@dataclass(frozen=True)
class Sampling:
    """Where a method's draws come from: codebook versions by name and fine cells."""

    versions: dict[str, str]
    fine: dict[str, IntArray]


def evaluate(
    model: TwoTower | None, data: Prepared, which: str, cold: bool = False
) -> tuple[dict[int, float], dict[int, float]]:
    """Recall@50/200 on the validation or test window, every item a user already has
    masked; and (with ``cold``) Recall@K over the targets with at most
    :data:`COLD_MAX_COUNT` training events (micro-averaged over those targets).
    ``model`` None ranks by training popularity (the "most popular" reference)."""
    window: EvalSet = data.split.valid if which == "valid" else data.split.test
    hist = data.valid_hist if which == "valid" else data.test_hist
    ranks: list[IntArray] = []
    with torch.no_grad():
        if model is not None:
            model.eval()
            table = model.item_table()
        popularity = torch.as_tensor(data.popularity_percentile, dtype=torch.float32)
        for start in range(0, len(window), 256):
            part = slice(start, start + 256)
            if model is not None:
                scores = model.users(table, torch.as_tensor(hist[part]).long()) @ table.T
            else:
                scores = popularity.expand(len(window.users[part]), -1)
            ranks.append(target_ranks(scores, window.targets[part], window.history[part], max(KS)))
    if model is not None:
        model.train()
    all_ranks = np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)
    pair_user = np.concatenate(
        [np.full(len(t), e, dtype=np.int64) for e, t in enumerate(window.targets)]
        or [np.zeros(0, dtype=np.int64)]
    )
    recall = recall_from_ranks(all_ranks, pair_user, KS)
    cold_recall: dict[int, float] = {}
    if cold:
        items = np.concatenate(window.targets or [np.zeros(0, dtype=np.int64)])
        is_cold = data.popularity[items] <= COLD_MAX_COUNT
        cold_recall = {
            k: float((all_ranks[is_cold] < k).mean()) if is_cold.any() else math.nan for k in KS
        }
    return recall, cold_recall


def _request(
    client: SamplerClient,
    method: Method,
    sampling: Sampling,
    ids: IntArray,
    seed: int,
    budget: Budget,
) -> list[SampleResponse]:
    out = []
    if method.sampler is not None:
        m_c, m_o = (budget.m_c, budget.m_o) if method.esans else (1, method.per_positive)
        version = sampling.versions[
            method.codebook
            if method.esans
            else f"pns-{method.pns_alpha}"
            if method.pns_alpha is not None
            else FULL
        ]
        out.append(
            client.sample(
                ids,
                sampler=method.sampler,
                m_c=m_c,
                m_o=m_o,
                m_h=method.m_h,
                gamma=method.gamma,
                hard_lambda=method.lam(budget.hard_lambda),
                eta=budget.eta,
                seed=seed,
                codebook_version=version,
            )
        )
    if method.uniform_extra:
        out.append(
            client.sample(
                ids,
                sampler="uniform",
                m_c=1,
                m_o=method.uniform_extra,
                m_h=0,
                seed=seed + 7_919,
                codebook_version=sampling.versions[FULL],
            )
        )
    return out


def train_run(
    data: Prepared,
    method: Method,
    sampling: Sampling,
    client: SamplerClient,
    budget: Budget,
    seed: int,
    epochs: int | None = None,
    evaluate_test: bool = True,
    position: int = 1,
) -> RunResult:
    """Train one model with ``method``'s negatives; stop early on validation Recall@50;
    evaluate the best epoch's weights on test."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = TwoTower(data.tower_features, dim=budget.dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.learning_rate)
    rng = np.random.default_rng(seed)
    n = len(data.ex_targets)
    steps_per_epoch = -(-n // budget.batch_size)
    if budget.max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, budget.max_steps)
    num_epochs = budget.epochs if epochs is None else epochs
    ctx = Context(
        num_items=data.dataset.num_items,
        fine=sampling.fine.get(method.codebook) if method.esans else None,
        log_frequency=data.log_frequency,
        train_ptr=data.train_ptr,
        train_items=data.train_items,
        temperature=budget.temperature,
        eta=budget.eta,
        hard_lambda=budget.hard_lambda,
    )
    pad = data.dataset.num_items
    history: list[EpochStats] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    hard_slots = hard_filled = steps = 0
    order = rng.permutation(n)
    cursor = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for epoch in range(num_epochs):
            clock = time.perf_counter()
            if cursor + steps_per_epoch * budget.batch_size > n:
                order, cursor = rng.permutation(n), 0
            batches = [
                order[cursor + i * budget.batch_size : cursor + (i + 1) * budget.batch_size]
                for i in range(steps_per_epoch)
            ]
            cursor += steps_per_epoch * budget.batch_size

            def request(b: int, epoch: int = epoch, batches: list[Any] = batches) -> Any:
                call_seed = seed * 1_000_003 + epoch * 10_007 + b
                ids = data.ex_targets[batches[b]]
                return _request(client, method, sampling, ids, call_seed, budget)

            pending: Future[list[SampleResponse]] = pool.submit(request, 0)
            used = np.zeros(pad, dtype=bool)
            visible = user_items = 0
            popularity_sum = popularity_n = 0.0
            bar = tqdm(
                range(len(batches)),
                desc=f"{method.name} seed {seed} epoch {epoch + 1}/{num_epochs}",
                leave=False,
                position=position,
                mininterval=2.0,
            )
            for b in bar:
                responses = pending.result()
                if b + 1 < len(batches):
                    pending = pool.submit(request, b + 1)  # overlap the next RPC with training
                rows = batches[b]
                positives = data.ex_targets[rows]
                hist = data.ex_hist[rows].astype(np.int64)
                sampled = [
                    np.concatenate([r.simple_ids.ravel(), r.hard_ids[r.hard_valid]]).astype(
                        np.int64
                    )
                    for r in responses
                ]
                needed = np.unique(np.concatenate([positives, hist[hist < pad], *sampled]))
                emb = model.items(torch.as_tensor(needed))

                def rows_of(ids: IntArray, needed: IntArray = needed) -> torch.Tensor:
                    return torch.as_tensor(np.searchsorted(needed, ids))

                item_rows = {"positives": rows_of(positives)}
                item_rows.update({f"sampled:{k}": rows_of(s) for k, s in enumerate(sampled)})
                valid = hist < pad
                user = model.users_from(
                    emb[rows_of(np.where(valid, hist, needed[0]))], torch.as_tensor(valid)
                )
                loss, stats = step_loss(
                    emb, item_rows, user, method, positives, data.ex_users[rows], responses, ctx
                )
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
                _tally = _account(stats, data, used)
                visible += stats.visible
                user_items += stats.user_items
                popularity_sum += _tally[0]
                popularity_n += _tally[1]
                if responses and method.m_h:
                    hard_slots += responses[0].hard_ids.size
                    hard_filled += int(responses[0].hard_counts.sum())
            valid_recall, _ = evaluate(model, data, "valid")
            history.append(
                EpochStats(
                    valid=valid_recall,
                    user_item_share=user_items / max(visible, 1),
                    coverage=float(used.mean()),
                    popularity_percentile=popularity_sum / max(popularity_n, 1.0),
                    steps=len(batches),
                    seconds=time.perf_counter() - clock,
                )
            )
            if best is None or valid_recall[50] > best[0]:
                best = (valid_recall[50], epoch + 1, copy.deepcopy(model.state_dict()))
            elif epoch + 1 - best[1] >= budget.patience:
                break
    assert best is not None
    model.load_state_dict(best[2])
    test, test_cold = evaluate(model, data, "test", cold=True) if evaluate_test else ({}, {})
    return RunResult(
        method=method.name,
        seed=seed,
        epochs=history,
        best_epoch=best[1],
        valid=history[best[1] - 1].valid,
        test=test,
        test_cold=test_cold,
        hard_fill=hard_filled / hard_slots if hard_slots else math.nan,
        seconds=time.perf_counter() - started,
        steps=steps,
        protocol="shared" if method.shared else "per positive",
    )


def _account(stats: StepStats, data: Prepared, used: npt.NDArray[np.bool_]) -> tuple[float, int]:
    """Mark the step's negatives as used; their popularity percentile sum and count."""
    ids = stats.negative_ids
    if ids is None or not len(ids):
        return 0.0, 0
    used[ids] = True
    return float(data.popularity_percentile[ids].sum()), len(ids)


def cluster_examples(
    data: Prepared, artifact: CodebookArtifact, count: int = 4, per_cluster: int = 6
) -> list[dict[str, Any]]:
    """A few primary clusters (spread over the size ranking) with their most popular titles."""
    primary = artifact.index.primary
    sizes = np.bincount(primary, minlength=artifact.codebook.num_primary)
    ranked = [int(c) for c in np.argsort(-sizes) if sizes[c] > 0]
    picks = [ranked[int(i)] for i in np.linspace(0, len(ranked) - 1, num=min(count, len(ranked)))]
    out = []
    for c in dict.fromkeys(picks):
        members = np.nonzero(primary == c)[0]
        top = members[np.argsort(-data.popularity[members], kind="stable")][:per_cluster]
        genres: dict[str, int] = {}
        for i in members:
            for g in data.dataset.item_categories[int(i)]:
                genres[g] = genres.get(g, 0) + 1
        common = sorted(genres.items(), key=lambda kv: -kv[1])[:3]
        out.append(
            {
                "cluster": c,
                "size": int(sizes[c]),
                "titles": [item_label(data.dataset, int(i)) for i in top],
                "genres": [f"{g} {n / len(members):.0%}" for g, n in common],
            }
        )
    return out


def codebook_summary(data: Prepared, artifact: CodebookArtifact) -> dict[str, Any]:
    stats = dict(artifact.metadata.get("stats", {}))
    choice = np.asarray(artifact.cluster_choice, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(choice > 0, choice * np.log(choice), 0.0), axis=1)
    sizes = np.bincount(artifact.index.primary, minlength=artifact.codebook.num_primary)
    return {
        "version": artifact.short_version,
        "modalities": list(artifact.codebook.modality_names),
        "stats": stats,
        "secondary": artifact.codebook.secondary_mode,
        "hard_coverage": hard_coverage(artifact.index.fine_sizes).as_dict(),
        "effective_clusters_median": float(np.median(np.exp(ent[sizes > 0]))),
        "examples": cluster_examples(data, artifact),
    }


def _trial(
    data: Prepared, method: Method, sampling: Sampling, client: SamplerClient, budget: Budget
) -> RunResult:
    return train_run(
        data,
        method,
        sampling,
        client,
        budget,
        seed=0,
        epochs=budget.trial_epochs,
        evaluate_test=False,
    )


def run_experiment(
    dataset: Dataset,
    budget: Budget,
    cache_dir: str | Path,
    methods: Sequence[Method] = METHODS,
    log: Callable[[str], None] = print,
    progress_path: str | Path | None = None,
) -> ExperimentResult:
    """Tune every method on validation with the same number of trials, then train each
    chosen method for ``budget.seeds`` seeds with early stopping. Finished trials and runs
    go to ``progress_path`` (JSON lines); a rerun with the same budget picks them up."""
    progress = Progress(progress_path, budget)

    def cached(key: str, compute: Callable[[], RunResult]) -> RunResult:
        raw = progress.get(key)
        if raw is not None:
            return run_from_dict(raw)
        run = compute()
        progress.put(key, asdict(run))
        return run

    if budget.threads is not None:
        torch.set_num_threads(budget.threads)
    clock = time.perf_counter()
    data = prepare(dataset, budget, cache_dir)
    split = data.split
    result = ExperimentResult(
        dataset=describe(data.dataset),
        budget=asdict(budget),
        split={
            "rule": split.rule,
            "valid_users": len(split.valid),
            "valid_targets": split.valid.num_targets,
            "test_users": len(split.test),
            "test_targets": split.test.num_targets,
            "train_events": int(sum(len(s) for s in split.train)),
            "training_examples": len(data.ex_targets),
            "cold_test_targets": int(
                (data.popularity[np.concatenate(split.test.targets)] <= COLD_MAX_COUNT).sum()
            ),
        },
    )
    for which in ("valid", "test"):
        recall, cold = evaluate(None, data, which, cold=True)
        result.reference[f"most popular ({which})"] = {
            **recall,
            **{f"cold {k}": v for k, v in cold.items()},
        }
    result.seconds["prepare"] = time.perf_counter() - clock
    log(
        f"{data.dataset.name}: {data.dataset.num_items} items, {data.dataset.num_users} users, "
        f"{len(data.ex_targets)} training examples ({result.seconds['prepare']:.0f} s to prepare)"
    )
    chosen = {m.name: m for m in methods}
    with LocalSamplerService(max_batch=max(budget.batch_size, 1)) as service:
        clock = time.perf_counter()
        versions: dict[str, str] = {}
        fine: dict[str, IntArray] = {}
        best: tuple[float, int, int] | None = None
        paper = next((m for m in methods if m.role == "paper"), ESANS_PAPER)
        grid = [(kp, ks) for kp in budget.sweep_kp for ks in budget.sweep_ks][:3]
        for kp, ks in tqdm(grid, desc="ESANS (paper): K_p/K_s on validation"):

            def sweep_trial(kp: int = kp, ks: int = ks) -> RunResult:
                artifact = build_codebook(data, FULL, kp, ks, budget, cache_dir)
                sampling = Sampling({FULL: service.publish(artifact)}, {FULL: fine_cells(artifact)})
                return _trial(data, paper, sampling, service.client, budget)

            run = cached(f"trial:{paper.name}:K_p {kp}, K_s {ks}", sweep_trial)
            result.tuning.append(
                {
                    "method": paper.name,
                    "trial": f"K_p {kp}, K_s {ks}",
                    "valid": run.valid,
                    "best_epoch": run.best_epoch,
                    "seconds": run.seconds,
                }
            )
            if best is None or run.valid[50] > best[0]:
                best = (run.valid[50], kp, ks)
        if best is None:
            raise ValueError("the K_p / K_s grid is empty")
        _, kp, ks = best
        full = build_codebook(data, FULL, kp, ks, budget, cache_dir)
        result.kp_ks = (kp, ks)
        versions[FULL], fine[FULL] = service.publish(full), fine_cells(full)
        result.codebooks[FULL] = codebook_summary(data, full)
        for variant in sorted({m.codebook for m in methods if m.esans} - {FULL}):
            artifact = build_codebook(data, variant, kp, ks, budget, cache_dir)
            versions[variant], fine[variant] = service.publish(artifact), fine_cells(artifact)
            result.codebooks[variant] = codebook_summary(data, artifact)
        alphas = {m.pns_alpha for m in methods if m.pns_alpha is not None}
        alphas |= {float(o["pns_alpha"]) for _, o in TUNING.get("PNS", ()) if "pns_alpha" in o}
        for alpha in sorted(alphas):
            versions[f"pns-{alpha}"] = service.publish(popularity_artifact(full, alpha))
        sampling = Sampling(versions, fine)
        result.seconds["codebooks"] = time.perf_counter() - clock
        log(f"K_p={kp}, K_s={ks} chosen on validation ({result.seconds['codebooks']:.0f} s)")

        clock = time.perf_counter()
        trials = [
            (method, label, overrides)
            for method in methods
            for label, overrides in (
                DEFAULT_LEVERS if method.role == "default" else TUNING.get(method.name, ())
            )
        ]
        scores: dict[str, tuple[float, str]] = {}
        for method, label, overrides in tqdm(trials, desc="tuning (validation)", position=0):
            candidate = replace(method, **overrides)
            run = cached(
                f"trial:{method.name}:{label}",
                partial(_trial, data, candidate, sampling, service.client, budget),
            )
            result.tuning.append(
                {
                    "method": method.name,
                    "trial": label,
                    "valid": run.valid,
                    "best_epoch": run.best_epoch,
                    "seconds": run.seconds,
                    "user_item_share": run.best.user_item_share,
                }
            )
            if method.name not in scores or run.valid[50] > scores[method.name][0]:
                scores[method.name] = (run.valid[50], label)
                chosen[method.name] = candidate
        result.chosen = {name: label for name, (_, label) in scores.items()}
        result.seconds["tuning"] = time.perf_counter() - clock
        log(f"chosen on validation: {result.chosen} ({result.seconds['tuning']:.0f} s)")

        final = [chosen[m.name] for m in methods]
        if budget.per_positive_table:
            final += [
                replace(chosen[m.name], name=f"{m.name} per positive", shared=False)
                for m in methods
                if (m.role in ("paper", "default") or m.name == "UNS") and chosen[m.name].shared
            ]
        result.methods = [
            {"name": m.name, "role": m.role, "negatives": m.describe(budget.m_c, budget.m_o)}
            for m in final
        ]
        clock = time.perf_counter()
        # The main table first, seed by seed, then the ablations and the per-positive table:
        # an interrupted run has the comparisons that matter most.
        in_table = [chosen[m.name] for m in methods]
        tiers = [
            [m for m in in_table if m.role != "ablation"],
            [m for m in in_table if m.role == "ablation"],
            final[len(in_table) :],  # the per-positive table
        ]
        jobs = [(seed, m) for tier in tiers for seed in range(budget.seeds) for m in tier]
        for seed, method in tqdm(jobs, desc="runs (method x seed)", position=0):
            run = cached(
                f"run:{method.name}:{seed}:{_config_key(method)}",
                partial(train_run, data, method, sampling, service.client, budget, seed),
            )
            result.runs.append(run)
            log(
                f"{method.name:<32} seed {seed}: best epoch {run.best_epoch}, valid R@50 "
                f"{run.valid[50]:.4f}, test R@50 {run.test[50]:.4f} R@200 {run.test[200]:.4f} "
                f"({run.seconds:.0f} s)"
            )
        result.seconds["training"] = time.perf_counter() - clock
    return result
