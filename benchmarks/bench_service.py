"""End-to-end gRPC service throughput and latency against the issue's targets.

One ``esans serve`` process (a subprocess, gRPC and HTTP on 127.0.0.1) serves a random
1M-item codebook (K_p = 300, K_s = 15, a d = 64 embedding snapshot; no MSAC training)
published to a private redis-server. Clients run on the same machine, each worker with its
own channel (:class:`SamplerClient`). Every figure and every ratio is measured in this run:

* ids only, B = 512, m_c = 2, m_o = 5, m_h = 5, concurrency 4: req/s >= 2,000 and
  p99 <= 5 ms; compared with ``EsansSampler.sample`` on the same artifact in this process;
* with embeddings (EDIS): tensor bytes per second >= 1.2 GB/s; compared with a raw TCP
  socket moving the same bytes per message over loopback (a sink server in a subprocess);
* the same reply bytes from a bare gRPC Python server that does no work (the transport's
  ceiling on this machine, with the same thread pool and message limits);
* Redis commands per warm request = 0: ``INFO commandstats`` before and after the load
  phases, less this benchmark's own INFO call.

    python benchmarks/bench_service.py [--items N] [--concurrency C] [--duration S]
                                       [--clients thread|process]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

IDS_REQ_PER_S_TARGET = 2000.0
SERVER_CPU_MS_TARGET = 0.5  # ids only, B = 512: >= 2,000 req/s per core
IDS_P99_MS_TARGET = 5.0
PAYLOAD_GB_PER_S_TARGET = 1.2
REDIS_COMMANDS_TARGET = 0.0
FIRST_ID = 10**9
_WARMUP_CALLS = 20
_BARRIER_TIMEOUT_S = 120.0
_RAW_HEADER = struct.Struct("<QQ")  # request bytes that follow, reply bytes wanted


# ----------------------------------------------------------------------------- artifact


# ----------------------------------------------------------------------------- load


class _Waiter(Protocol):
    def wait(self, timeout: float | None = None) -> int: ...


@dataclass
class Load:
    """What one or more workers measured (monotonic clock stamps, shared across processes)."""

    latencies_ms: npt.NDArray[np.float64]
    payload_bytes: int
    errors: int
    first_error: str
    start: float
    end: float

    @property
    def requests(self) -> int:
        return int(self.latencies_ms.size)

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-9)

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.requests else float("nan")

    @staticmethod
    def merge(loads: Sequence[Load]) -> Load:
        return Load(
            latencies_ms=np.concatenate([x.latencies_ms for x in loads]),
            payload_bytes=sum(x.payload_bytes for x in loads),
            errors=sum(x.errors for x in loads),
            first_error=next((x.first_error for x in loads if x.first_error), ""),
            start=min(x.start for x in loads),
            end=max(x.end for x in loads),
        )


def _response_bytes(response: Any) -> int:
    """Bytes of every tensor of a :class:`SampleResponse` (ids, codes, log q, embeddings)."""
    total = 0
    for part in (response, response.embeddings):
        if part is None:
            continue
        for value in vars(part).values():
            if isinstance(value, np.ndarray):
                total += value.nbytes
    return total


def timed_calls(
    call: Callable[[int], int],
    duration_s: float,
    max_calls: int,
    barrier: _Waiter,
    counted_errors: tuple[type[BaseException], ...] = (),
) -> Load:
    """Warm-up calls, the barrier, then ``call(i)`` (returning the payload bytes it moved)
    until ``duration_s`` has passed or ``max_calls`` were made. ``counted_errors`` are
    counted, not timed; any other exception ends the worker."""
    latencies = np.empty(max_calls)
    done, errors, payload, first_error = 0, 0, 0, ""
    for i in range(_WARMUP_CALLS):
        call(i)
    barrier.wait(_BARRIER_TIMEOUT_S)
    start = time.monotonic()
    deadline = start + duration_s
    i = 0
    while i < max_calls and time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            moved = call(i)
        except counted_errors as exc:  # e.g. RESOURCE_EXHAUSTED
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
        else:
            latencies[done] = (time.perf_counter() - t0) * 1e3
            payload += moved
            done += 1
        i += 1
    end = time.monotonic()
    return Load(latencies[:done].copy(), payload, errors, first_error, start, end)


def drive_grpc(
    target: str,
    batches: Sequence[npt.NDArray[np.int64]],
    sizes: tuple[int, int, int],
    embeddings: bool,
    duration_s: float,
    max_requests: int,
    barrier: _Waiter,
) -> Load:
    """One worker: its own channel, warm-up calls, the barrier, then timed calls until
    ``duration_s`` has passed or ``max_requests`` were sent."""
    from esans_sampler.client import SamplerClient
    from esans_sampler.errors import EsansError

    m_c, m_o, m_h = sizes
    with SamplerClient(target, timeout_s=10.0, retries=0) as client:

        def call(i: int) -> int:
            batch = batches[i % len(batches)]
            response = client.sample(batch, m_c=m_c, m_o=m_o, m_h=m_h, return_embeddings=embeddings)
            return _response_bytes(response)

        return timed_calls(call, duration_s, max_requests, barrier, (EsansError,))


def _process_worker(queue: Any, barrier: Any, *args: Any) -> None:
    try:
        queue.put(drive_grpc(*args, barrier=barrier))
    except BaseException as exc:
        barrier.abort()
        queue.put(f"{type(exc).__name__}: {exc}")


def run_load(
    worker: Callable[[_Waiter], Load], concurrency: int, mode: str, process_args: tuple[Any, ...]
) -> Load:
    """``concurrency`` workers started together (threads here, or spawned processes)."""
    if mode == "thread":
        barrier = threading.Barrier(concurrency)
        results: list[Load | BaseException] = []

        def run() -> None:
            try:
                results.append(worker(barrier))
            except BaseException as exc:
                barrier.abort()
                results.append(exc)

        threads = [threading.Thread(target=run, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"a load worker failed: {failed[0]!r}") from failed[0]
        return Load.merge([r for r in results if isinstance(r, Load)])

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    pbarrier = ctx.Barrier(concurrency)
    procs = [
        ctx.Process(target=_process_worker, args=(queue, pbarrier, *process_args), daemon=True)
        for _ in range(concurrency)
    ]
    try:
        for p in procs:
            p.start()
        got = [queue.get(timeout=_BARRIER_TIMEOUT_S + 60.0) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join()
    failed_msgs = [g for g in got if isinstance(g, str)]
    if failed_msgs:
        raise RuntimeError(f"a load worker failed: {failed_msgs[0]}")
    return Load.merge(got)


# ----------------------------------------------------------------------------- raw socket


def raw_sink_main() -> None:
    """The raw-socket baseline server: per connection, read a header and the request
    bytes, answer the asked number of bytes. Exits when its stdin closes."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    zeros = memoryview(bytearray(1))
    lock = threading.Lock()

    def reply_buffer(size: int) -> memoryview:
        nonlocal zeros
        with lock:
            if len(zeros) < size:
                zeros = memoryview(bytearray(size))
            return zeros[:size]

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = bytearray(_RAW_HEADER.size)
        scratch = bytearray(1 << 16)
        with conn:
            while _recv_exactly(conn, memoryview(header)):
                request_len, reply_len = _RAW_HEADER.unpack(header)
                while request_len:
                    n = conn.recv_into(scratch, min(request_len, len(scratch)))
                    if n == 0:
                        return
                    request_len -= n
                conn.sendall(reply_buffer(reply_len))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    listener.close()


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def drive_raw(
    port: int,
    request_bytes: int,
    reply_bytes: int,
    duration_s: float,
    max_messages: int,
    barrier: _Waiter,
) -> Load:
    """One raw-socket worker: send a request of ``request_bytes``, read ``reply_bytes``."""
    message = _RAW_HEADER.pack(request_bytes, reply_bytes) + bytes(request_bytes)
    reply = memoryview(bytearray(reply_bytes))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def call(i: int) -> int:
            conn.sendall(message)
            if not _recv_exactly(conn, reply):
                raise ConnectionError("the raw sink closed the connection")
            return reply_bytes

        return timed_calls(call, duration_s, max_messages, barrier)


