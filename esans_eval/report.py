"""``docs/results-<dataset>.md`` (tables, measurements, setup), its plot and strict JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from esans_eval.results import ExperimentResult, RunResult, jsonable, run_from_dict
from esans_eval.training import COLD_MAX_COUNT, KS

BASELINE = "UNS"


def _by_method(result: ExperimentResult) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for run in result.runs:
        out.setdefault(run.method, []).append(run)
    return out


def _roles(result: ExperimentResult) -> dict[str, str]:
    return {m["name"]: m.get("role", "baseline") for m in result.methods}


def baselines(result: ExperimentResult) -> list[str]:
    """Baseline methods of the main (shared) table."""
    return [
        m["name"]
        for m in result.methods
        if m.get("role") == "baseline" and not m["name"].endswith("per positive")
    ]


def product_default(result: ExperimentResult) -> str | None:
    return next(
        (
            m["name"]
            for m in result.methods
            if m.get("role") == "default" and not m["name"].endswith("per positive")
        ),
        None,
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    return float(np.mean(clean)), float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0


def _test(runs: list[RunResult], k: int) -> list[float]:
    return [r.test.get(k, math.nan) for r in sorted(runs, key=lambda r: r.seed)]


def strongest_baseline(result: ExperimentResult) -> str | None:
    """The baseline with the best mean test Recall@50."""
    groups = _by_method(result)
    scored = [(np.mean(_test(groups[b], 50)), b) for b in baselines(result) if b in groups]
    return max(scored)[1] if scored else None


def paired(runs: list[RunResult], base: list[RunResult], k: int) -> tuple[float, float, int]:
    """Mean and std over shared seeds of (method - base) test Recall@k, and the seed count."""
    by_seed = {r.seed: r.test.get(k, math.nan) for r in base}
    diffs = [r.test.get(k, math.nan) - by_seed[r.seed] for r in runs if r.seed in by_seed]
    mean, std = _mean_std(diffs)
    return mean, std, len(diffs)


def _verdict(runs: list[RunResult], base: list[RunResult], k: int = 50) -> str:
    """Beyond the spread: every seed's paired difference has the same sign and the mean
    difference exceeds the sum of the two methods' stds over seeds (>= 2 seeds)."""
    if runs is base:
        return "-"
    mean, std, n = paired(runs, base, k)
    if n < 2:
        return "1 seed"
    spread = _mean_std(_test(runs, k))[1] + _mean_std(_test(base, k))[1]
    return f"{mean:+.4f} ± {std:.4f} ({'beyond' if abs(mean) > spread else 'within'} spread)"


