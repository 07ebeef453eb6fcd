"""Every benchmark ends with one JSON line a script can read (tiny sizes here; the figures
themselves come from full runs, see the README's performance table)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "bench_sampler.py": ["--items", "20000", "--repeats", "20", "--loop-repeats", "2"],
    "bench_edis.py": ["--items", "20000", "--batches", "5", "--loop-batches", "2"],
    "bench_exclusions.py": ["--items", "20000", "--repeats", "5"],
    "bench_delta.py": ["--items", "5000"],
    "bench_loss.py": ["--negatives", "300", "--repeat", "2"],
    "bench_eval_step.py": ["--items", "3000", "--users", "50", "--batch", "64", "--steps", "2"],
    "bench_eval_allocator.py": [
        "--items", "3000", "--users", "50", "--batch", "64", "--steps", "2", "--rounds", "1",
    ],
    "bench_eval_jobs.py": [
        "--dataset", "ml-100k", "--max-users", "60", "--max-steps", "2", "--text-encoder", "hash",
        "--cache-dir", str(Path(tempfile.gettempdir()) / "esans-bench-eval-jobs"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_ends_with_one_json_line(script: str) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *TINY[script]],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["benchmark"] == script.removeprefix("bench_").removesuffix(".py")
    assert all(v is None or isinstance(v, (int, float, str, bool, dict)) for v in figures.values())
