"""``--feedback METHOD``, shared by ``simulate --closed-loop`` and ``backtest``."""

from __future__ import annotations

import argparse
from dataclasses import replace

from engine.model.feedback import Feedback, FeedbackMethod
from streams.settings import Settings


def add_feedback_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feedback",
        choices=[method.value for method in FeedbackMethod],
        default=None,
        help="delayed-feedback method of the models (default: DEALSTREAM_FEEDBACK, "
        f"else {Feedback().method.value}; docs/model-quality.md)",
    )


def chosen_feedback(settings: Settings, args: argparse.Namespace) -> Feedback:
    """``--feedback METHOD`` when given, else the settings' (``DEALSTREAM_FEEDBACK``)."""
    if args.feedback is None:
        return settings.feedback
    return replace(settings.feedback, method=FeedbackMethod(args.feedback))
