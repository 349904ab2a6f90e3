"""``dealstream``: the command line. The only place that reads settings from the environment."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import orjson

from engine.errors import EngineError
from engine.features import compute_features
from engine.feedback import Feedback, FeedbackMethod
from streams.errors import StreamsError
from streams.logs import configure_logging
from streams.replay_cli import add_arguments as add_replay_arguments
from streams.settings import Settings
from streams.world_cli import add_world_arguments


def _cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from streams.model_store import model_key_from_env
    from streams.run import run_worker

    return run_worker(settings, model_key_from_env())


def _cmd_learner(settings: Settings, args: argparse.Namespace) -> int:
    from streams.learner import run_learner

    return run_learner(settings)


def _cmd_topics(settings: Settings, args: argparse.Namespace) -> int:
    from streams.kafka_io import check_kafka, ensure_topics

    async def run() -> list[str]:
        await check_kafka(settings.kafka_bootstrap)
        return await ensure_topics(
            settings.kafka_bootstrap, settings.topics.all, partitions=settings.partitions
        )

    created = asyncio.run(run())
    print(f"topics: created {len(created)}, all present: {', '.join(settings.topics.all)}")
    return 0


def _cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from engine.world.core import DEFAULT_MEAN_GAP_MS
    from streams.simulate import simulate_to_file, simulate_to_kafka
    from streams.world_cli import world_choice

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
        from streams.kafka_io import check_kafka, ensure_topics

        async def run() -> int:
            await check_kafka(settings.kafka_bootstrap)
            await ensure_topics(
                settings.kafka_bootstrap, settings.topics.all, partitions=settings.partitions
            )
            return await simulate_to_kafka(
                users=args.users,
                events=args.events,
                seed=args.seed,
                bootstrap=settings.kafka_bootstrap,
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


def _feedback(settings: Settings, args: argparse.Namespace) -> Feedback:
    """``--feedback METHOD`` when given, else the settings' (``DEALSTREAM_FEEDBACK``)."""
    if args.feedback is None:
        return settings.feedback
    return replace(settings.feedback, method=FeedbackMethod(args.feedback))


def _simulate_closed_loop(settings: Settings, args: argparse.Namespace) -> int:
    from streams.simulate import format_regret_table, simulate_closed_loop_to_dir
    from streams.world_cli import closed_loop_config, world_choice

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
        feedback=_feedback(settings, args),
        batch_size=args.batch_size,
    )
    simulation = simulate_closed_loop_to_dir(
        campaign_files=args.campaigns, config=config, out=args.out
    )
    print(format_regret_table(simulation))
    print(f"simulate: wrote {args.out / 'simulation.json'}", file=sys.stderr)
    return 0


def _cmd_features(settings: Settings, args: argparse.Namespace) -> int:
    from streams.tools import read_feature_states

    states = asyncio.run(read_feature_states(settings, args.user_ids))
    for user_id in args.user_ids:
        state = states[user_id]
        vector = compute_features(state) if state else None
        if args.json:
            print(orjson.dumps({"user_id": user_id, "features": vector}).decode())
        elif vector is None:
            print(f"{user_id}: no history")
        else:
            shown = ", ".join(f"{k}={v:g}" for k, v in vector.items() if v)
            print(f"{user_id}: {shown}")
    return 0


def _cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    from streams.tools import forget_user

    removed = asyncio.run(forget_user(settings, args.user_id))
    detail = ", ".join(f"{count} {kind}" for kind, count in removed.items())
    print(f"forget: removed {sum(removed.values())} key(s) for the user ({detail})")
    return 0


def _cmd_lag(settings: Settings, args: argparse.Namespace) -> int:
    from streams.kafka_io import check_kafka
    from streams.lag import PartitionLag, consumer_lag, format_lag_table, lag_report

    group = args.group or settings.group_id

    async def run() -> list[PartitionLag]:
        await check_kafka(settings.kafka_bootstrap)
        return await consumer_lag(settings.kafka_bootstrap, group, settings.topics.events)

    rows = asyncio.run(run())
    if args.json:
        print(orjson.dumps(lag_report(group, rows)).decode())
    else:
        print(format_lag_table(group, rows))
    return 0


def _cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from streams.replay_cli import run_replay

    return run_replay(settings, args)


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(settings, duration_s=args.duration, rate=args.rate, users=args.users)


