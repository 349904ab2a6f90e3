"""``dealstream ope``: off-policy evaluation of a target policy from a decision log.

Thin: reads the file, calls :mod:`engine.analysis.ope`, prints a table or JSON. Also the Open Bandit
validation (``--open-bandit DIR``) that reproduces the figures of docs/ope.md.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from engine.errors import EngineError
from streams.cli import Subparsers

if TYPE_CHECKING:
    from engine.analysis.ope.estimators import Interval, OpeReport

DEFAULT_BOOTSTRAP = 200
"""``engine.analysis.ope.estimators.DEFAULT_BOOTSTRAP``, repeated so that ``dealstream --help``
need not import River (a test checks that they agree)."""


class OpeInputError(EngineError):
    """Bad ``ope`` arguments or an unreadable log: one line, exit code 2."""


def add_parser(subparsers: Subparsers) -> None:
    ope = subparsers.add_parser(
        "ope",
        help="off-policy evaluation: IPS, SNIPS and DR estimates of a target policy's value",
        description="Estimate what a target policy would have earned per decision, from "
        "logged decisions (decision v1 lines plus 'reward'). See docs/ope.md.",
    )
    source = ope.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", type=Path, help="decision log: JSON lines (.gz read too)")
    source.add_argument(
        "--open-bandit",
        type=Path,
        metavar="DIR",
        help="validate on the Open Bandit sample in DIR (random/ and bts/)",
    )
    ope.add_argument("--target", help="constant:DISCOUNT, or campaigns:FILE.toml (or a .toml path)")
    ope.add_argument("--seed", type=int, default=0, help="bootstrap and fold seed (default 0)")
    ope.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP,
        metavar="B",
        help=f"bootstrap replicates (default {DEFAULT_BOOTSTRAP})",
    )
    ope.add_argument("--json", action="store_true", help="one JSON document")
    ope.set_defaults(handler=run_ope)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def _row(name: str, interval: Interval) -> str:
    if interval.value is None:
        return f"{name:<8}{'undefined':>10}"
    return f"{name:<8}{_fmt(interval.value):>10}   [{_fmt(interval.low)}, {_fmt(interval.high)}]"


def format_report(report: OpeReport) -> str:
    lines = [
        f"target: {report.details.get('target', '?')}",
        f"records: {report.n}   supported (w > 0): {report.supported}   "
        f"ESS: {report.ess:.1f}   max weight: {report.max_weight:.3g}",
        f"{'':<8}{'value':>10}   95% CI (bootstrap, B={report.n_bootstrap}, seed={report.seed})",
        _row("logged", report.logged),
        _row("IPS", report.ips),
        _row("SNIPS", report.snips),
        _row("DR", report.dr),
        f"DR reward model: {report.reward_model}",
    ]
    lines.extend(f"warning: {note}" for note in report.warnings)
    return "\n".join(lines)


def _read_lines(path: Path) -> list[bytes]:
    try:
        with path.open("rb") as raw:
            head = raw.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as handle:
            return list(handle)
    except OSError as exc:
        raise OpeInputError(f"cannot read decision log {path}: {exc.strerror or exc}") from None


def _bad_summary(bad: dict[str, int], where: dict[str, list[int]]) -> str:
    return ", ".join(
        f"{count} {reason} (lines {', '.join(map(str, where.get(reason, [])))}"
        f"{', ...' if count > len(where.get(reason, [])) else ''})"
        for reason, count in bad.items()
    )


def run_ope(settings: object, args: argparse.Namespace) -> int:
    from engine.analysis.ope.decision_log import read_decision_log
    from engine.analysis.ope.evaluate import estimate
    from engine.analysis.ope.targets import parse_target

    if args.bootstrap < 1:
        raise OpeInputError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    if args.open_bandit is not None:
        return _run_open_bandit(args)
    if not args.target:
        raise OpeInputError("--target is required with --log (constant:DISCOUNT or campaigns:FILE)")
    target = parse_target(args.target)
    log = read_decision_log(_read_lines(args.log))
    summary = log.summary()
    if not log.records:
        detail = _bad_summary(summary["bad"], summary["bad_lines"]) or "the file is empty"
        raise OpeInputError(f"no valid decision in {args.log} ({log.lines} lines: {detail})")
    report = estimate(log.records, target, seed=args.seed, n_bootstrap=args.bootstrap)
    if args.json:
        print(orjson.dumps({**report.to_dict(), "log": summary}).decode())
    else:
        print(f"log: {args.log}: {log.lines} lines, {len(log.records)} valid")
        if log.bad:
            print(f"bad lines: {_bad_summary(summary['bad'], summary['bad_lines'])}")
        print(format_report(report))
    if not report.defined:
        print(
            f"dealstream: ope: the estimate is undefined: no logged decision took an action "
            f"that {target.description} would take",
            file=sys.stderr,
        )
        return 2
    return 0


def _run_open_bandit(args: argparse.Namespace) -> int:
    from engine.analysis.ope.open_bandit import validate

    results = validate(args.open_bandit, seed=args.seed, n_bootstrap=args.bootstrap)
    if args.json:
        print(orjson.dumps([v.to_dict() for v in results]).decode())
        return 0
    print(
        "Bernoulli TS click rate: on-policy truth vs estimates from the random policy's logs "
        f"(95% bootstrap CI, B={args.bootstrap}, seed={args.seed})"
    )
    for v in results:
        truth = v.truth
        print(
            f"\n{v.campaign}: truth {_fmt(truth.value)} [{_fmt(truth.low)}, {_fmt(truth.high)}]"
            f" (n={v.n_bts})"
        )
        for method, report in v.estimates.items():
            print(f"  pi_bts {method}: ESS {report.ess:.0f}, max weight {report.max_weight:.3g}")
            for name, interval in (("IPS", report.ips), ("SNIPS", report.snips)):
                print("    " + _row(name, interval))
            print("    " + _row("DR", report.dr))
    return 0
