"""``dealstream``: the root parser, and the one place that reads the settings of a command.

``main`` calls ``Settings.from_env`` (``streams/settings.py`` is the only reader of the
environment), configures logging and the garbage collector, and hands the settings to the
subcommand's handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from engine.errors import EngineError
from streams.cli import (
    backtest,
    demo,
    features,
    forget,
    lag,
    learner,
    model,
    ope,
    replay,
    simulate,
    topics,
    worker,
)
from streams.errors import StreamsError
from streams.operations.allocator import fix_mmap_threshold
from streams.operations.garbage_collector import tune_garbage_collector
from streams.operations.logs import configure_logging
from streams.settings import Settings

SUBCOMMANDS = (
    worker,
    learner,
    model,
    topics,
    simulate,
    replay,
    features,
    forget,
    lag,
    backtest,
    demo,
    ope,
)
"""In the order ``dealstream --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dealstream",
        description="Personalized discounts on a stream: events -> features -> model -> offers.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        salt = settings.log_salt.reveal().encode() if settings.log_salt else None
        configure_logging(settings.log_level, settings.log_format, salt=salt)
        tune_garbage_collector(settings.gc_threshold)
        fix_mmap_threshold(settings.malloc_mmap_threshold)
        return int(args.handler(settings, args))
    except (StreamsError, EngineError) as exc:
        print(f"dealstream: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
