"""The experiment: codebooks published to a running service, one two-tower model per
(method, seed) trained on negatives sampled from it over gRPC, Recall@K on validation
(every epoch) and test (once, at the end).

Every method gets the same model, initialisation per seed, example order per seed, epochs,
steps, batch size and learning rate; only the negatives differ (see :data:`METHODS`).
K_p and K_s are chosen by a small sweep of full ESANS on the VALIDATION split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from esans_eval.datasets import Dataset, describe, item_label
from esans_eval.features import all_features
from esans_eval.metrics import recall_at_k
from esans_eval.service import LocalSamplerService
from esans_eval.split import Split, leave_last_out, recent_history, training_examples
from esans_eval.two_tower import TwoTower
from esans_sampler.artifact import CodebookArtifact
from esans_sampler.build import build_artifact
from esans_sampler.catalogue import Catalogue, validate_catalogue
from esans_sampler.client import SamplerClient, SampleResponse
from esans_sampler.msac import MSACConfig
from esans_sampler.stats import hard_coverage
from esans_sampler.trainer import esans_loss

IntArray = npt.NDArray[np.int64]
FULL = "full"
BEHAVIOUR_ONLY = "behaviour"
GLOBAL_SECONDARY = "global"  # the three views with the paper's one global secondary codebook
KS = (50, 200)


@dataclass(frozen=True)
class Method:
    """One way of drawing negatives. ``codebook``: which published codebook it samples from
    (None: the baselines ignore the clusters)."""

    name: str
    sampler: str
    codebook: str = FULL
    m_h: int = 0
    use_edis: bool = False
    ablation: bool = False
    hard_lambda: float | None = None  # None: the budget's
    log_q: bool = False  # subtract log q from the sampled negatives' logits

    def lam(self, budget: Budget) -> float:
        return budget.hard_lambda if self.hard_lambda is None else self.hard_lambda

    def negatives(self, m_c: int, m_o: int) -> tuple[int, int]:
        """(sampled, virtual) negatives per positive."""
        virtual = (m_c * (m_o * (m_o + 1) // 2 - 1) + self.m_h) if self.use_edis else 0
        return m_c * m_o + self.m_h, virtual


METHODS: tuple[Method, ...] = (
    Method("UNS", "uniform"),
    Method("PNS", "popularity"),
    Method("MNS", "mixed"),
    Method("ESANS", "esans", m_h=5, use_edis=True),
    Method("ESANS w/o EDIS", "esans", m_h=5, use_edis=False, ablation=True),
    Method("ESANS w/o secondary codebook", "esans", m_h=0, use_edis=True, ablation=True),
    Method("ESANS w/o multimodal", "esans", BEHAVIOUR_ONLY, m_h=5, use_edis=True, ablation=True),
    Method(
        "ESANS global secondary (paper)",
        "esans",
        GLOBAL_SECONDARY,
        m_h=5,
        use_edis=True,
        ablation=True,
    ),
)


# Validation-only probes of the knobs the issue asks about (lambda) and of the log-q
# correction the paper leaves off; they never touch the test split.
SENSITIVITY: tuple[Method, ...] = (
    Method("UNS", "uniform"),
    Method("ESANS", "esans", m_h=5, use_edis=True),
    Method("ESANS lambda 0.3", "esans", m_h=5, use_edis=True, hard_lambda=0.3),
    Method("ESANS lambda 0.5", "esans", m_h=5, use_edis=True, hard_lambda=0.5),
    Method("ESANS + log-q correction", "esans", m_h=5, use_edis=True, log_q=True),
)


@dataclass(frozen=True)
class Budget:
    """What every method gets. ``max_steps`` caps the steps of an epoch (None: all examples)."""

    epochs: int = 4
    batch_size: int = 1024
    learning_rate: float = 3e-3
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
    sweep_ks: tuple[int, ...] = (2, 4, 8)
    sweep_epochs: int = 1
    max_users: int | None = None
    text_encoder: str = "minilm"
    threads: int | None = 1
    """torch threads of the trainer; 1 leaves the other core to the in-process service
    (2 threads on 2 cores oversubscribe and make a step 10x slower)."""


@dataclass
class RunResult:
    method: str
    seed: int
    valid_curve: list[dict[int, float]]
    valid: dict[int, float]
    test: dict[int, float]
    heldout_negative_rate: float
    train_negative_rate: float
    hard_fill: float
    seconds: float
    steps: int
    hard_train_negative_rate: float = math.nan  # real hard negatives the row's user trained on


@dataclass
class ExperimentResult:
    dataset: dict[str, Any]
    budget: dict[str, Any]
    split: dict[str, Any]
    sweep: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    chosen: tuple[int, int] = (0, 0)
    codebooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Prepared:
    """Everything derived from the training split, shared by all runs."""

    dataset: Dataset
    split: Split
    modalities: dict[str, npt.NDArray[np.float32]]
    tower_features: npt.NDArray[np.float32]
    popularity: npt.NDArray[np.float64]
    ex_users: IntArray
    ex_hist: npt.NDArray[np.int32]
    ex_targets: IntArray
    valid_hist: npt.NDArray[np.int32]
    test_hist: npt.NDArray[np.int32]
    valid_mask: list[IntArray]
    test_mask: list[IntArray]
    heldout: npt.NDArray[np.int64]  # (U, 2) valid and test item, -1 if not evaluated
    train_keys: IntArray  # sorted user * I + item of training events


def prepare(dataset: Dataset, budget: Budget, cache_dir: str | Path) -> Prepared:
    if budget.max_users is not None:
        dataset = dataset.subset_users(budget.max_users)
    split = leave_last_out(dataset)
    modalities = all_features(dataset, split, cache_dir, budget.text_encoder, show_progress=True)
    pad = dataset.num_items
    users, hist, targets = training_examples(split, budget.history, pad)
    with_valid = [
        np.concatenate([split.train[int(u)], [v]]).astype(np.int64)
        for u, v in zip(split.eval_users, split.valid_items, strict=True)
    ]
    heldout = np.full((split.num_users, 2), -1, dtype=np.int64)
    heldout[split.eval_users, 0] = split.valid_items
    heldout[split.eval_users, 1] = split.test_items
    tu, ti = split.train_pairs()
    return Prepared(
        dataset=dataset,
        split=split,
        modalities=modalities,
        tower_features=np.concatenate([modalities["text"], modalities["metadata"]], axis=1),
        popularity=split.train_counts(),
        ex_users=users,
        ex_hist=hist,
        ex_targets=targets,
        valid_hist=recent_history(split.train, split.eval_users, budget.history, pad),
        test_hist=recent_history(with_valid, np.arange(len(with_valid)), budget.history, pad),
        valid_mask=[split.train[int(u)] for u in split.eval_users],
        test_mask=with_valid,
        heldout=heldout,
        train_keys=np.sort(tu * dataset.num_items + ti),
    )


def build_codebook(
    data: Prepared, variant: str, num_primary: int, num_secondary: int, budget: Budget
) -> CodebookArtifact:
    """MSAC on the three modalities (``full``; ``global``: with the paper's global secondary
    codebook instead of the default per-cluster one) or on behaviour only."""
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
        kmeans_init_items=n,
        seed=0,
        num_threads=budget.threads,
    )
    return build_artifact(catalogue, config, popularity=data.popularity)


def _sample(
    client: SamplerClient, method: Method, version: str, ids: IntArray, seed: int, budget: Budget
) -> SampleResponse:
    return client.sample(
        ids,
        sampler=method.sampler,
        m_c=budget.m_c,
        m_o=budget.m_o,
        m_h=method.m_h,
        hard_lambda=method.lam(budget),
        eta=budget.eta,
        seed=seed,
        codebook_version=version,
    )


def evaluate(model: TwoTower, data: Prepared, which: str) -> dict[int, float]:
    """Recall@50/200 on the validation (history = train) or test (history = train + the
    validation item) targets, training items (and for test the validation item) masked."""
    split = data.split
    hist, mask, targets = (
        (data.valid_hist, data.valid_mask, split.valid_items)
        if which == "valid"
        else (data.test_hist, data.test_mask, split.test_items)
    )
    model.eval()
    with torch.no_grad():
        table = model.item_table()
        users = model.users(table, torch.as_tensor(hist))
        scores = users @ table.T
    model.train()
    return recall_at_k(scores, targets, mask, KS)


def train_run(
    data: Prepared,
    method: Method,
    version: str,
    client: SamplerClient,
    budget: Budget,
    seed: int,
    epochs: int | None = None,
    evaluate_test: bool = True,
    position: int = 1,
) -> RunResult:
    """Train one model with ``method``'s negatives from the service; evaluate it."""
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
    curve: list[dict[int, float]] = []
    sampled = heldout_hits = train_hits = 0
    hard_slots = hard_filled = hard_train_hits = 0
    num_items = data.dataset.num_items
    steps = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for epoch in range(num_epochs):
            order = rng.permutation(n)[: steps_per_epoch * budget.batch_size]
            batches = [
                order[i : i + budget.batch_size] for i in range(0, len(order), budget.batch_size)
            ]

            def request(b: int, epoch: int = epoch, batches: list[Any] = batches) -> SampleResponse:
                call_seed = seed * 1_000_003 + epoch * 10_007 + b
                return _sample(
                    client, method, version, data.ex_targets[batches[b]], call_seed, budget
                )

            pending: Future[SampleResponse] = pool.submit(request, 0)
            bar = tqdm(
                range(len(batches)),
                desc=f"{method.name} seed {seed} epoch {epoch + 1}/{num_epochs}",
                leave=False,
                position=position,
                mininterval=1.0,
            )
            for b in bar:
                response = pending.result()
                if b + 1 < len(batches):
                    pending = pool.submit(request, b + 1)  # overlap the next RPC with training
                rows = batches[b]
                targets = torch.as_tensor(data.ex_targets[rows])
                table = model.item_table()
                users = model.users(table, torch.as_tensor(data.ex_hist[rows]))

                def embed(ids: torch.Tensor, table: torch.Tensor = table) -> torch.Tensor:
                    return table[ids]

                loss = esans_loss(
                    users,
                    table[targets],
                    response,
                    embed_items=embed,
                    temperature=budget.temperature,
                    eta=budget.eta,
                    hard_lambda=method.lam(budget),
                    use_edis=method.use_edis,
                    log_q_correction=method.log_q,
                )
                optimizer.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
                # False-negative bookkeeping on the real sampled negatives.
                ex_users = data.ex_users[rows]
                neg = np.concatenate(
                    [
                        response.simple_ids.reshape(len(rows), -1),
                        np.where(response.hard_valid, response.hard_ids, -1),
                    ],
                    axis=1,
                )
                valid = neg >= 0
                held = data.heldout[ex_users]
                heldout_hits += int(((neg[:, :, None] == held[:, None, :]).any(-1) & valid).sum())
                keys = ex_users[:, None] * num_items + neg
                pos = np.searchsorted(data.train_keys, keys).clip(max=len(data.train_keys) - 1)
                is_train = (data.train_keys[pos] == keys) & valid
                train_hits += int(is_train.sum())
                hard_train_hits += int(
                    is_train[:, neg.shape[1] - response.hard_ids.shape[1] :].sum()
                )
                sampled += int(valid.sum())
                hard_slots += response.hard_ids.size
                hard_filled += int(response.hard_counts.sum())
            curve.append(evaluate(model, data, "valid"))
    return RunResult(
        method=method.name,
        seed=seed,
        valid_curve=curve,
        valid=curve[-1] if curve else evaluate(model, data, "valid"),
        test=evaluate(model, data, "test") if evaluate_test else {},
        heldout_negative_rate=heldout_hits / max(sampled, 1),
        train_negative_rate=train_hits / max(sampled, 1),
        hard_fill=hard_filled / hard_slots if hard_slots else float("nan"),
        seconds=time.perf_counter() - started,
        steps=steps,
        hard_train_negative_rate=hard_train_hits / hard_filled if hard_filled else math.nan,
    )


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


