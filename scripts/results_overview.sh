#!/bin/bash
# Regenerates docs/results.md from the evaluation progress files (run from the repo root,
# after make install): the state of a long evaluation that is still running or was cut off.
set -e
E=".venv/bin/python -m esans_eval"
{
cat <<'HEAD'
# Evaluation results: every trial, run and probe

The evaluation of issue 10 (batch-shared protocol, early stopping, tuned baselines, Complete
Journey and MovieLens-1M) has finished on both datasets. The full reports are
[`docs/results-completejourney.md`](results-completejourney.md) and
[`docs/results-ml-1m.md`](results-ml-1m.md), each with its machine-readable JSON and its
recall-per-epoch plot. Each finished trial and run is also kept, one JSON line each, in
`docs/results-<dataset>.progress.jsonl`; a rerun of the commands below with the same budget
resumes from it and retrains only what changed. Everything below is generated from the progress and probe files by
`esans eval --status` and `scripts/probe_levers.py --summary`; nothing is copied by hand.

```bash
.venv/bin/esans eval --dataset completejourney --out docs/results-completejourney.md   # resumes
.venv/bin/esans eval --dataset ml-1m --out docs/results-ml-1m.md
.venv/bin/esans eval --status --out docs/results-completejourney.md                    # this page's tables
```

How to read the tables: every trial is on the validation split, seed 0, one epoch (200 steps
of B = 512) with the method's own knob; a run is trained with early stopping on validation
Recall@50 (patience 2, cap 8 epochs on Complete Journey and 12 on MovieLens-1M) and read on
test once, at its best epoch. The protocol, the split and the methods are described in the
README ("Evaluation on real data").

HEAD
echo "## Complete Journey (68,492 products, first purchases in the last 4 weeks)"
echo
echo "Ranking by training popularity, no model: validation R@50 0.0453 / R@200 0.1006, test R@50 0.0438 / R@200 0.0954."
echo "The learning rate (3e-3) was chosen on validation over 1e-3 for UNS, ESANS and in-batch alike, on the first two epochs: \`docs/results-completejourney-lr.jsonl\`. Trained to convergence (probe below), in-batch + log-q and the product default do better at 1e-3, UNS does better at 3e-3 and the paper's ESANS ties: no one rate suits every method."
echo
$E --status --out docs/results-completejourney.md
echo
echo "### Reference: ranking by recent purchases, no model"
echo
echo "\`scripts/probe_recent_popularity.py\`: all purchase lines of the last W weeks before the window, each household's own items masked; W chosen on validation, test read once."
echo
.venv/bin/python scripts/probe_recent_popularity.py
echo
echo "### Probe: one lever at a time on the product default (validation only)"
echo
echo "\`scripts/probe_levers.py --dataset completejourney\`: the product default's chosen trial with one change each, and in-batch + log-q (and, at both learning rates, UNS and the paper's ESANS) as chosen, trained with early stopping on the evaluation's budget; the test split is never read. Runs: \`docs/probe-levers-completejourney.jsonl\`."
echo
.venv/bin/python scripts/probe_levers.py --dataset completejourney --summary
echo
echo "## MovieLens-1M (leave last out)"
echo
$E --status --out docs/results-ml-1m.md
echo
echo "### Probe: EDIS in the product default (validation only)"
echo
echo "\`scripts/probe_levers.py --dataset ml-1m --levers 'no EDIS' 'as chosen'\`; runs: \`docs/probe-levers-ml-1m.jsonl\` (the number of hard negatives: \`docs/probe-hardness-ml-1m.jsonl\`)."
echo
.venv/bin/python scripts/probe_levers.py --dataset ml-1m --summary
} > docs/results.md
