"""The simulated world on the command line, shared by ``simulate`` and ``backtest --simulate``:
``--world FILE.toml`` and one flag per ``WorldParams`` field, plus ``--mean-gap-ms`` and
``--margin``; a flag overrides the file, the file overrides the defaults.

Values are parsed here rather than by argparse so that a bad one is one line naming the flag
(argparse would print the usage too)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.analysis.simulation.errors import WorldError, WorldParamError
from engine.analysis.simulation.params import (
    PAIR_KEYS,
    PARAM_KEYS,
    WorldFile,
    WorldParams,
    load_world_file,
)

if TYPE_CHECKING:  # the closed loop imports the engine and River: only when a command runs
    from engine.analysis.simulation.closed_loop import ClosedLoopConfig
    from engine.model.feedback import Feedback

FLAGS: dict[str, str] = {key: "--" + key.replace("_", "-") for key in PARAM_KEYS}
"""The flag of each parameter: its TOML key with dashes."""

HELP: dict[str, tuple[str, str]] = {
    "deal_seekers": ("SHARE", "share of deal seekers (0.25)"),
    "deal_seeker_sensitivity": ("LOW:HIGH", "deal seekers' price sensitivity U(LOW, HIGH) (1.5:4)"),
    "sensitivity": ("LOW:HIGH", "the other shoppers' price sensitivity U(LOW, HIGH) (0:1)"),
    "propensity_beta": ("A:B", "base purchase propensity ~ Beta(A, B) (1.5:6)"),
    "propensity_cap": ("P", "cap of the base propensity (0.9)"),
    "cart_p": ("P", "chance a browse step carts the item just viewed (0.25)"),
    "favorite_p": ("P", "chance a browse step favourites the item just viewed (0.08)"),
    "search_p": ("P", "chance a step is a search (0.25)"),
    "session_end_p": ("P", "chance a session ends after each step (1/6, at least 0.1)"),
}


@dataclass(frozen=True, slots=True)
class WorldChoice:
    """The world a command runs: its parameters, and the run's mean event gap and scoring
    margin when a flag or the file set them (None: the command's own default)."""

    params: WorldParams
    mean_gap_ms: float | None = None
    margin: float | None = None


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """``--world``, the parameter flags, ``--mean-gap-ms`` and ``--margin`` (all default None,
    so that the file and the command's defaults show through)."""
    group = parser.add_argument_group(
        "simulated world", "docs/simulator.md; a flag overrides the same key of --world"
    )
    group.add_argument(
        "--world", type=Path, default=None, metavar="FILE.toml", help="a [world] table"
    )
    for key in PARAM_KEYS:
        metavar, text = HELP[key]
        group.add_argument(FLAGS[key], dest=f"world_{key}", metavar=metavar, help=text)
    group.add_argument(
        "--mean-gap-ms",
        "--gap-ms",
        dest="mean_gap_ms",
        metavar="MS",
        help="population-wide mean event gap (open loop 100, closed loop 3000)",
    )
    group.add_argument("--margin", metavar="M", help="gross margin for scoring (0.3)")


def world_flags_given(args: argparse.Namespace) -> list[str]:
    """The world flags on the command line (for commands where they do not apply)."""
    given = [FLAGS[key] for key in PARAM_KEYS if getattr(args, f"world_{key}") is not None]
    for flag, value in (
        ("--world", args.world),
        ("--mean-gap-ms", args.mean_gap_ms),
        ("--margin", args.margin),
    ):
        if value is not None:
            given.append(flag)
    return given


def world_choice(args: argparse.Namespace) -> WorldChoice:
    """Defaults, then ``--world FILE``, then the flags; errors name the flag or the file key."""
    file = load_world_file(args.world) if args.world is not None else WorldFile(WorldParams())
    overrides: dict[str, Any] = {}  # a float or a (low, high) pair per key, parsed below
    for key in PARAM_KEYS:
        text = getattr(args, f"world_{key}")
        if text is not None:
            parse = _pair if key in PAIR_KEYS else _number
            overrides[key] = parse(FLAGS[key], text)
    params = replace(file.params, **overrides)
    try:
        params.check()
    except WorldParamError as exc:
        names = tuple(FLAGS[key] if key in overrides else key for key in exc.fields)
        raise WorldError(exc.describe(names)) from None
    gap, margin = file.mean_gap_ms, file.margin
    if args.mean_gap_ms is not None:
        gap = _number("--mean-gap-ms", args.mean_gap_ms)
    if args.margin is not None:
        margin = _number("--margin", args.margin)
    return WorldChoice(params, gap, margin)


def closed_loop_config(
    choice: WorldChoice,
    *,
    users: int,
    events: int,
    seed: int,
    feedback: Feedback,
    batch_size: int | None = None,
) -> ClosedLoopConfig:
    """A closed loop in the chosen world; unset settings keep ``ClosedLoopConfig``'s defaults."""
    from engine.analysis.simulation.closed_loop import ClosedLoopConfig

    config = ClosedLoopConfig(
        users=users, events=events, seed=seed, world=choice.params, feedback=feedback
    )
    if batch_size is not None:
        config = replace(config, batch_size=batch_size)
    if choice.margin is not None:
        config = replace(config, margin=choice.margin)
    if choice.mean_gap_ms is not None:
        config = replace(config, mean_gap_ms=choice.mean_gap_ms)
    return config


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise WorldError(f"{flag} takes a number, got {text!r}") from None


def _pair(flag: str, text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        if sep:
            return (float(low), float(high))
    except ValueError:
        pass
    raise WorldError(f"{flag} takes two numbers LOW:HIGH such as 0:1, got {text!r}")