def run_experiment(
    dataset: Dataset,
    budget: Budget,
    cache_dir: str | Path,
    methods: Sequence[Method] = METHODS,
    log: Callable[[str], None] = print,
) -> ExperimentResult:
    """Sweep K_p/K_s on validation, then train every method for ``budget.seeds`` seeds."""
    if budget.threads is not None:
        torch.set_num_threads(budget.threads)
    clock = time.perf_counter()
    data = prepare(dataset, budget, cache_dir)
    split = data.split
    result = ExperimentResult(
        dataset=describe(data.dataset),
        budget=asdict(budget),
        split={
            "evaluated_users": len(split.eval_users),
            "train_only_users": split.num_users - len(split.eval_users),
            "train_events": int(sum(len(s) for s in split.train)),
            "training_examples": len(data.ex_targets),
            "min_interactions": split.min_interactions,
        },
        methods=[
            {
                "name": m.name,
                "sampler": m.sampler,
                "codebook": m.codebook if m.sampler == "esans" else "-",
                "sampled": m.negatives(budget.m_c, budget.m_o)[0],
                "virtual": m.negatives(budget.m_c, budget.m_o)[1],
            }
            for m in methods
        ],
    )
    result.seconds["prepare"] = time.perf_counter() - clock
    log(
        f"{data.dataset.name}: {data.dataset.num_items} items, {data.dataset.num_users} users, "
        f"{len(data.ex_targets)} training examples ({result.seconds['prepare']:.0f} s to prepare)"
    )
    esans = next(m for m in methods if m.name == "ESANS")
    with LocalSamplerService(max_batch=max(budget.batch_size, 1)) as service:
        clock = time.perf_counter()
        best: tuple[float, int, int] | None = None
        # Two stages: K_p at the middle K_s, then K_s at the best K_p (validation only).
        mid_ks = budget.sweep_ks[len(budget.sweep_ks) // 2]
        tried: set[tuple[int, int]] = set()
        bar = tqdm(total=len(budget.sweep_kp) + len(budget.sweep_ks) - 1, desc="K_p/K_s sweep")
        for stage in range(2):
            grid = (
                [(kp, mid_ks) for kp in budget.sweep_kp]
                if stage == 0 or best is None
                else [(best[1], ks) for ks in budget.sweep_ks]
            )
            for kp, ks in grid:
                if (kp, ks) in tried:
                    continue
                tried.add((kp, ks))
                artifact = build_codebook(data, FULL, kp, ks, budget)
                version = service.publish(artifact)
                run = train_run(
                    data, esans, version, service.client, budget, seed=0,
                    epochs=budget.sweep_epochs, evaluate_test=False,
                )  # fmt: skip
                score = (run.valid[50] + run.valid[200]) / 2
                result.sweep.append(
                    {"K_p": kp, "K_s": ks, "valid": run.valid, "seconds": run.seconds}
                )
                if best is None or score > best[0]:
                    best = (score, kp, ks)
                bar.update()
        bar.close()
        if best is None:
            raise ValueError("the sweep grid is empty")
        _, kp, ks = best
        result.chosen = (kp, ks)
        result.seconds["sweep"] = time.perf_counter() - clock
        log(f"chosen on validation: K_p={kp}, K_s={ks} ({result.seconds['sweep']:.0f} s)")

        clock = time.perf_counter()
        versions: dict[str, str] = {}
        for variant in sorted({m.codebook for m in methods if m.sampler == "esans"} | {FULL}):
            artifact = build_codebook(data, variant, kp, ks, budget)
            versions[variant] = service.publish(artifact)
            result.codebooks[variant] = codebook_summary(data, artifact)
        result.seconds["codebooks"] = time.perf_counter() - clock

        clock = time.perf_counter()
        for method in tqdm(SENSITIVITY, desc="sensitivity (validation)", position=0):
            run = train_run(
                data, method, versions[FULL], service.client, budget, seed=0,
                epochs=budget.sweep_epochs, evaluate_test=False,
            )  # fmt: skip
            result.sensitivity.append(
                {
                    "method": method.name,
                    "hard_lambda": method.lam(budget) if method.m_h else None,
                    "log_q": method.log_q,
                    "valid": run.valid,
                    "train_negative_rate": run.train_negative_rate,
                }
            )
        result.seconds["sensitivity"] = time.perf_counter() - clock

        clock = time.perf_counter()
        jobs = [(seed, m) for seed in range(budget.seeds) for m in methods]
        for seed, method in tqdm(jobs, desc="runs (method x seed)", position=0):
            run = train_run(data, method, versions[method.codebook], service.client, budget, seed)
            result.runs.append(run)
            log(
                f"{method.name:<30} seed {seed}: valid R@50 {run.valid[50]:.4f}, "
                f"test R@50 {run.test[50]:.4f} R@200 {run.test[200]:.4f} ({run.seconds:.0f} s)"
            )
        result.seconds["training"] = time.perf_counter() - clock
    return result
