"""End-to-end benchmark of the worker on real Kafka and Redis: throughput, latency, scaling, memory.

    .venv/bin/python bench/bench_e2e.py            # full: 1,000,000 events, 3 runs per figure
    .venv/bin/python bench/bench_e2e.py --quick    # smoke: small N, one run, low rates

Steps (bench/e2e/*): preload N simulated events into 4-partition topics; time a raw aiokafka
consume + decode of them; time the worker's batch step in-process (no Faust, no Kafka: the
difference to the worker's CPU per event is what Faust and Kafka cost); let one worker process
drain them (each run with a fresh group and Redis prefix; events/s, RSS after warm-up and at
the end, Redis main-thread CPU per event, Redis bytes per active user); let two workers in one
group drain them; then measure decision latency at fixed offered rates on fresh topics. Every
figure is the median of the runs, each recorded with the load average next to it. Prints a
summary and writes ``bench/results/e2e.json``; asserts nothing about speed. All topics and keys
carry the prefix ``bench.<pid>.`` / ``bench:<pid>:`` and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e.common import (
    Names,
    clean_up,
    create_topics,
    load_average,
    machine,
    median,
)
from bench.e2e.drain import DrainConfig, drain_run, memory_summary, run_names, summarise
from bench.e2e.inprocess import measure_inprocess
from bench.e2e.latency import measure_latency
from bench.e2e.preload import DEFAULT_GAP_MS, preload, raw_consume
from streams.operations.allocator import fix_mmap_threshold
from streams.operations.garbage_collector import tune_garbage_collector
from streams.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.json"
PARTITIONS = 4


def _say(message: str) -> None:
    print(f"[e2e {dt.datetime.now():%H:%M:%S} load {load_average():.2f}] {message}", flush=True)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="dealstream-bench-"))
    worker_env = {"DEALSTREAM_PARTITIONS": str(PARTITIONS), **dict(args.env)}
    base = Names.make("drain")
    lat_names = Names.make("lat")
    report: dict[str, Any] = {
        "benchmark": "e2e",
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": await machine(args.redis_url),
        "config": {
            "events": args.events,
            "timed_events": args.timed_events,
            "users": args.users,
            "runs": args.runs,
            "partitions": PARTITIONS,
            "gap_ms": args.gap_ms,
            "worker_env": worker_env,
            "campaigns": "bench/e2e/campaigns.toml",
            "rates": args.rates,
            "worker_logs": str(log_dir),
            "topic_prefixes": [base.topic_prefix, lat_names.topic_prefix],
            "redis_prefixes": [base.redis_prefix, lat_names.redis_prefix],
        },
    }
    try:
        await create_topics(args.bootstrap, base, PARTITIONS)
        _say(f"preloading {args.events:,} events for {args.users:,} users")
        loaded = await preload(
            args.bootstrap,
            base.topics,
            events=args.events,
            users=args.users,
            seed=args.seed,
            gap_ms=args.gap_ms,
        )
        _say(f"preloaded in {loaded.seconds:.1f} s; {loaded.users_active:,} active users")
        report["preload"] = {
            "events": loaded.events,
            "users_active": loaded.users_active,
            "by_type": loaded.by_type,
            "events_per_s": round(loaded.events / loaded.seconds),
        }
        raw = []
        for run in range(args.runs):
            rate = await raw_consume(
                args.bootstrap,
                base.topics,
                events=args.events,
                group_id=f"{base.group_id}-raw{run}",
            )
            raw.append({"events_per_s": round(rate), "load_average": load_average()})
            _say(f"raw consume + decode run {run + 1}: {rate:,.0f} events/s")
        config = DrainConfig(
            bootstrap=args.bootstrap,
            redis_url=args.redis_url,
            events=args.events,
            users_active=loaded.users_active,
            log_dir=log_dir,
            worker_env=worker_env,
            profile=args.py_spy,
            profile_s=args.py_spy_s,
        )
        one = []
        for run in range(args.runs):
            # The first run drains everything (RSS and Redis memory after all events).
            target = args.events if run == 0 else args.timed_events
            result = await drain_run(
                config, run_names(base, f"w1r{run}"), target=target, timed=args.timed_events
            )
            config = dataclasses.replace(config, profile=None)
            one.append(result)
            _say(
                f"1 worker run {run + 1}: {result['events_per_s']:,} events/s "
                f"(steady {result['steady_events_per_s']:,}), {result['events']:,} consumed, "
                f"RSS growth {result.get('rss_growth_pct')} %, "
                f"Redis CPU {result.get('redis_cpu_us_per_event')} us per event"
            )
            for generation, pauses in result.get("gc_pauses_first_worker", {}).items():
                _say(
                    f"  collector generation {generation}: {pauses['collections']:.0f} "
                    f"collections, mean {pauses['mean_ms']} ms, {pauses['over_25ms']:.0f} of "
                    f"25 ms or more, {pauses['us_per_event']} us per event"
                )
        inproc = []
        for run in range(args.runs):
            inproc.append(
                await measure_inprocess(
                    redis_url=args.redis_url,
                    names=Names(base.topic_prefix, f"{base.redis_prefix}ip{run}:", "unused"),
                    events=min(args.timed_events, 100_000),
                    users=args.users,
                    batch=int(worker_env.get("DEALSTREAM_BATCH_MAX", "500")),
                    gap_ms=args.gap_ms,
                )
            )
            _say(
                f"batch step in-process run {run + 1}: {inproc[-1]['events_per_s']:,} events/s, "
                f"{inproc[-1]['cpu_us_per_event']} us CPU per event"
            )
        report["batch_step_inprocess"] = {
            "events_per_s": median(r["events_per_s"] for r in inproc),
            "cpu_us_per_event": median(r["cpu_us_per_event"] for r in inproc),
            "runs": inproc,
        }
        two = []
        for run in range(args.scaling_runs):
            result = await drain_run(
                config,
                run_names(base, f"w2r{run}"),
                target=args.timed_events,
                timed=args.timed_events,
                workers=2,
            )
            two.append(result)
            _say(
                f"2 workers run {run + 1}: {result['events_per_s']:,} events/s "
                f"(steady {result['steady_events_per_s']:,})"
            )
        single = summarise(one)
        raw_rate = median(r["events_per_s"] for r in raw)
        report["raw_consume"] = {"events_per_s": raw_rate, "runs": raw}
        report["one_worker"] = {
            **single,
            "ratio_to_raw_consume": round(single["events_per_s"] / raw_rate, 3),
            "runs_detail": one,
        }
        report["memory"] = memory_summary(one[0])
        _say(
            f"after {one[0]['events']:,} events: RSS growth {one[0]['rss_growth_pct'][0]} % "
            f"from 10,000 events, {report['memory']['rss_growth_from_100k_pct']} % from 100,000; "
            f"Redis {one[0]['redis']['bytes_per_user']} B per active user"
        )
        if two:
            double = summarise(two)
            report["two_workers"] = {
                **double,
                "scaling_ratio_steady": round(
                    double["steady_events_per_s"] / single["steady_events_per_s"], 2
                ),
                "scaling_ratio_first_to_last": round(
                    double["events_per_s"] / single["events_per_s"], 2
                ),
                "runs_detail": two,
            }
        rates = [float(r) for r in args.rates]
        if args.max_fraction:
            rates.append(round(args.max_fraction * single["events_per_s"], -2))
        if rates:
            await create_topics(args.bootstrap, lat_names, PARTITIONS)
            _say(f"latency at offered rates {', '.join(f'{r:,.0f}' for r in rates)} events/s")
            report["latency"] = await measure_latency(
                bootstrap=args.bootstrap,
                redis_url=args.redis_url,
                names=lat_names,
                log_dir=log_dir,
                worker_env=worker_env,
                rates=rates,
                runs=args.runs,
                warmup_s=args.warmup_s,
                window_s=args.window_s,
                users=args.users,
            )
            for rate, figures in report["latency"].items():
                _say(
                    f"latency at {int(rate):,}/s: p50 {figures['p50_ms']:.0f} ms, "
                    f"p95 {figures['p95_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms"
                )
    finally:
        if not args.keep:
            await clean_up(args.bootstrap, args.redis_url, [base, lat_names])
    report["load_average_at_end"] = load_average()
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small N, one run: a smoke run")
    parser.add_argument("--events", type=int, help="events to preload (default 1,000,000)")
    parser.add_argument(
        "--timed-events",
        type=int,
        help="events each throughput run is timed over (default 500,000; the first run "
        "drains every preloaded event for the memory figures)",
    )
    parser.add_argument("--users", type=int, help="simulated users (default events / 10)")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3)")
    parser.add_argument("--scaling-runs", type=int, help="two-worker runs (default --runs)")
    parser.add_argument("--rates", type=int, nargs="*", help="offered rates (default 1000 5000)")
    parser.add_argument(
        "--max-fraction",
        type=float,
        default=0.8,
        help="also offer this fraction of the measured one-worker maximum (0: skip)",
    )
    parser.add_argument("--warmup-s", type=float, help="latency warm-up discarded per phase")
    parser.add_argument("--window-s", type=float, help="latency window measured per phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=DEFAULT_GAP_MS,
        help="mean event-time gap of the preloaded events (default 1: 1,000,000 events span 17 "
        "minutes and no label falls due; 10 spans about 3 hours, past the hour's wait)",
    )
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        metavar="NAME=VALUE",
        help="extra worker setting, e.g. DEALSTREAM_BATCH_MAX=1000 (repeatable)",
    )
    parser.add_argument(
        "--py-spy", type=Path, help="write a py-spy profile (collapsed stacks) of the first run"
    )
    parser.add_argument("--py-spy-s", type=int, default=20, help="seconds to profile")
    parser.add_argument("--keep", action="store_true", help="keep topics and keys (debugging)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "events": 20_000 if quick else 1_000_000,
        "runs": 1 if quick else 3,
        "rates": [200, 1000] if quick else [1000, 5000],
        "warmup_s": 1.0 if quick else 3.0,
        "window_s": 3.0 if quick else 10.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.timed_events is None:
        args.timed_events = min(args.events, 20_000 if quick else 500_000)
    if args.users is None:
        args.users = max(100, args.events // 10)
    if args.scaling_runs is None:
        args.scaling_runs = args.runs
    if quick and args.max_fraction == 0.8:
        args.max_fraction = 0.0
    bad = [e for e in args.env if len(e) != 2 or not e[0].startswith("DEALSTREAM_")]
    if args.events < 20_000 or not 20_000 <= args.timed_events <= args.events:
        parser.error("need --events >= 20000 and 20000 <= --timed-events <= --events")
    if args.runs < 1 or args.scaling_runs < 0 or bad:
        parser.error("need --runs >= 1, --scaling-runs >= 0, --env DEALSTREAM_NAME=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # the in-process batch step runs here: with the collector and the allocator as `dealstream`
    # sets them
    settings = Settings.from_env()
    tune_garbage_collector(settings.gc_threshold)
    fix_mmap_threshold(settings.malloc_mmap_threshold)
    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
