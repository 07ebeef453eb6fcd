"""Time the batch-shared InfoNCE loss (forward + backward) on one core, as the evaluation's
trainer runs it: B rows against N shared negatives, log q per column and a (B, N) mask.

Baseline, measured in the same run: the previous form, which built a (B, N) bias matrix
(zeros or -log q, then masked_fill) and fed it to addmm, so the logit matrix was written three
times. Both give the same loss and gradients (checked here before timing).

    python benchmarks/bench_loss.py [--batch 512 --negatives 8000 20000 --dim 64 --repeat 20]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from esans_sampler.loss import info_nce_loss


class _PreviousShared(torch.autograd.Function):
    """The previous logsumexp over [positive, user @ negatives.T + bias]: the same in-place
    work on the logits, but with a (B, N) bias matrix built before it."""

    @staticmethod
    def forward(ctx: Any, user: torch.Tensor, negatives: torch.Tensor, bias: torch.Tensor,
                positive: torch.Tensor) -> torch.Tensor:  # fmt: skip
        logits = torch.addmm(bias, user, negatives.transpose(0, 1))
        row_max = torch.maximum(logits.amax(dim=1), positive)
        logits.sub_(row_max.unsqueeze(1)).exp_()
        total = row_max + torch.log(logits.sum(dim=1) + torch.exp(positive - row_max))
        ctx.save_for_backward(user, negatives, logits, row_max, total, positive)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        user, negatives, weights, row_max, total, positive = ctx.saved_tensors
        scaled = weights * (grad_total * torch.exp(row_max - total)).unsqueeze(1)
        return (scaled @ negatives, scaled.transpose(0, 1) @ user, None,
                grad_total * torch.exp(positive - total))  # fmt: skip


def previous_form(
    user: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    log_q: torch.Tensor,
    mask: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """The shared loss as it was computed before: a (B, N) bias (-log q, then masked_fill),
    then addmm over it."""
    scaled = user / tau
    pos = (scaled * positive).sum(dim=-1)
    bias = (-log_q).expand(user.shape[0], -1)
    bias = bias.masked_fill(mask, torch.finfo(user.dtype).min / 4)
    total: torch.Tensor = _PreviousShared.apply(  # type: ignore[no-untyped-call]
        scaled, negatives, bias, pos
    )
    return (total - pos).mean()


def _time_alternately(steps: tuple[Callable[[], torch.Tensor], ...], repeat: int) -> list[float]:
    """Median ms of forward + backward of each step, the steps run in turn each round so
    that a noisy neighbour slows them alike."""
    samples: list[list[float]] = [[] for _ in steps]
    for round_ in range(repeat + 1):
        for step, times in zip(steps, samples, strict=True):
            clock = time.perf_counter()
            step().backward()  # type: ignore[no-untyped-call]
            if round_:  # the first round warms up
                times.append(time.perf_counter() - clock)
    return [1e3 * sorted(times)[len(times) // 2] for times in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--negatives", type=int, nargs="+", default=[8000, 20000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--masked", type=float, default=0.02, help="share of masked pairs")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    figures: dict[str, dict[str, float]] = {}
    for n in args.negatives:

        def leaf(*shape: int) -> torch.Tensor:
            x = torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)
            return x.requires_grad_()

        user, positive, negatives = (
            leaf(args.batch, args.dim),
            leaf(args.batch, args.dim),
            leaf(n, args.dim),
        )
        log_q = torch.rand(n, generator=generator).log() - 5
        mask = torch.rand(args.batch, n, generator=generator) < args.masked
        tau = 0.05

        current = partial(
            info_nce_loss, user, positive, negatives, tau, negative_log_q=log_q,
            negative_mask=mask,
        )  # fmt: skip
        previous = partial(previous_form, user, positive, negatives, log_q, mask, tau)
        a, b = current(), previous()
        ga = torch.autograd.grad(a, (user, negatives))
        gb = torch.autograd.grad(b, (user, negatives))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(ga, gb, strict=True))
        ms_current, ms_previous = _time_alternately((current, previous), args.repeat)
        figures[str(n)] = {
            "current_ms": round(ms_current, 2),
            "previous_ms": round(ms_previous, 2),
            "speedup": round(ms_previous / ms_current, 2),
        }
        print(
            f"B={args.batch}, N={n}: {ms_current:.1f} ms against {ms_previous:.1f} ms before "
            f"({ms_previous / ms_current:.2f}x)"
        )
    print(json.dumps({"benchmark": "loss", "batch": args.batch, "negatives": figures}))


if __name__ == "__main__":
    main()
