"""The trainer process's allocator setting: a shared-protocol step reuses the memory of the
step before instead of faulting fresh pages in (esans_eval.trainer_process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A few shared-protocol loss steps on a (B, N) float32 logit matrix of ~42 MB, above glibc's
# largest adaptive mmap threshold (32 MB); prints the minor page faults of each step.
STEPS = """
import json, resource, sys
import torch
from esans_eval.trainer_process import reuse_freed_memory
from esans_sampler.loss import info_nce_loss
torch.set_num_threads(1)
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
gen = torch.Generator().manual_seed(0)
user = torch.randn(256, 16, generator=gen, requires_grad=True)
positive = torch.randn(256, 16, generator=gen)
negatives = torch.randn(41_000, 16, generator=gen, requires_grad=True)
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    info_nce_loss(user, positive, negatives).backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""
PAGES = 256 * 41_000 * 4 // 4096  # pages of one logit matrix


def _step_faults(mode: str) -> list[int]:
    done = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    faults: list[int] = json.loads(done.stdout)
    return faults[2:]  # after two warm-up steps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steps_reuse_freed_memory_instead_of_faulting_pages_in() -> None:
    default = _step_faults("default")
    if min(default) < PAGES // 2:
        pytest.skip(f"this allocator does not fault every step in by default: {default}")
    reused = _step_faults("reuse")
    # Most steps fault nothing in; one may, when the heap grows past a fragment.
    assert sorted(reused)[len(reused) // 2] < PAGES // 10, (reused, default)
