"""What Redis durability costs on the worker's write path: AOF off, ``everysec``, ``always``.

Runs the worker's batch step in this process (``BatchWorker.handle``: the feature commit and
the ledger script per batch, as ``bench/e2e/inprocess.py``) on simulated events against a
private ``redis-server`` started from ``deploy/redis/redis.conf`` in a temporary directory,
once per mode and run, the modes interleaved so that a busy machine weighs on each alike:

- ``off``: ``--appendonly no`` (memory only, as the local services ran before);
- ``everysec``: the shipped config (AOF, fsync once a second by a background thread);
- ``always``: AOF with an fsync before every reply.

Figures per event, medians over ``--runs``: the bench's own CPU (``getrusage``), the Redis
server's CPU (``INFO cpu``: all its threads, and the main thread alone), AOF bytes written;
per batch, the wall-clock latency of ``handle`` (p50, p99), which is where ``always`` costs
(an fsync is waiting, not CPU). Wall figures move with the machine's load (printed). Prints a
table and writes ``bench/results/durability.json``; it never asserts.

    .venv/bin/python bench/bench_durability.py [--events 60000] [--users 5000] [--runs 3]
        [--dir DIR]   # where the temporary Redis directories go (the disk being measured)

Never touches the shared Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from bench.e2e.common import CAMPAIGNS, load_average
from bench.e2e.inprocess import NullSink
from engine.analysis.simulation.world import open_loop
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.settings import Settings
from streams.worker.batch_worker import BatchWorker
from streams.worker.faust_app import bootstrap

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "deploy" / "redis" / "redis.conf"
RESULTS = REPO / "bench" / "results" / "durability.json"
MODES: dict[str, list[str]] = {
    "off": ["--appendonly", "no"],
    "everysec": [],
    "always": ["--appendfsync", "always"],
}


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def private_redis(mode: str, parent: Path | None) -> Iterator[str]:
    """``redis-server deploy/redis/redis.conf`` with ``mode``'s overrides, on a free port, in a
    temporary directory (removed after)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-durability-", dir=parent) as workdir:
        argv = [binary, str(CONF), "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--dir", workdir, "--daemonize", "no", *MODES[mode]]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port, socket_timeout=1)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def records(events: int, users: int, topics: Any) -> list[RawRecord]:
    by_kind = {"browse": topics.browse, "search": topics.search, "purchase": topics.purchase}
    start_ms = int(time.time() * 1000) - events - 5_000
    out = []
    for offset, event in enumerate(
        open_loop(users=users, events=events, seed=11, start_ms=start_ms, mean_gap_ms=1.0)
    ):
        user = str(event["user_id"])
        topic = by_kind[str(event["type"])]
        out.append(RawRecord(topic, 0, offset, user.encode(), orjson.dumps(event)))
    return out


async def server_cpu(client: aioredis.Redis) -> tuple[float, float]:
    """(all threads, main thread) CPU seconds of the server."""
    info = await client.info("cpu")
    total = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    main = float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return total, main


async def one_pass(url: str, events: int, users: int, batch: int) -> dict[str, float]:
    settings = Settings.from_env(
        {"DEALSTREAM_REDIS_URL": url, "DEALSTREAM_CAMPAIGNS": str(CAMPAIGNS)}
    )
    runtime = bootstrap(settings)
    feed = records(events, users, settings.topics)
    worker = BatchWorker(runtime.engine, NullSink(), topics=settings.topics, limits=DecodeLimits())
    client = runtime.redis
    latencies: list[float] = []
    try:
        total0, main0 = await server_cpu(client)
        wall, cpu = time.perf_counter(), cpu_s()
        for start in range(0, len(feed), batch):
            t0 = time.perf_counter()
            await worker.handle(feed[start : start + batch])
            latencies.append(time.perf_counter() - t0)
        wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
        total1, main1 = await server_cpu(client)
        persistence = await client.info("persistence")
    finally:
        await client.aclose()
    latencies.sort()
    n = len(feed)
    return {
        "events_per_s": n / wall,
        "client_cpu_us_per_event": 1e6 * cpu / n,
        "redis_cpu_us_per_event": 1e6 * (total1 - total0) / n,
        "redis_main_thread_cpu_us_per_event": 1e6 * (main1 - main0) / n,
        "aof_bytes_per_event": float(persistence.get("aof_current_size", 0)) / n,
        "batch_p50_ms": 1000 * latencies[len(latencies) // 2],
        "batch_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
    loads: list[float] = [load_average()]
    for run in range(args.runs):
        for mode in args.modes:
            with private_redis(mode, args.dir) as url:
                figures = await one_pass(url, args.events, args.users, args.batch)
            results[mode].append(figures)
            loads.append(load_average())
            print(
                f"run {run + 1} {mode:>8}: "
                + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items())
            )
    disk = subprocess.run(
        ["df", "-T", str(args.dir or tempfile.gettempdir())], capture_output=True, text=True
    ).stdout.splitlines()[-1]
    return {
        "events": args.events,
        "users": args.users,
        "batch": args.batch,
        "runs": args.runs,
        "load_average": {"min": min(loads), "max": max(loads)},
        "disk": disk,
        "redis_server": subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "cpus": os.cpu_count(),
        "medians": {mode: medians(runs) for mode, runs in results.items()},
        "runs_by_mode": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = asyncio.run(bench(args))
    print(f"\nmedians of {args.runs} runs, {args.events:,} events, load {report['load_average']}")
    print(f"disk: {report['disk']}")
    keys = list(next(iter(report["medians"].values())))
    print(f"{'mode':>9} " + " ".join(f"{k[:24]:>24}" for k in keys))
    for mode, figures in report["medians"].items():
        print(f"{mode:>9} " + " ".join(f"{figures[k]:>24,.1f}" for k in keys))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
