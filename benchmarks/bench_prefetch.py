"""How long a training loop waits on the sampler, with and without prefetching.

One ``esans serve`` subprocess serves a random codebook (default 1M items, K_p = 300,
K_s = 15) from a private redis-server. A training loop at B = 512 takes one response per
step and then does a fixed amount of CPU work standing in for the training step (torch
matmuls, calibrated to ``--step-ms`` in this run). Two loops run on the same batches:

* plain: ``client.sample(batch)`` then the step, so every RPC is waited for;
* prefetch: ``client.prefetch(batches, depth)``, so the next RPCs run during the step.

Waiting is the wall time the loop spends blocked on the sampler (inside ``sample`` or
``next()``), as a share of the loop's wall time. Target: <= 5% with prefetch.

    python benchmarks/bench_prefetch.py [--items N] [--steps S] [--step-ms MS] [--depth D]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

WAIT_SHARE_TARGET = 0.05


def calibrated_step(step_ms: float) -> Callable[[], None]:
    """A CPU-bound stand-in for a training step that takes about ``step_ms``."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)

    def work(repeats: int) -> None:
        x = a
        for _ in range(repeats):
            x = torch.tanh(x @ a)

    start = time.perf_counter()
    work(50)
    per_repeat = (time.perf_counter() - start) / 50
    repeats = max(1, round(step_ms / 1000 / per_repeat))
    return lambda: work(repeats)


def timed_loop(
    responses: Iterator[object], steps: int, step: Callable[[], None]
) -> tuple[float, float]:
    """(wall seconds, seconds blocked on ``next(responses)``) over ``steps`` steps."""
    waited = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        next(responses)
        waited += time.perf_counter() - t0
        step()
    return time.perf_counter() - start, waited


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-ms", type=float, default=30.0, help="CPU time of one training step")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args(argv)

    from esans_sampler.artifact import artifact_to_files
    from esans_sampler.client import SamplerClient
    from esans_sampler.synthetic import random_artifact
    from esans_service.embedded_redis import EmbeddedRedis
    from esans_service.harness import free_port, serve_process, stop_process, wait_until_serving
    from esans_service.store import CodebookStore

    artifact = random_artifact(args.items, 300, 15, 8, 0, 10**9)
    rng = np.random.default_rng(1)
    batches: list[npt.NDArray[np.int64]] = [
        rng.choice(artifact.index.item_ids, args.batch) for _ in range(args.steps)
    ]
    step = calibrated_step(args.step_ms)
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    step_ms = (time.perf_counter() - t0) / 10 * 1000

    with tempfile.TemporaryDirectory(prefix="esans-bench-prefetch-") as tmp:
        work = Path(tmp)
        redis_server = EmbeddedRedis(work / "redis", appendonly=False)
        server = None
        try:
            redis_server.start()
            version = CodebookStore(redis_server.client(decode_responses=False)).publish(
                artifact_to_files(artifact), activate=True
            )
            port, http_port = free_port(), free_port()
            log = work / "serve.log"
            server = serve_process(redis_server.url, work, log, port, http_port)
            wait_until_serving(server, f"http://127.0.0.1:{http_port}", version, log)
            with SamplerClient(f"127.0.0.1:{port}", timeout_s=30.0) as client:
                for ids in batches[:20]:  # warm the channel and the server
                    client.sample(ids)

                def plain() -> Iterator[object]:
                    for i, ids in enumerate(batches):
                        yield client.sample(ids, seed=i)

                plain_wall, plain_wait = timed_loop(plain(), args.steps, step)
                stream = client.prefetch(batches, depth=args.depth, seed=0)
                pre_wall, pre_wait = timed_loop(stream, args.steps, step)
                stream.close()
        finally:
            stop_process(server)
            redis_server.stop()

    plain_share, pre_share = plain_wait / plain_wall, pre_wait / pre_wall
    print(f"training step (CPU stand-in): {step_ms:.1f} ms, B = {args.batch}, {args.steps} steps")
    print(f"  without prefetch: {plain_share:.1%} of wall time waiting ({plain_wall:.2f} s)")
    verdict = "met" if pre_share <= WAIT_SHARE_TARGET else "MISSED"
    print(
        f"  prefetch depth {args.depth}: {pre_share:.1%} waiting ({pre_wall:.2f} s), "
        f"target <= {WAIT_SHARE_TARGET:.0%}: {verdict}"
    )
    print(f"  loop wall time, prefetch / plain: {pre_wall / plain_wall:.2f}x")
    print(
        json.dumps(
            {
                "benchmark": "bench_prefetch",
                "step_ms": step_ms,
                "batch": args.batch,
                "items": args.items,
                "wait_share_plain": plain_share,
                "wait_share_prefetch": pre_share,
                "wait_share_target": WAIT_SHARE_TARGET,
                "target_met": pre_share <= WAIT_SHARE_TARGET,
                "wall_ratio_prefetch_vs_plain": pre_wall / plain_wall,
            }
        )
    )


if __name__ == "__main__":
    main()
