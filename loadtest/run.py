"""Run the locust load test against a private local service and print a summary.

Builds a random codebook artifact (no training; ``--items`` ids from 1000000, an embedding
snapshot of ``--dim``), publishes it to an embedded redis-server in a temporary directory,
starts ``esans serve`` on free 127.0.0.1 ports, runs ``locust --headless`` for a bounded
time, prints throughput, p50/p99 and failures per request type from locust's CSV stats and
the server's own rejection count, then stops everything.

    python loadtest/run.py [--users 4] [--spawn-rate 4] [--duration 30s] [--items 100000]
                           [--max-concurrency N] [--csv-dir DIR]

Exit status: 0 when every request succeeded, 1 when some failed, 2 when the run broke.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
FIRST_ID = 1_000_000
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 20.0
# Locust gets this long beyond --duration (spawning, stopping users, writing the CSVs).
_LOCUST_SLACK_S = 60.0


def clean_env() -> dict[str, str]:
    """This process' environment without ``ESANS_*`` variables (the server refuses unknown
    ones, and a stray ESANS_REDIS_URL must not redirect the test)."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("ESANS_")}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def parse_duration(text: str) -> float:
    """Seconds of a locust ``-t`` value (``30s``, ``2m``, ``1h30m``, ``45``)."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or parts is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 30s or 2m)")
    hours, minutes, seconds = (int(p) if p else 0 for p in parts.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return float(total)


@dataclass(frozen=True)
class Row:
    """One line of locust's ``*_stats.csv``."""

    kind: str
    name: str
    requests: int
    failures: int
    per_second: float
    p50_ms: float
    p99_ms: float
    mean_bytes: float


def read_stats(path: Path) -> list[Row]:
    """The per-request-type rows and the ``Aggregated`` row of a locust stats CSV."""

    def number(row: dict[str, str], key: str) -> float:
        value = row.get(key, "")
        return float(value) if value not in ("", "N/A") else float("nan")

    with path.open(newline="") as handle:
        return [
            Row(
                kind=row["Type"],
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                per_second=number(row, "Requests/s"),
                p50_ms=number(row, "50%"),
                p99_ms=number(row, "99%"),
                mean_bytes=number(row, "Average Content Size"),
            )
            for row in csv.DictReader(handle)
        ]


def read_failures(path: Path) -> list[tuple[str, str, int]]:
    """(name, error, occurrences) of a locust ``*_failures.csv`` (empty if absent)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [(r["Name"], r["Error"], int(r["Occurrences"])) for r in csv.DictReader(handle)]


def print_report(rows: Sequence[Row], failures: Sequence[tuple[str, str, int]]) -> None:
    header = f"{'type':6s} {'name':28s} {'requests':>9s} {'failed':>7s} {'req/s':>8s}"
    print(f"{header} {'p50 ms':>7s} {'p99 ms':>7s} {'bytes/resp':>11s}")
    for r in rows:
        print(
            f"{r.kind:6s} {r.name:28s} {r.requests:9d} {r.failures:7d} {r.per_second:8.1f} "
            f"{r.p50_ms:7.0f} {r.p99_ms:7.0f} {r.mean_bytes:11,.0f}"
        )
    for name, error, count in failures[:10]:
        print(f"failure x{count} {name}: {' '.join(error.split())[:220]}")


def server_counters(http_url: str) -> dict[str, float]:
    """Rejected requests and request counts by status from the server's ``/metrics``."""
    import httpx

    text = httpx.get(f"{http_url}/metrics", timeout=5.0).text
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("esans_rejected_requests_total", "esans_requests_total")):
            key, value = line.rsplit(" ", 1)
            counters[key] = float(value)
    return counters


