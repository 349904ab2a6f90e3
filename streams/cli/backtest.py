"""``dealstream backtest``: a file, or the closed-loop simulator, through the engine in-process.

The file I/O is in ``streams.cli.backtest_files`` and the simulated worlds in
``streams.cli.simulation``, both imported when the command runs (they load the engine).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from streams.cli import Subparsers
from streams.cli.feedback_option import add_feedback_argument, chosen_feedback
from streams.cli.world_options import (
    add_world_arguments,
    closed_loop_config,
    world_choice,
    world_flags_given,
)
from streams.settings import Settings


def add_parser(subparsers: Subparsers) -> None:
    backtest = subparsers.add_parser(
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
    backtest.set_defaults(handler=run_backtest_subcommand)


def run_backtest_subcommand(settings: Settings, args: argparse.Namespace) -> int:
    from streams.cli.backtest_files import run_backtest_command

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
        # history spends its own days' budgets
        config=replace(
            settings.engine_config(),
            learn_inline=True,
            feedback=chosen_feedback(settings, args),
            budget_clock="event",
        ),
        batch_size=args.batch_size,
    )


def _backtest_simulated(settings: Settings, args: argparse.Namespace) -> int:
    from streams.cli.simulation import (
        backtest_simulated,
        format_regret_table,
        parse_simulate_size,
    )

    users, events = parse_simulate_size(args.simulate)
    config = closed_loop_config(
        world_choice(args),
        users=users,
        events=events,
        seed=args.seed,
        feedback=chosen_feedback(settings, args),
    )
    run = backtest_simulated(campaign_files=args.campaigns, config=config, out=args.out)
    print(format_regret_table(run.simulation))
    print(f"backtest: wrote {args.out}/report.json, report.html, simulation.json")
    return 0
