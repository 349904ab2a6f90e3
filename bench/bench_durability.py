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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

# `python bench/x.py` puts bench/ on the path, not the repository that holds the bench package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e.common import CAMPAIGNS, load_average
from bench.e2e.inprocess import NullSink, simulated_records
from bench.private_redis import private_redis
from streams.adapters.decode import DecodeLimits
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


async def server_cpu(client: aioredis.Redis) -> tuple[float, float]:
    """(all threads, main thread) CPU seconds of the server."""
    info = await client.info("cpu")
    total = float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    main = float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])
    return total, main


async def one_pass(url: str, events: int, users: int, batch: int) -> dict[str, float]:
    settings = Settings.from_env(
        {
            "DEALSTREAM_REDIS_URL": url,
            "DEALSTREAM_CAMPAIGNS": str(CAMPAIGNS),
            "DEALSTREAM_PSEUDONYM_KEY": "bench-pseudonym-key-0123456789abcdef",
        }
    )
    runtime = bootstrap(settings)
    feed = simulated_records(events, users, settings.topics)
    worker = BatchWorker(
        runtime.engine,
        NullSink(),
        topics=settings.topics,
        limits=DecodeLimits(),
        pseudonyms=runtime.pseudonyms,
    )
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
            with private_redis([str(CONF), *MODES[mode]], parent=args.dir) as url:
                if url is None:
                    raise SystemExit("redis-server is not on PATH")
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