# ----------------------------------------------------------------------------- bare gRPC


def grpc_sink_main(reply_bytes: int) -> None:
    """The bare-gRPC baseline server: one unary method answering ``reply_bytes`` prebuilt
    bytes, on the service's kind of server (``grpc.aio``, one event loop) with its message
    limits and no sampling. Prints its port; exits when its stdin closes."""
    import asyncio

    import grpc

    reply = bytes(reply_bytes)

    async def answer(request: bytes, context: Any) -> bytes:
        return reply

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 30)])
        handler = grpc.unary_unary_rpc_method_handler(answer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Sink", {"Reply": handler}),)
        )
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(0)

    asyncio.run(serve())


def drive_grpc_sink(
    port: int, request: bytes, duration_s: float, max_messages: int, barrier: _Waiter
) -> Load:
    """One worker of the bare-gRPC baseline: its own channel, raw bytes both ways."""
    import grpc

    options = [("grpc.max_receive_message_length", 1 << 30)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        reply = channel.unary_unary("/bench.Sink/Reply")

        def call(i: int) -> int:
            return len(reply(request, timeout=60))

        return timed_calls(call, duration_s, max_messages, barrier)


def bare_grpc_phase(
    reply_bytes: int, request: bytes, args: argparse.Namespace
) -> tuple[Load, float]:
    """The bare-gRPC server answering ``reply_bytes`` under the benchmark's load: the load,
    and the server's CPU milliseconds per call (warm-up calls included)."""
    sink, port = _start_sink("--grpc-sink", str(reply_bytes))
    try:
        cpu_start = _process_cpu_s(sink.pid)
        load = run_load(
            lambda barrier: drive_grpc_sink(
                port, request, args.raw_duration, args.max_requests, barrier
            ),
            args.concurrency,
            "thread",
            (),
        )
        calls = load.requests + args.concurrency * _WARMUP_CALLS
        return load, 1000 * (_process_cpu_s(sink.pid) - cpu_start) / calls
    finally:
        _stop_sink(sink)


def _start_sink(*flags: str) -> tuple[subprocess.Popen[str], int]:
    sink = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *flags],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if sink.stdout is None:
        raise RuntimeError("the sink has no stdout")
    return sink, int(sink.stdout.readline())


