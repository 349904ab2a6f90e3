"""``dealstream learner``: learn from ``training`` in order, publish signed model snapshots."""

from __future__ import annotations

import argparse

from streams.cli import Subparsers
from streams.settings import LearnerSettings, Settings


def add_parser(subparsers: Subparsers) -> None:
    learner = subparsers.add_parser(
        "learner", help="learn from `training` in order and publish signed model snapshots"
    )
    learner.set_defaults(handler=run_learner_command)


def run_learner_command(settings: Settings, args: argparse.Namespace) -> int:
    from streams.learner.process import run_learner  # the engine and River: only when it runs

    return run_learner(settings, LearnerSettings.from_env())
