"""``docs/results.md`` (tables, cluster summary, setup) and the recall-vs-epoch plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from esans_eval.experiment import KS, ExperimentResult, RunResult

BASELINE = "UNS"
MAIN = ("UNS", "PNS", "MNS", "ESANS")


def _stats(runs: list[RunResult], split: str, k: int) -> tuple[float, float]:
    values = [getattr(r, split)[k] for r in runs]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), std


def _by_method(result: ExperimentResult) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for run in result.runs:
        out.setdefault(run.method, []).append(run)
    return out


def _verdict(runs: list[RunResult], base: list[RunResult], k: int) -> str:
    """'yes' when the means differ by more than the sum of the two stds (with >= 2 seeds)."""
    if len(runs) < 2 or len(base) < 2 or runs is base:
        return "-"
    m1, s1 = _stats(runs, "test", k)
    m0, s0 = _stats(base, "test", k)
    return "yes" if abs(m1 - m0) > s1 + s0 else "no"


def _table(result: ExperimentResult, names: list[str], reference: str) -> list[str]:
    groups = _by_method(result)
    base = groups[BASELINE]
    ref = groups[reference]
    lines = [
        f"| method | R@50 | R@200 | R@50 vs {BASELINE} | R@200 vs {BASELINE} | "
        f"beyond spread vs {reference} (R@50 / R@200) | valid R@50 | train-positive negatives |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = groups.get(name)
        if not runs:
            continue
        cells = [name]
        for k in KS:
            m, s = _stats(runs, "test", k)
            cells.append(f"{m:.4f} ± {s:.4f}")
        for k in KS:
            m, _ = _stats(runs, "test", k)
            b, _ = _stats(base, "test", k)
            cells.append(f"{(m / b - 1) * 100:+.1f}%" if b > 0 else "-")
        cells.append(" / ".join(_verdict(runs, ref, k) for k in KS))
        cells.append(f"{_stats(runs, 'valid', 50)[0]:.4f}")
        cells.append(f"{np.mean([r.train_negative_rate for r in runs]):.2%}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _coverage_line(summary: dict[str, Any]) -> list[str]:
    coverage = summary.get("hard_coverage")
    if not coverage:
        return []
    return [
        f"- secondary codebook: {summary.get('secondary', 'global')}; fine cells per cluster "
        f"min {coverage['cells_per_cluster_min']}, median {coverage['cells_per_cluster_median']:g}"
        f", max {coverage['cells_per_cluster_max']}; items with >= {coverage['m_h']} hard "
        f"candidates {coverage['share_with_m_h']:.1%}"
    ]


def _relative(runs: list[RunResult], base: list[RunResult], k: int) -> float:
    m, _ = _stats(runs, "test", k)
    b, _ = _stats(base, "test", k)
    return (m / b - 1) * 100 if b > 0 else math.nan


def findings(result: ExperimentResult) -> list[str]:
    """Plain statements read off the numbers (no judgement beyond the spread rule)."""
    groups = _by_method(result)
    if BASELINE not in groups or "ESANS" not in groups:
        return []
    esans, base = groups["ESANS"], groups[BASELINE]
    lines = []
    for k in KS:
        best = max((n for n in MAIN if n in groups), key=lambda n: _stats(groups[n], "test", k)[0])
        verdict = _verdict(esans, base, k)
        beyond = {"yes": "beyond", "no": "within", "-": "not comparable with one seed to"}[verdict]
        paper = " (the paper reports about +15% over UNS on its data)" if k == 50 else ""
        lines.append(
            f"- Recall@{k}: best main method {best}; ESANS vs {BASELINE} "
            f"{_relative(esans, base, k):+.1f}%, {beyond} the spread over seeds{paper}."
        )
    for name, what in (
        ("ESANS w/o EDIS", "EDIS"),
        ("ESANS w/o secondary codebook", "hard negatives (secondary codebook)"),
        ("ESANS w/o multimodal", "the text and metadata views in MSAC"),
        ("ESANS global secondary (paper)", "per-cluster secondary codebooks (the default)"),
    ):
        if name in groups:
            delta = [_stats(esans, "test", k)[0] - _stats(groups[name], "test", k)[0] for k in KS]
            verdicts = [_verdict(groups[name], esans, k) for k in KS]
            lines.append(
                f"- {what}: ESANS minus `{name}` = {delta[0]:+.4f} R@50, {delta[1]:+.4f} R@200 "
                f"(beyond spread: {' / '.join(verdicts)})."
            )
    rate = {n: float(np.mean([r.train_negative_rate for r in groups[n]])) for n in groups}
    lines.append(
        f"- False negatives in the broad sense (sampled negatives the row's user trained on): "
        f"ESANS {rate['ESANS']:.1%} vs {BASELINE} {rate[BASELINE]:.1%}."
    )
    if result.sweep and len({row["K_p"] for row in result.sweep}) > 1:
        kp, _ = result.chosen
        grid = sorted({row["K_p"] for row in result.sweep})
        if kp in (grid[0], grid[-1]):
            edge = "coarsest" if kp == grid[0] else "finest"
            lines.append(
                f"- Validation chose the {edge} primary codebook of the grid (K_p = {kp} of "
                f"{grid}): the optimum may lie beyond it."
            )
    probes = {row["method"]: row["valid"] for row in result.sensitivity}
    if "ESANS" in probes and len(probes) > 2:
        best = max(probes, key=lambda name: probes[name][50] + probes[name][200])
        base = probes["ESANS"]
        lines.append(
            f"- Sensitivity on validation: best variant {best} (R@50 {probes[best][50]:.4f}, "
            f"R@200 {probes[best][200]:.4f}) against ESANS as run (R@50 {base[50]:.4f}, "
            f"R@200 {base[200]:.4f}); one seed, so differences below the main table's spread "
            "are noise."
        )
    full = result.codebooks.get("full", {}).get("stats", {})
    if full.get("cluster_size_median") is not None:
        lines.append(
            f"- Primary clusters hold a median of {full['cluster_size_median']} items (min "
            f"{full.get('cluster_size_min')}, max {full.get('cluster_size_max')}), against "
            f"m_o = {result.budget['m_o']} items drawn per chosen cluster."
        )
    return lines


def load_result(path: str | Path) -> ExperimentResult:
    """An :class:`ExperimentResult` back from the JSON written beside a report."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    raw.pop("command", None)

    def by_k(values: dict[str, float]) -> dict[int, float]:
        return {int(k): float(v) for k, v in values.items()}

    runs = [
        RunResult(
            **{
                **run,
                "valid_curve": [by_k(epoch) for epoch in run["valid_curve"]],
                "valid": by_k(run["valid"]),
                "test": by_k(run["test"]),
            }
        )
        for run in raw.pop("runs")
    ]
    for row in [*raw.get("sweep", []), *raw.get("sensitivity", [])]:
        row["valid"] = by_k(row["valid"])
    raw["chosen"] = tuple(raw["chosen"])
    return ExperimentResult(**raw, runs=runs)


