"""``dealstream simulate``: seeded synthetic shopper traffic to a file or Kafka, or a closed loop.

The work is in ``streams.cli.simulation``, imported when the command runs (it loads the engine).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from streams.cli import Subparsers
from streams.cli.feedback_option import add_feedback_argument, chosen_feedback
from streams.cli.world_options import add_world_arguments, closed_loop_config, world_choice
from streams.settings import Settings


def add_parser(subparsers: Subparsers) -> None:
    simulate = subparsers.add_parser("simulate", help="generate seeded synthetic shopper traffic")
    simulate.add_argument("--users", type=int, default=1000)
    simulate.add_argument("--events", type=int, default=10_000)
    simulate.add_argument("--seed", type=int, default=1)
    target = simulate.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="JSONL file to write ('-' for stdout)")
    target.add_argument("--kafka", action="store_true", help="produce to the event topics")
    simulate.add_argument("--rate", type=float, default=None, help="events/s (with --kafka)")
    simulate.add_argument(
        "--closed-loop",
        action="store_true",
        help="run each campaign, its oracle and a no-offer world; --out is a directory",
    )
    simulate.add_argument(
        "--campaigns", type=Path, action="append", default=[], help="campaigns TOML (repeatable)"
    )
    simulate.add_argument("--batch-size", type=int, default=10, help="closed loop micro-batch")
    add_feedback_argument(simulate)
    add_world_arguments(simulate)
    simulate.set_defaults(handler=run_simulate_command)


def run_simulate_command(settings: Settings, args: argparse.Namespace) -> int:
    from engine.analysis.simulation.world import DEFAULT_MEAN_GAP_MS
    from streams.cli.simulation import simulate_to_file, simulate_to_kafka

    if args.closed_loop:
        return _simulate_closed_loop(settings, args)
    if args.campaigns:
        print("dealstream: --campaigns needs --closed-loop", file=sys.stderr)
        return 2
    if args.kafka and args.mean_gap_ms is not None:
        print(
            "dealstream: --mean-gap-ms does not apply to --kafka: event time is the wall clock,"
            " paced by --rate",
            file=sys.stderr,
        )
        return 2
    world = world_choice(args)
    if args.kafka:
        from streams.adapters.kafka_io import check_kafka, ensure_topics

        async def run() -> int:
            await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
            await ensure_topics(
                settings.kafka_bootstrap,
                settings.topics.all,
                partitions=settings.partitions,
                replication=settings.replication,
                security=settings.kafka_security,
            )
            return await simulate_to_kafka(
                users=args.users,
                events=args.events,
                seed=args.seed,
                bootstrap=settings.kafka_bootstrap,
                security=settings.kafka_security,
                topics=settings.topics,
                rate=args.rate,
                params=world.params,
            )

        sent = asyncio.run(run())
        print(f"simulate: sent {sent} events to {settings.kafka_bootstrap}", file=sys.stderr)
        return 0
    count = simulate_to_file(
        users=args.users,
        events=args.events,
        seed=args.seed,
        out=args.out,
        params=world.params,
        mean_gap_ms=DEFAULT_MEAN_GAP_MS if world.mean_gap_ms is None else world.mean_gap_ms,
    )
    print(f"simulate: wrote {count} events to {args.out}", file=sys.stderr)
    return 0


def _simulate_closed_loop(settings: Settings, args: argparse.Namespace) -> int:
    from streams.cli.simulation import format_regret_table, simulate_closed_loop_to_dir

    if args.kafka or not args.campaigns or args.out is None or str(args.out) == "-":
        print(
            "dealstream: --closed-loop needs --campaigns FILE and --out DIR (not --kafka)",
            file=sys.stderr,
        )
        return 2
    config = closed_loop_config(
        world_choice(args),
        users=args.users,
        events=args.events,
        seed=args.seed,
        feedback=chosen_feedback(settings, args),
        batch_size=args.batch_size,
    )
    simulation = simulate_closed_loop_to_dir(
        campaign_files=args.campaigns, config=config, out=args.out
    )
    print(format_regret_table(simulation))
    print(f"simulate: wrote {args.out / 'simulation.json'}", file=sys.stderr)
    return 0