def run_locust(
    args: argparse.Namespace, grpc_target: str, http_url: str, ids_path: Path, work: Path
) -> tuple[int, Path]:
    """Run locust headless; return its exit status and the CSV prefix."""
    prefix = work / "locust"
    env = clean_env() | {
        "LOADTEST_GRPC": grpc_target,
        "LOADTEST_HTTP": http_url,
        "LOADTEST_IDS": str(ids_path),
        "LOADTEST_BATCH": str(args.batch),
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{int(args.duration)}s",
        "--stop-timeout", "5", "--csv", str(prefix), "--only-summary",
        "--loglevel", "WARNING",
    ]  # fmt: skip
    from esans_service.harness import stop_process

    log = work / "locust.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=args.duration + _LOCUST_SLACK_S)
        except subprocess.TimeoutExpired:
            stop_process(proc, grace_s=10.0)
            raise RuntimeError(f"locust did not finish in time:\n{_tail(log)}") from None
        finally:
            stop_process(proc)
    if not (prefix.parent / "locust_stats.csv").exists():
        raise RuntimeError(f"locust exited with {code} and wrote no stats:\n{_tail(log)}")
    return code, prefix


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--users", type=int, default=4, help="concurrent locust users")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per s")
    parser.add_argument("--duration", type=parse_duration, default=30.0, help="e.g. 30s, 2m")
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size")
    parser.add_argument("--primary", type=int, default=300, help="K_p")
    parser.add_argument("--secondary", type=int, default=15, help="K_s")
    parser.add_argument("--dim", type=int, default=64, help="embedding snapshot d")
    parser.add_argument("--batch", type=int, default=512, help="B per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-concurrency",
        type=int,
        help="the server's ESANS_MAX_CONCURRENCY (default: its own, 2 x cores); more users "
        "than this get RESOURCE_EXHAUSTED / 429",
    )
    parser.add_argument("--csv-dir", type=Path, help="keep locust's CSV files here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from esans_sampler.artifact import artifact_to_files
    from esans_sampler.synthetic import random_artifact
    from esans_service.embedded_redis import EmbeddedRedis
    from esans_service.harness import free_port, serve_process, stop_process, wait_until_serving
    from esans_service.store import CodebookStore

    artifact = random_artifact(
        args.items, args.primary, args.secondary, args.dim, args.seed, FIRST_ID,
        metadata={"loadtest": True},
    )  # fmt: skip
    server: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="esans-loadtest-") as tmp:
        work = Path(tmp)
        redis_server = EmbeddedRedis(work / "redis", appendonly=False)
        try:
            redis_server.start()
            with redis_server.client() as client:
                version = CodebookStore(client).publish(artifact_to_files(artifact))
            ids_path = work / "ids.npy"
            np.save(ids_path, artifact.index.item_ids)
            grpc_port, http_port = free_port(), free_port()
            http_url = f"http://127.0.0.1:{http_port}"
            log_path = work / "serve.log"
            limits = {"max_concurrency": args.max_concurrency} if args.max_concurrency else {}
            server = serve_process(redis_server.url, work, log_path, grpc_port, http_port, **limits)
            load_s = wait_until_serving(server, http_url, version, log_path, _START_TIMEOUT_S)
            print(
                f"codebook {version[:16]}: N={args.items:,} K_p={args.primary} "
                f"K_s={args.secondary} d={args.dim}; server ready in {load_s:.1f} s on "
                f"gRPC 127.0.0.1:{grpc_port}, HTTP {http_url}; {os.cpu_count()} vCPUs shared"
            )
            print(
                f"locust: {args.users} users (gRPC:HTTP 3:1), {args.duration:.0f} s, B="
                f"{args.batch}, m_c=2 m_o=5 m_h=5",
                flush=True,
            )
            code, prefix = run_locust(args, f"127.0.0.1:{grpc_port}", http_url, ids_path, work)
            rows = read_stats(Path(f"{prefix}_stats.csv"))
            failures = read_failures(Path(f"{prefix}_failures.csv"))
            counters = server_counters(http_url)
            if args.csv_dir is not None:
                args.csv_dir.mkdir(parents=True, exist_ok=True)
                for path in work.glob("locust_*.csv"):
                    shutil.copy(path, args.csv_dir / path.name)
        except RuntimeError as exc:
            print(f"load test failed: {exc}", file=sys.stderr)
            return 2
        finally:
            stop_process(server, _STOP_TIMEOUT_S)
            redis_server.stop()
        if server is not None and server.returncode != 0:
            print(f"esans serve exited with {server.returncode}:\n{_tail(log_path)}")
    print_report(rows, failures)
    rejected = sum(v for k, v in counters.items() if k.startswith("esans_rejected"))
    print(f"server: {rejected:.0f} requests rejected (max_concurrency); locust exit {code}")
    total = next((r for r in rows if r.name == "Aggregated"), None)
    return 0 if total is not None and total.failures == 0 and total.requests > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