def _cmd_backtest(settings: Settings, args: argparse.Namespace) -> int:
    from streams.backtest_cli import run_backtest_command
    from streams.world_cli import world_flags_given

    if (args.input is None) == (args.simulate is None):
        print("dealstream: backtest needs --in FILE or --simulate USERS:EVENTS", file=sys.stderr)
        return 2
    if args.simulate is not None:
        return _backtest_simulated(settings, args)
    world_flags = world_flags_given(args)
    if world_flags:
        print(
            f"dealstream: {world_flags[0]} describes the simulated world: it needs --simulate,"
            " not --in",
            file=sys.stderr,
        )
        return 2
    return run_backtest_command(
        input_path=args.input,
        campaign_paths=args.campaigns,
        out_dir=args.out,
        seed=args.seed,
        input_format=args.format,
        config=replace(
            settings.engine_config(), learn_inline=True, feedback=_feedback(settings, args)
        ),
        batch_size=args.batch_size,
    )


def _backtest_simulated(settings: Settings, args: argparse.Namespace) -> int:
    from streams.simulate import backtest_simulated, format_regret_table, parse_simulate_size
    from streams.world_cli import closed_loop_config, world_choice

    users, events = parse_simulate_size(args.simulate)
    config = closed_loop_config(
        world_choice(args),
        users=users,
        events=events,
        seed=args.seed,
        feedback=_feedback(settings, args),
    )
    run = backtest_simulated(campaign_files=args.campaigns, config=config, out=args.out)
    print(format_regret_table(run.simulation))
    print(f"backtest: wrote {args.out}/report.json, report.html, simulation.json")
    return 0


def add_feedback_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feedback",
        choices=[method.value for method in FeedbackMethod],
        default=None,
        help="delayed-feedback method of the models (default: DEALSTREAM_FEEDBACK, "
        f"else {Feedback().method.value}; docs/model-quality.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dealstream",
        description="Personalized discounts on a stream: events -> features -> model -> offers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = sub.add_parser("worker", help="run the stream worker (features, scoring, offers)")
    worker.set_defaults(handler=_cmd_worker)

    learner = sub.add_parser(
        "learner", help="learn from `training` in order and publish signed model snapshots"
    )
    learner.set_defaults(handler=_cmd_learner)

    topics = sub.add_parser("topics", help="create the contract's topics when missing")
    topics.set_defaults(handler=_cmd_topics)

    simulate = sub.add_parser("simulate", help="generate seeded synthetic shopper traffic")
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
    simulate.set_defaults(handler=_cmd_simulate)

    replay = sub.add_parser(
        "replay", help="republish historic events (a data file or a topic range), resumably"
    )
    add_replay_arguments(replay)
    replay.set_defaults(handler=_cmd_replay)

    features = sub.add_parser("features", help="print users' current feature vectors")
    features.add_argument("user_ids", nargs="+", metavar="USER_ID")
    features.add_argument("--json", action="store_true", help="one JSON line per user")
    features.set_defaults(handler=_cmd_features)

    forget = sub.add_parser("forget", help="delete every key stored about a user")
    forget.add_argument("user_id", metavar="USER_ID")
    forget.set_defaults(handler=_cmd_forget)

    lag = sub.add_parser("lag", help="consumer lag per partition: records and seconds behind")
    lag.add_argument("--json", action="store_true", help="one JSON document")
    lag.add_argument("--group", default=None, help="consumer group (default: DEALSTREAM_GROUP_ID)")
    lag.set_defaults(handler=_cmd_lag)

    backtest = sub.add_parser(
        "backtest", help="replay a file through the engine in-process; report.json + report.html"
    )
    backtest.add_argument("--in", dest="input", type=Path, default=None, help="events file")
    backtest.add_argument(
        "--simulate",
        metavar="USERS:EVENTS",
        default=None,
        help="instead of --in: the closed-loop simulator, each campaign against its own world",
    )
    backtest.add_argument(
        "--campaigns",
        type=Path,
        action="append",
        required=True,
        help="campaigns TOML (repeat to compare files, each in its own engine)",
    )
    backtest.add_argument("--out", type=Path, required=True, help="output directory")
    backtest.add_argument("--seed", type=int, default=0, help="added to every campaign's seed")
    backtest.add_argument("--format", default=None, help="jsonl | taobao | otto (default: detect)")
    backtest.add_argument("--batch-size", type=int, default=2000, help=argparse.SUPPRESS)
    add_feedback_argument(backtest)
    add_world_arguments(backtest)
    backtest.set_defaults(handler=_cmd_backtest)

    demo = sub.add_parser("demo", help="worker + simulator, printing offers as they arrive")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds (0 = until Ctrl-C)")
    demo.add_argument("--rate", type=float, default=200.0, help="simulated events/s")
    demo.add_argument("--users", type=int, default=300)
    demo.set_defaults(handler=_cmd_demo)

    from streams.ope_cli import add_ope_parser

    add_ope_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        salt = settings.log_salt.reveal().encode() if settings.log_salt else None
        configure_logging(settings.log_level, settings.log_format, salt=salt)
        return int(args.handler(settings, args))
    except (StreamsError, EngineError) as exc:
        print(f"dealstream: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
