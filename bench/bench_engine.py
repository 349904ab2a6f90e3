"""Time the pure engine hot path: ``DiscountEngine.process`` in-process, in-memory store.

This is what a backtest runs and the bulk of what a live worker runs per micro-batch: apply
the batch to the store, replay it for features, score, choose, settle with the ledger, emit.
Events are simulated and parsed up front so only the engine is timed. Prints events/s per run
and writes ``bench/results/engine.json``; it never asserts on the figures.

    .venv/bin/python bench/bench_engine.py [--users 5000] [--events 100000] [--batch 1000]
        [--campaigns default|demo|PATH] [--repeat 3] [--profile]

``--profile`` adds one cProfile pass and prints the top functions by cumulative time.
The machine's load average is recorded with the figures: the dev box is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.analysis.simulation.world import open_loop  # noqa: E402
from engine.campaigns import Campaign, default_campaigns, load_campaigns  # noqa: E402
from engine.events import Event, parse_event  # noqa: E402
from engine.features.store import InMemoryFeatureStore  # noqa: E402
from engine.pipeline import DiscountEngine, Incoming  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "engine.json"


def campaigns_for(spec: str) -> tuple[Campaign, ...]:
    if spec == "default":
        return default_campaigns()
    path = ROOT / "deploy" / "campaigns" / "demo.toml" if spec == "demo" else Path(spec)
    return load_campaigns(path)


async def run_once(
    events: Sequence[Event], batch: int, campaigns: tuple[Campaign, ...]
) -> tuple[float, float, int, int]:
    """One full pass on a fresh engine: (wall seconds, CPU seconds, offers, decisions).

    CPU time is reported next to wall time because the dev machine is shared: other
    processes stretch the wall clock, much less this process's own CPU time."""
    engine = DiscountEngine(InMemoryFeatureStore(), campaigns=campaigns)
    offers = decisions = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(events), batch):
        result = await engine.process([Incoming(e) for e in events[i : i + batch]])
        offers += len(result.offers)
        decisions += len(result.decisions)
    return time.perf_counter() - start, time.process_time() - cpu_start, offers, decisions


def profile_once(events: Sequence[Event], batch: int, campaigns: tuple[Campaign, ...]) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(run_once(events, batch, campaigns))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--campaigns", default="default", help="default, demo or a TOML path")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.users < 1 or args.events < 1 or args.batch < 1 or args.repeat < 1:
        print("bench_engine: --users, --events, --batch and --repeat must be >= 1", file=sys.stderr)
        return 2

    campaigns = campaigns_for(args.campaigns)
    events = [
        parse_event(e) for e in open_loop(users=args.users, events=args.events, seed=args.seed)
    ]
    runs: list[dict[str, Any]] = []
    for attempt in range(args.repeat):
        load = os.getloadavg()[0]
        seconds, cpu, offers, decisions = asyncio.run(run_once(events, args.batch, campaigns))
        rate, cpu_rate = len(events) / seconds, len(events) / cpu
        runs.append(
            {
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu, 3),
                "events_per_s": round(rate),
                "events_per_cpu_s": round(cpu_rate),
                "load_avg_1m": load,
                "decisions": decisions,
                "offers": offers,
            }
        )
        print(
            f"run {attempt + 1}: {rate:,.0f} events/s wall, {cpu_rate:,.0f} per CPU second "
            f"({seconds:.2f} s, {decisions} decisions, {offers} offers, load average {load:.2f})"
        )
    best = max(run["events_per_s"] for run in runs)
    median = statistics.median(run["events_per_s"] for run in runs)
    best_cpu = max(run["events_per_cpu_s"] for run in runs)
    print(f"best {best:,} events/s, median {median:,.0f} events/s, best {best_cpu:,} per CPU s")
    report: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "users": args.users,
        "events": len(events),
        "batch": args.batch,
        "campaigns": [c.name for c in campaigns],
        "runs": runs,
        "best_events_per_s": best,
        "median_events_per_s": median,
        "best_events_per_cpu_s": best_cpu,
    }
    if args.profile:
        text = profile_once(events, args.batch, campaigns)
        print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