def plot_curves(result: ExperimentResult, path: Path) -> None:
    """Validation Recall@50 / @200 after each epoch, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in _by_method(result).items():
        for ax, k in zip(axes, KS, strict=True):
            curve = np.mean([[epoch[k] for epoch in r.valid_curve] for r in runs], axis=0)
            style = "-" if name in MAIN else "--"
            ax.plot(np.arange(1, len(curve) + 1), curve, style, marker="o", label=name)
    epochs = max((len(r.valid_curve) for r in result.runs), default=1)
    for ax, k in zip(axes, KS, strict=True):
        ax.set_xticks(range(1, epochs + 1))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation Recall@{k}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result.dataset['name']}: validation recall per epoch (mean over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _examples_seen(result: ExperimentResult) -> int:
    steps = [r.steps for r in result.runs]
    return int(np.median(steps)) * int(result.budget["batch_size"]) if steps else 0


def render(result: ExperimentResult, command: str, plot_name: str | None) -> str:
    b = result.budget
    groups = _by_method(result)
    seeds = b["seeds"]
    total = sum(result.seconds.values())
    kp, ks = result.chosen
    lines = [
        f"# ESANS on real data: {result.dataset['name']}",
        "",
        "Generated by `esans_eval` (do not edit by hand). Two-tower models trained with "
        "negatives drawn from the running sampler service over gRPC; Recall@K on the test "
        "split, full ranking over all items, mean ± std over "
        f"{seeds} seed(s).",
        "",
        f"Command: `{command}`  ",
        f"Runtime: {total / 60:.1f} min in all (prepare {result.seconds.get('prepare', 0):.0f} s, "
        f"K_p/K_s sweep {result.seconds.get('sweep', 0):.0f} s, codebooks "
        f"{result.seconds.get('codebooks', 0):.0f} s, sensitivity "
        f"{result.seconds.get('sensitivity', 0):.0f} s, training + evaluation "
        f"{result.seconds.get('training', 0):.0f} s), 2 CPU cores.",
        "",
        "## Main table (test split)",
        "",
        *_table(result, [n for n in MAIN if n in groups], BASELINE),
        "",
        '"beyond spread": yes when |mean difference| exceeds the sum of the two standard '
        "deviations over seeds (a rough, conservative test; '-' with a single seed). "
        '"train-positive negatives": share of the sampled negatives that are items the '
        "row's user interacted with in training (false negatives in the broad sense).",
        "",
        "## Ablations (test split)",
        "",
        *_table(result, [n for n in groups if n not in MAIN or n == "ESANS"], "ESANS"),
        "",
        "## Findings (read off the numbers above)",
        "",
        *findings(result),
        "",
    ]
    if plot_name:
        lines += [f"![validation recall per epoch]({plot_name})", ""]
    lines += [
        "## Negatives per positive",
        "",
        "| method | sampler | codebook | sampled | virtual "
        "(EDIS) | held-out negatives | hard slots filled | hard negatives the user trained on |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in result.methods:
        runs = groups.get(m["name"], [])
        held = np.mean([r.heldout_negative_rate for r in runs]) if runs else math.nan
        fill = np.mean([r.hard_fill for r in runs]) if runs else math.nan
        hard_train = np.mean([r.hard_train_negative_rate for r in runs]) if runs else math.nan
        lines.append(
            f"| {m['name']} | {m['sampler']} | {m['codebook']} | {m['sampled']} | {m['virtual']} "
            f"| {held:.3%} | {'-' if math.isnan(fill) else f'{fill:.1%}'} "
            f"| {'-' if math.isnan(hard_train) else f'{hard_train:.1%}'} |"
        )
    lines += [
        "",
        "Baselines draw m_c x m_o = 10 negatives per positive (the paper's fairness setting); "
        "ESANS draws m_c = 2 clusters x m_o = 5 items plus m_h hard negatives and adds the EDIS "
        'virtual negatives built from them. "held-out negatives": share of sampled negatives '
        "equal to the user's validation or test item.",
        "",
        "## K_p / K_s sweep (validation split, full ESANS, seed 0)",
        "",
        "| K_p | K_s | valid R@50 | valid R@200 | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in result.sweep:
        lines.append(
            f"| {row['K_p']} | {row['K_s']} | {row['valid'][50]:.4f} | {row['valid'][200]:.4f} "
            f"| {row['seconds']:.0f} |"
        )
    lines += ["", f"Chosen: K_p = {kp}, K_s = {ks} (best mean of valid R@50 and R@200).", ""]
    if result.sensitivity:
        lines += [
            "## Sensitivity (validation split, seed 0, the sweep's budget, chosen codebook)",
            "",
            "Lambda (the EDIS hard interpolation weight) and the log-q correction the paper "
            "leaves off, probed on validation only; the test split is never used to pick them.",
            "",
            "| variant | lambda | log-q correction | valid R@50 | valid R@200 | "
            "train-positive negatives |",
            "|---|---|---|---|---|---|",
        ]
        for row in result.sensitivity:
            lam = "-" if row["hard_lambda"] is None else f"{row['hard_lambda']:g}"
            lines.append(
                f"| {row['method']} | {lam} | {'yes' if row['log_q'] else 'no'} | "
                f"{row['valid'][50]:.4f} | {row['valid'][200]:.4f} | "
                f"{row['train_negative_rate']:.2%} |"
            )
        lines.append("")
    lines += ["## Codebooks", ""]
    for variant, summary in result.codebooks.items():
        st = summary["stats"]
        lines += [
            f"### {variant} ({', '.join(summary['modalities'])}), version {summary['version']}",
            "",
            f"- primary codewords used: {st.get('primary_used')} / {st.get('num_primary')} "
            f"(perplexity {st.get('primary_perplexity', 0):.1f}); secondary used "
            f"{st.get('secondary_used')} / {st.get('num_secondary')}; fine cells used "
            f"{st.get('fine_cells_used')}",
            *_coverage_line(summary),
            f"- cluster sizes: min {st.get('cluster_size_min')}, median "
            f"{st.get('cluster_size_median')}, max {st.get('cluster_size_max')}; median "
            f"effective number of clusters per cluster-choice row "
            f"{summary['effective_clusters_median']:.1f}",
            "",
        ]
        for ex in summary["examples"]:
            lines.append(
                f"- cluster {ex['cluster']} ({ex['size']} items; {', '.join(ex['genres'])}): "
                + "; ".join(ex["titles"])
            )
        lines.append("")
    d, sp = result.dataset, result.split
    lines += [
        "## Setup",
        "",
        f"- Data: {d['name']}, {d['items']} items, {d['users']} users, {d['events']} events "
        f"({d['dropped_events']} dropped: unknown item).",
        f"- Split: leave-last-out per user in time order; last item = test, second last = "
        f"validation, the rest = training. Users with fewer than {sp['min_interactions']} "
        f"distinct items stay in training only and are not evaluated "
        f"({sp['train_only_users']} such users; {sp['evaluated_users']} evaluated). Test "
        "rankings use the training items plus the validation item as history and mask both.",
        "- Item features: text = all-MiniLM-L6-v2 over title, year and genres (384-d); "
        "behaviour = PPMI item-item co-occurrence of TRAINING events, top-64 eigenpairs; "
        "metadata = one-hot genres + decade + training-popularity decile. MSAC uses all three "
        "(d_m = {msac_dim}, {msac_epochs} epochs); the item tower uses text + metadata plus an "
        "id embedding; popularity sent to the service = training counts.".format(**b),
        f"- Model: user tower = mean of the item-tower outputs of the last {b['history']} "
        f"training items + residual MLP; d_k = {b['dim']}; cosine logits, InfoNCE tau = "
        f"{b['temperature']} per positive (`esans_sampler.trainer.esans_loss`), no log-q "
        f"correction; eta = {b['eta']}, lambda = {b['hard_lambda']}.",
        f"- Budget, identical for every method: {b['epochs']} epochs x "
        f"{'all' if b['max_steps'] is None else b['max_steps']} steps of batch "
        f"{b['batch_size']} (examples drawn without replacement each epoch, same order per "
        f"seed), Adam lr {b['learning_rate']}, {seeds} seed(s). The service runs in-process "
        "(embedded Redis, gRPC on a free port); the trainer uses 1 torch thread.",
        f"- Training examples: {sp['training_examples']} next-item targets from "
        f"{sp['train_events']} training events; the budget shows each method "
        f"{_examples_seen(result) / max(sp['training_examples'], 1):.2f} passes over them.",
        "",
    ]
    return "\n".join(lines)


def recorded_command(path: str | Path) -> str | None:
    """The command that produced the JSON at ``path`` (None when it did not record one)."""
    command = json.loads(Path(path).read_text(encoding="utf-8")).get("command")
    return command if isinstance(command, str) else None


def write_report(result: ExperimentResult, out: str | Path, command: str) -> Path:
    """Write the markdown, the plot beside it and a JSON dump of every number."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = path.with_name(path.stem + "-recall.png")
    plot_curves(result, plot)
    path.write_text(render(result, command, plot.name), encoding="utf-8")
    payload: dict[str, Any] = {"command": command, **asdict(result)}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path
