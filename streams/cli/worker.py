"""``dealstream worker``: the stream worker (features, scoring, offers) until a signal."""

from __future__ import annotations

import argparse

from streams.cli import Subparsers
from streams.settings import Settings, model_key_from_env


def add_parser(subparsers: Subparsers) -> None:
    worker = subparsers.add_parser(
        "worker", help="run the stream worker (features, scoring, offers)"
    )
    worker.set_defaults(handler=run_worker_command)


def run_worker_command(settings: Settings, args: argparse.Namespace) -> int:
    from streams.worker.process import run_worker  # Faust and the engine: only when it runs

    return run_worker(settings, model_key_from_env())