def _cell(values: list[float], fmt: str = ".4f") -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:{fmt}} ± {std:{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


def _table(result: ExperimentResult, names: list[str], reference: str | None) -> list[str]:
    groups = _by_method(result)
    base = groups.get(BASELINE, [])
    ref = groups.get(reference or "", [])
    lines = [
        f"| method | seeds | test R@50 | test R@200 | R@50 vs {BASELINE} | "
        f"paired R@50 vs {reference or '-'} | cold R@50 | best epoch | valid R@50 | "
        "user's own items among negatives | items used as negatives / epoch | "
        "popularity percentile of negatives |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = groups.get(name)
        if not runs:
            continue
        r50, b50 = np.mean(_test(runs, 50)), np.mean(_test(base, 50)) if base else math.nan
        cells = [
            name,
            str(len(runs)),
            _cell(_test(runs, 50)),
            _cell(_test(runs, 200)),
            f"{(r50 / b50 - 1) * 100:+.1f}%" if b50 and not math.isnan(b50) else "-",
            _verdict(runs, ref) if ref else "-",
            _cell([r.test_cold.get(50, math.nan) for r in runs]),
            f"{np.mean([r.best_epoch for r in runs]):.1f}",
            _cell([r.valid[50] for r in runs]),
            f"{np.mean([r.best.user_item_share for r in runs]):.2%}",
            f"{np.mean([r.best.coverage for r in runs]):.1%}",
            f"{np.mean([r.best.popularity_percentile for r in runs]):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reference(result: ExperimentResult) -> list[str]:
    test = result.reference.get("most popular (test)")
    if not test:
        return []
    values = {str(k): v for k, v in test.items()}
    return [
        "Reference without training, ranking by training popularity: test R@50 "
        f"{values['50']:.4f}, R@200 {values['200']:.4f}, cold R@50 "
        f"{values.get('cold 50', math.nan):.4f}.",
        "",
    ]


def _tuning(result: ExperimentResult) -> list[str]:
    lines = [
        "| method | trial | valid R@50 | valid R@200 | chosen |",
        "|---|---|---|---|---|",
    ]
    for row in result.tuning:
        valid = {int(k): v for k, v in row["valid"].items()}
        label = row["trial"]
        chosen = result.chosen.get(row["method"]) == label or (
            row["method"].startswith("ESANS (paper)")
            and label == f"K_p {result.kp_ks[0]}, K_s {result.kp_ks[1]}"
        )
        lines.append(
            f"| {row['method']} | {label} | {valid[50]:.4f} | {valid[200]:.4f} | "
            f"{'yes' if chosen else ''} |"
        )
    return lines


def findings(result: ExperimentResult) -> list[str]:
    """Plain statements computed from the numbers (no interpretation beyond them)."""
    groups = _by_method(result)
    out = []
    strongest = strongest_baseline(result)
    default = product_default(result)
    roles = _roles(result)
    paper = next((n for n, r in roles.items() if r == "paper"), None)
    for name in (default, paper):
        if name is None or name not in groups or strongest is None:
            continue
        mean, std, n = paired(groups[name], groups[strongest], 50)
        rel = np.mean(_test(groups[name], 50)) / np.mean(_test(groups[strongest], 50)) - 1
        uns = np.mean(_test(groups[name], 50)) / np.mean(_test(groups.get(BASELINE, []), 50)) - 1
        out.append(
            f"- {name}: test R@50 {rel * 100:+.1f}% against the strongest baseline "
            f"({strongest}; paired difference {mean:+.4f} ± {std:.4f} over {n} seeds, "
            f"{_verdict(groups[name], groups[strongest]).split('(')[-1].rstrip(')')}) and "
            f"{uns * 100:+.1f}% against {BASELINE}."
        )
    for name, runs in groups.items():
        share = np.mean([r.best.user_item_share for r in runs])
        if share > 0.05:
            out.append(
                f"- {name}: {share:.1%} of the negatives a row sees are items its own user has "
                "in training (false negatives by construction)."
            )
    return out


def plot_curves(result: ExperimentResult, path: Path) -> None:
    """Validation Recall@50 / @200 after each epoch, seed 0, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    roles = _roles(result)
    for name, runs in _by_method(result).items():
        run = min(runs, key=lambda r: r.seed)
        style = "--" if roles.get(name) == "ablation" or name.endswith("per positive") else "-"
        for ax, k in zip(axes, KS, strict=True):
            curve = [e.valid[k] for e in run.epochs]
            ax.plot(np.arange(1, len(curve) + 1), curve, style, marker="o", ms=3, label=name)
    for ax, k in zip(axes, KS, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation Recall@{k}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{result.dataset['name']}: validation recall per epoch (seed 0)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: ExperimentResult, command: str, plot_name: str | None) -> str:
    roles = _roles(result)
    strongest = strongest_baseline(result)
    main = [n for n, r in roles.items() if r != "ablation" and not n.endswith("per positive")]
    ablations = [n for n, r in roles.items() if r == "ablation"]
    per_positive = [n for n in roles if n.endswith("per positive")]
    ds, sp, budget = result.dataset, result.split, result.budget
    lines = [
        f"# Recall on {ds['name']}: ESANS against the samplers a trainer already has",
        "",
        f"Generated by `{command}`. Every number below comes from that run.",
        "",
        f"- Catalogue: {ds['items']} items, {ds['users']} users, {ds['events']} events "
        f"({ds['dropped_events']} dropped: unknown items).",
        f"- Split: {sp['rule']}.",
        f"- Validation: {sp['valid_users']} users, {sp['valid_targets']} targets; test: "
        f"{sp['test_users']} users, {sp['test_targets']} targets ({sp['cold_test_targets']} "
        f"cold: <= {COLD_MAX_COUNT} training events); {sp['training_examples']} training "
        "examples (next first-time item, up to "
        f"{budget['history']} items of history).",
        f"- Protocol (main table): negatives shared by the batch (B = {budget['batch_size']}); "
        "a row's own positive is masked, and for ESANS the items of its fine cell. Adam, "
        f"lr {budget['learning_rate']:g}, tau {budget['temperature']:g}, d_k {budget['dim']}; "
        f"an epoch is {budget['max_steps'] or 'all'} steps; early stopping on validation "
        f"R@50 with patience {budget['patience']}, cap {budget['epochs']} epochs; test is "
        "read once per run, at the best validation epoch.",
        f"- Codebook: K_p {result.kp_ks[0]}, K_s {result.kp_ks[1]} (chosen on validation), "
        f"d_m {budget['msac_dim']}, {budget['msac_epochs']} MSAC epochs.",
        f"- Tuning: each method gets up to 3 validation trials of {budget['trial_epochs']} "
        "epochs (seed 0) on its own knob; the table below lists them all.",
        "",
        "## Main table (batch-shared negatives)",
        "",
        *_table(result, main, strongest),
        "",
        *_reference(result),
        f"Strongest baseline (by test R@50): {strongest}. Product default: "
        f"{product_default(result)}. Cold R@50 is micro-averaged over cold targets.",
        "",
        *findings(result),
        "",
    ]
    if plot_name:
        lines += [f"![validation recall per epoch]({plot_name})", ""]
    if ablations:
        lines += [
            "## Ablations of the paper's ESANS (Table 4)",
            "",
            *_table(result, [n for n in main if roles[n] == "paper"] + ablations, None),
            "",
        ]
    if per_positive:
        lines += [
            "## Per-positive negatives (each row sees only its own draws)",
            "",
            *_table(result, per_positive, None),
            "",
        ]
    lines += ["## Method definitions", "", "| method | role | negatives |", "|---|---|---|"]
    lines += [f"| {m['name']} | {m['role']} | {m['negatives']} |" for m in result.methods]
    lines += ["", "## Validation trials", "", *_tuning(result), ""]
    for name, summary in result.codebooks.items():
        stats = summary.get("stats", {})
        cov = summary.get("hard_coverage", {})
        lines += [
            f"## Codebook `{name}` ({', '.join(summary.get('modalities', []))})",
            "",
            f"- primary clusters used {stats.get('primary_used')} of "
            f"{stats.get('num_primary')}, fine cells used {stats.get('fine_cells_used')}; "
            f"secondary: {summary.get('secondary')}; items with >= {cov.get('m_h')} hard "
            f"candidates {cov.get('share_with_m_h', math.nan):.1%}; median effective "
            "clusters per row of the cluster choice "
            f"{summary.get('effective_clusters_median', 0):.1f}.",
        ]
        for ex in summary.get("examples", []):
            lines.append(
                f"- cluster {ex['cluster']} ({ex['size']} items; {', '.join(ex['genres'])}): "
                + "; ".join(ex["titles"])
            )
        lines.append("")
    secs = result.seconds
    trial_minutes = sum(float(t.get("seconds", 0.0)) for t in result.tuning) / 60
    run_minutes = sum(run.seconds for run in result.runs) / 60
    lines += [
        "## Time",
        "",
        "This invocation: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items())
        + " (trials and runs resumed from the progress file cost nothing here).",
        "",
        f"Compute of the whole evaluation, summed over its trials and runs however many "
        f"invocations it took: trials {trial_minutes:.1f} min, runs {run_minutes:.1f} min, "
        f"{(trial_minutes + run_minutes) / 60:.1f} h in all (one trainer thread each).",
        "",
    ]
    return "\n".join(lines)


def results_json(result: ExperimentResult, command: str) -> dict[str, Any]:
    """The strict-JSON document beside the report (the issue's machine-readable schema,
    then every number of the run)."""
    payload: dict[str, Any] = {
        "command": command,
        "product_default": product_default(result),
        "baselines": baselines(result),
        "strongest_baseline": strongest_baseline(result),
        **asdict(result),
    }
    for run in payload["runs"]:
        run["test"] = {str(k): v for k, v in run["test"].items()}
    return jsonable(payload)  # type: ignore[no-any-return]


def load_result(path: str | Path) -> ExperimentResult:
    """An :class:`ExperimentResult` back from the JSON written beside a report."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("command", "product_default", "baselines", "strongest_baseline"):
        raw.pop(key, None)
    runs = [run_from_dict(run) for run in raw.pop("runs")]
    raw["kp_ks"] = tuple(raw["kp_ks"])
    return ExperimentResult(**raw, runs=runs)


def progress_summary(path: str | Path) -> str:
    """What a progress file holds: every finished trial and run (validation and, for runs,
    test Recall@K, best epoch, minutes), then the finished runs by method (mean ± std over
    the seeds done so far, with the negatives' measurements at the best epoch)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError("empty progress file")
    rows = ["| kind | method | trial / seed | valid R@50 | test R@50 | test R@200 | best epoch "
            "| epochs | minutes |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    runs: dict[str, list[RunResult]] = {}
    for line in lines[1:]:
        entry = json.loads(line)
        kind, method, what = entry["key"].split(":")[:3]
        run = run_from_dict(entry["value"])
        if kind == "run":
            runs.setdefault(method, []).append(run)
        rows.append(
            f"| {kind} | {method} | {what} | {run.valid[50]:.4f} | "
            f"{run.test.get(50, math.nan):.4f} | {run.test.get(200, math.nan):.4f} | "
            f"{run.best_epoch} | {len(run.epochs)} | {run.seconds / 60:.1f} |"
        )
    if runs:
        rows += [
            "",
            "| method | seeds | test R@50 | test R@200 | cold R@50 | best epoch | "
            "user's own items among negatives | items used as negatives / epoch | "
            "popularity percentile of negatives |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, done in runs.items():
            rows.append(
                f"| {method} | {len(done)} | {_cell(_test(done, 50))} | "
                f"{_cell(_test(done, 200))} | "
                f"{_cell([r.test_cold.get(50, math.nan) for r in done])} | "
                f"{np.mean([r.best_epoch for r in done]):.1f} | "
                f"{np.mean([r.best.user_item_share for r in done]):.2%} | "
                f"{np.mean([r.best.coverage for r in done]):.1%} | "
                f"{np.mean([r.best.popularity_percentile for r in done]):.2f} |"
            )
    return "\n".join(rows)


def recorded_command(path: str | Path) -> str | None:
    """The command that produced the JSON at ``path`` (None when it did not record one)."""
    command = json.loads(Path(path).read_text(encoding="utf-8")).get("command")
    return command if isinstance(command, str) else None


def write_report(result: ExperimentResult, out: str | Path, command: str) -> Path:
    """Write the markdown, the plot beside it and the strict JSON of every number."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = path.with_name(path.stem + "-recall.png")
    plot_curves(result, plot)
    path.write_text(render(result, command, plot.name), encoding="utf-8")
    text = json.dumps(results_json(result, command), indent=1, allow_nan=False)
    path.with_suffix(".json").write_text(text + "\n", encoding="utf-8")
    return path