def _stop_sink(sink: subprocess.Popen[str] | None) -> None:
    from esans_service.harness import stop_process

    if sink is not None:
        if sink.stdin is not None:
            sink.stdin.close()
        stop_process(sink, grace_s=5.0)


def _command_calls(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in stats.items()
        if isinstance(value, dict)
    }


# ----------------------------------------------------------------------------- in-process


def time_calls(call: Callable[[int], object], repeats: int, warmup: int) -> npt.NDArray[np.float64]:
    for i in range(warmup):
        call(i)
    ms = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        call(i)
        ms[i] = (time.perf_counter() - t0) * 1e3
    return ms


# ----------------------------------------------------------------------------- main


def _status(ok: bool) -> str:
    return "PASS" if ok else "MISSED"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--primary", type=int, default=300, help="K_p")
    parser.add_argument("--secondary", type=int, default=15, help="K_s")
    parser.add_argument("--snapshot-dim", type=int, default=64, help="embedding snapshot d")
    parser.add_argument("--batch", type=int, default=512, help="B")
    parser.add_argument("--m-c", type=int, default=2)
    parser.add_argument("--m-o", type=int, default=5)
    parser.add_argument("--m-h", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4, help="client workers")
    parser.add_argument(
        "--clients",
        choices=("thread", "process"),
        default="thread",
        help="workers as threads of this process (default: leaves the server more of a small "
        "machine) or as spawned processes",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="s per ids-only phase")
    parser.add_argument("--emb-duration", type=float, default=8.0, help="s, embeddings phase")
    parser.add_argument("--raw-duration", type=float, default=4.0, help="s, raw socket phase")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per worker, per phase")
    parser.add_argument("--sampler-repeats", type=int, default=2000, help="in-process calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the replica")
    parser.add_argument("--raw-sink", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-sink", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.raw_sink:
        raw_sink_main()
        return
    if args.grpc_sink:
        grpc_sink_main(args.grpc_sink)
        return

    from esans_sampler.artifact import artifact_to_files
    from esans_sampler.contract._proto.esans.v1 import sampler_pb2
    from esans_sampler.edis import edis_from_rows, gather_rows
    from esans_sampler.synthetic import random_artifact
    from esans_service.embedded_redis import EmbeddedRedis
    from esans_service.harness import free_port, serve_process, stop_process, wait_until_serving
    from esans_service.loaded_codebook import load_codebook
    from esans_service.store import CodebookStore

    wall = time.monotonic()
    sizes = (args.m_c, args.m_o, args.m_h)
    t0 = time.monotonic()
    artifact = random_artifact(
        args.items, args.primary, args.secondary, args.snapshot_dim, args.seed, FIRST_ID,
        metadata={"benchmark": "bench_service"},
    )  # fmt: skip
    rng = np.random.default_rng(args.seed + 1)
    batches = [rng.choice(artifact.index.item_ids, args.batch) for _ in range(64)]
    build_s = time.monotonic() - t0

    # In-process baselines on the same artifact (the server builds the same sampler).
    sampler = load_codebook(artifact).esans
    table = artifact.embeddings
    draw = np.random.default_rng(args.seed + 2)
    in_process = time_calls(
        lambda i: sampler.sample(batches[i % 64], draw, *sizes), args.sampler_repeats, warmup=50
    )

    def sample_with_edis(i: int) -> None:
        s = sampler.sample(batches[i % 64], draw, *sizes)
        edis_from_rows(table, s.positive_rows, s.simple_rows, s.hard_rows, 0.6, 0.1)
        for rows in (s.positive_rows, s.simple_rows, s.hard_rows):
            gather_rows(table, rows)

    in_process_edis = time_calls(sample_with_edis, max(args.sampler_repeats // 10, 20), warmup=5)

    server: subprocess.Popen[bytes] | None = None
    sink: subprocess.Popen[str] | None = None
    with tempfile.TemporaryDirectory(prefix="esans-bench-") as tmp:
        work = Path(tmp)
        log_path = work / "serve.log"
        redis_server = EmbeddedRedis(work / "redis", appendonly=False)
        try:
            redis_server.start()
            rclient = redis_server.client(decode_responses=False)
            t0 = time.monotonic()
            files = artifact_to_files(artifact)
            version = CodebookStore(rclient).publish(files, activate=True)
            del files
            publish_s = time.monotonic() - t0

            grpc_port, http_port = free_port(), free_port()
            target = f"127.0.0.1:{grpc_port}"
            # No fallback poll (every 5 s by default, on top of pub/sub): it would add a few
            # GETs per minute to the Redis count; the hot path is what is measured here.
            server = serve_process(
                redis_server.url, work, log_path, grpc_port, http_port,
                poll_interval_s=3600, shutdown_grace_s=2, workers=args.workers,
            )  # fmt: skip
            load_s = wait_until_serving(server, f"http://127.0.0.1:{http_port}", version, log_path)

            def grpc_phase(embeddings: bool, duration: float) -> Load:
                wargs = (target, batches, sizes, embeddings, duration, args.max_requests)
                return run_load(
                    lambda barrier: drive_grpc(*wargs, barrier=barrier),
                    args.concurrency,
                    args.clients,
                    wargs,
                )

            # Warm: every worker makes _WARMUP_CALLS calls before its timed phase starts.
            before = _command_calls(rclient)
            cpu_start = _process_cpu_s(server.pid)
            ids_only = grpc_phase(False, args.duration)
            cpu_ids = _process_cpu_s(server.pid) - cpu_start
            with_emb = grpc_phase(True, args.emb_duration)
            cpu_emb = _process_cpu_s(server.pid) - cpu_start - cpu_ids
            after = _command_calls(rclient)
            server_rss_mb = _rss_mb(server.pid)
            server_pss_mb = _rss_mb(server.pid, field="Pss:", source="smaps_rollup")
            redis_mb = int(rclient.info("memory")["used_memory"]) / 2**20
            # Server CPU per request: every call the phase made, its warm-up calls included.
            warmup = args.concurrency * _WARMUP_CALLS
            cpu_ms_ids = 1000 * cpu_ids / max(ids_only.requests + ids_only.errors + warmup, 1)
            cpu_ms_emb = 1000 * cpu_emb / max(with_emb.requests + with_emb.errors + warmup, 1)
            own_info_calls = 1  # the "before" INFO; the "after" one counts itself afterwards
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            delta["info"] = delta.get("info", 0) - own_info_calls
            delta = {k: v for k, v in delta.items() if v}
            # redis-py PINGs the registry's pub/sub connection every 30 s (health check):
            # time-driven, not per request, so it is shown but not counted.
            per_request_commands = sum(v for k, v in delta.items() if k != "ping")
            warm_requests = ids_only.requests + with_emb.requests + ids_only.errors
            warm_requests += with_emb.errors + 2 * args.concurrency * _WARMUP_CALLS
            redis_per_request = per_request_commands / max(warm_requests, 1)
            stop_process(server)
            server = None

            # Raw socket: the same reply bytes per message, the same request size.
            reply_bytes = with_emb.payload_bytes // max(with_emb.requests, 1)
            request = sampler_pb2.SampleNegativesRequest(positive_ids=batches[0].tolist())
            request_bytes = request.ByteSize()
            sink, sink_port = _start_sink("--raw-sink")
            raw = run_load(
                lambda barrier: drive_raw(
                    sink_port,
                    request_bytes,
                    reply_bytes,
                    args.raw_duration,
                    args.max_requests,
                    barrier,
                ),
                args.concurrency,
                "thread",
                (),
            )
            _stop_sink(sink)
            sink = None
            # Bare gRPC: the same reply bytes from a server that does nothing else; then an
            # ids-only reply, for the transport's own CPU per call.
            request_body = request.SerializeToString()
            bare, _ = bare_grpc_phase(reply_bytes, request_body, args)
            ids_reply_bytes = ids_only.payload_bytes // max(ids_only.requests, 1)
            _, floor_cpu_ms = bare_grpc_phase(ids_reply_bytes, request_body, args)
        finally:
            stop_process(server)
            _stop_sink(sink)
            redis_server.stop()

    # ------------------------------------------------------------------------- report
    sampler_ms = float(np.median(in_process))
    edis_ms = float(np.median(in_process_edis))
    p50, p99 = ids_only.percentile_ms(50), ids_only.percentile_ms(99)
    gbps = with_emb.payload_bytes / with_emb.seconds / 1e9
    raw_gbps = raw.payload_bytes / raw.seconds / 1e9
    bare_gbps = bare.payload_bytes / bare.seconds / 1e9
    cpus = os.cpu_count() or 1
    print(
        f"catalogue N={args.items:,} K_p={args.primary} K_s={args.secondary} snapshot d="
        f"{args.snapshot_dim}; B={args.batch} m_c={args.m_c} m_o={args.m_o} m_h={args.m_h}; "
        f"concurrency {args.concurrency} ({args.clients} workers, one channel each)"
    )
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}; "
        f"client, server and Redis share this {cpus}-vCPU machine (127.0.0.1)"
    )
    print(
        f"setup: build {build_s:.1f} s, publish {publish_s:.1f} s, server load "
        f"{load_s:.1f} s; codebook {version[:16]}; server RSS {server_rss_mb:,.0f} MB (PSS "
        f"{server_pss_mb:,.0f} MB) after the load phases, Redis used memory {redis_mb:,.0f} MB"
    )
    print(
        f"in-process EsansSampler.sample: median {sampler_ms:.3f} ms, p99 "
        f"{np.percentile(in_process, 99):.3f} ms ({in_process.size} calls); with EDIS + "
        f"gathers: median {edis_ms:.3f} ms"
    )
    phases = (("ids only", ids_only), ("embeddings", with_emb), ("raw socket", raw))
    for name, load in (*phases, ("bare gRPC", bare)):
        print(
            f"{name:11s} {load.requests:7d} ok {load.errors:5d} errors in {load.seconds:5.1f} s: "
            f"{load.per_second:8.0f} /s, p50 {load.percentile_ms(50):7.3f} ms, p99 "
            f"{load.percentile_ms(99):7.3f} ms, {load.payload_bytes / max(load.requests, 1):,.0f}"
            " B/response"
        )
        if load.first_error:
            print(f"            first error: {load.first_error}")
    if delta:
        print(f"Redis commands during the load phases (own INFO removed): {delta}")
    print()
    rows = [
        ("ids only req/s", f"{ids_only.per_second:,.0f}", f">= {IDS_REQ_PER_S_TARGET:,.0f}",
         _status(ids_only.per_second >= IDS_REQ_PER_S_TARGET)),
        ("ids only p50 / p99 ms", f"{p50:.2f} / {p99:.2f}", f"p99 <= {IDS_P99_MS_TARGET:g}",
         _status(p99 <= IDS_P99_MS_TARGET)),
        ("in-process sampler ms", f"{sampler_ms:.3f}", "", ""),
        ("RPC p50 / in-process", f"{p50 / sampler_ms:.1f}x", "", ""),
        ("embeddings GB/s", f"{gbps:.3f}", f">= {PAYLOAD_GB_PER_S_TARGET:g}",
         _status(gbps >= PAYLOAD_GB_PER_S_TARGET)),
        ("raw socket GB/s", f"{raw_gbps:.3f}", "", ""),
        ("gRPC / raw socket", f"{gbps / raw_gbps:.2f}", "", ""),
        ("bare gRPC GB/s", f"{bare_gbps:.3f}", "", ""),
        ("service / bare gRPC", f"{gbps / bare_gbps:.2f}", "", ""),
        ("Redis cmds / warm req", f"{redis_per_request:.4f}", "= 0",
         _status(redis_per_request <= REDIS_COMMANDS_TARGET)),
    ]  # fmt: skip
    rows += [
        ("server CPU ms / request", f"{cpu_ms_ids:.3f}", f"<= {SERVER_CPU_MS_TARGET:g}",
         _status(cpu_ms_ids <= SERVER_CPU_MS_TARGET)),
        ("  with embeddings", f"{cpu_ms_emb:.3f}", "", ""),
        ("  bare gRPC, ids reply", f"{floor_cpu_ms:.3f}", "", ""),
    ]  # fmt: skip
    print(f"{'metric':24s} {'measured':>16s} {'target':>12s}  status")
    for metric, value, goal, status in rows:
        print(f"{metric:24s} {value:>16s} {goal:>12s}  {status}")
    print(f"total {time.monotonic() - wall:.0f} s")
    print(
        json.dumps(
            {
                "benchmark": "service",
                "workers": args.workers,
                "server_cpu_ms_per_request": cpu_ms_ids,
                "server_cpu_ms_per_request_embeddings": cpu_ms_emb,
                "server_cpu_ms_per_request_target": SERVER_CPU_MS_TARGET,
                "bare_grpc_cpu_ms_per_request": floor_cpu_ms,
                "ids_req_per_s": ids_only.per_second,
                "ids_p50_ms": p50,
                "ids_p99_ms": p99,
                "in_process_sampler_ms": sampler_ms,
                "embeddings_gb_per_s": gbps,
                "bare_grpc_gb_per_s": bare_gbps,
                "raw_socket_gb_per_s": raw_gbps,
                "embeddings_vs_bare_grpc": gbps / bare_gbps,
                "embeddings_vs_bare_grpc_target": 0.8,
                "redis_commands_per_warm_request": redis_per_request,
                "batch": args.batch,
                "concurrency": args.concurrency,
                "items": args.items,
                "publish_s": publish_s,
                "replica_load_s": load_s,
                "server_rss_mb": server_rss_mb,
                "server_pss_mb": server_pss_mb,
                "redis_used_memory_mb": redis_mb,
            }
        )
    )


def _rss_mb(pid: int, field: str = "VmRSS:", source: str = "status") -> float:
    """Resident memory of process ``pid`` and its live children, summed (Linux). RSS counts
    pages shared by the workers (the mapped snapshot) once per worker; PSS (``Pss:`` of
    ``smaps_rollup``) splits them."""
    total = 0.0
    for process in (pid, *_children(pid)):
        try:
            lines = Path(f"/proc/{process}/{source}").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) / 1024 for line in lines if line.startswith(field))
    return total


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` and its live children (the worker
    processes of a multi-worker replica), all threads included (Linux)."""
    ticks = 0
    for child in (pid, *_children(pid)):
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            found.append(int(stat.parent.name))
    return found


if __name__ == "__main__":
    main()
