"""``dealstream simulate``: the world's traffic to a JSONL file or Kafka, or a closed-loop run.

Open loop, the world (``engine.analysis.simulation``) receives no offers; ``--closed-loop`` runs
every campaign against its own copy of the world, with the oracle and the no-offer counterfactual,
and writes the ``simulation`` report (``engine.analysis.simulation.closed_loop``)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import orjson

from engine.analysis.backtest.runner import BacktestResult
from engine.analysis.reporting.html import render_html
from engine.analysis.reporting.report import build_report, dumps_report
from engine.analysis.simulation.closed_loop import (
    ClosedLoopConfig,
    ClosedLoopError,
    ClosedLoopRun,
    run_closed_loop,
    simulate_closed_loop,
)
from engine.analysis.simulation.params import WorldParams
from engine.analysis.simulation.world import DEFAULT_MEAN_GAP_MS, open_loop
from engine.campaigns import Campaign, load_campaigns
from streams.adapters.sinks import ProducerSink
from streams.settings import KafkaSecurity, Topics


def write_jsonl(events: Iterator[dict[str, object]], out: IO[bytes]) -> int:
    count = 0
    for event in events:
        out.write(orjson.dumps(event))
        out.write(b"\n")
        count += 1
    return count


def simulate_to_file(
    *,
    users: int,
    events: int,
    seed: int,
    out: Path,
    params: WorldParams | None = None,
    mean_gap_ms: float = DEFAULT_MEAN_GAP_MS,
) -> int:
    stream = open_loop(
        users=users, events=events, seed=seed, mean_gap_ms=mean_gap_ms, params=params
    )
    if str(out) == "-":
        return write_jsonl(stream, sys.stdout.buffer)
    with out.open("wb") as handle:
        return write_jsonl(stream, handle)


async def simulate_to_kafka(
    *,
    users: int,
    events: int,
    seed: int,
    bootstrap: str,
    topics: Topics,
    rate: float | None,
    user_prefix: str = "u",
    params: WorldParams | None = None,
    security: KafkaSecurity | None = None,
) -> int:
    """Produce events keyed by user id; event time is the wall clock, paced at ``rate``/s."""
    start_ms = int(time.time() * 1000)
    gap_ms = 1000.0 / rate if rate else 1.0
    sink = ProducerSink.create(bootstrap, security=security)
    await sink.start()
    started = time.monotonic()
    sent = 0
    try:
        stream = open_loop(
            users=users,
            events=events,
            seed=seed,
            start_ms=start_ms,
            mean_gap_ms=gap_ms,
            user_prefix=user_prefix,
            params=params,
        )
        for event in stream:
            topic = {"browse": topics.browse, "search": topics.search}.get(
                str(event["type"]), topics.purchase
            )
            await sink.send(topic, str(event["user_id"]).encode(), orjson.dumps(event))
            sent += 1
            if rate:
                due = started + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
    finally:
        await sink.stop()
    return sent


def load_all_campaigns(paths: list[Path]) -> tuple[Campaign, ...]:
    """Campaigns of several files, in order; names must be unique across them."""
    campaigns = [campaign for path in paths for campaign in load_campaigns(path)]
    names = [campaign.name for campaign in campaigns]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ClosedLoopError(f"campaign names must be unique across files, repeated: {duplicates}")
    return tuple(campaigns)


def format_regret_table(simulation: dict[str, object]) -> str:
    """The closed-loop figures as a plain-text table (what report.html shows as a table)."""
    header = (
        f"{'campaign':<18} {'policy':<10} {'decisions':>9} {'offers':>7} {'incr. margin':>13}"
        f" {'expected':>10} {'oracle':>10} {'regret':>10} {'per 1k dec.':>11}"
    )
    lines = [header]
    rows = cast(list[dict[str, Any]], simulation["policies"])
    for row in rows:
        per_1k = row["regret_per_1000_decisions"]
        lines.append(
            f"{row['campaign']:<18} {row['policy']:<10} {row['decisions']:>9} {row['offers']:>7}"
            f" {row['incremental_margin']:>13.2f} {row['expected_incremental_margin']:>10.2f}"
            f" {row['oracle_incremental_margin']:>10.2f} {row['regret']:>10.2f}"
            f" {'-' if per_1k is None else format(per_1k, '.2f'):>11}"
        )
    return "\n".join(lines)


def _make_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ClosedLoopError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClosedLoopError(f"cannot create output directory {out}: {exc.strerror}") from None


def _say(line: str) -> None:
    print(f"simulate: {line}", file=sys.stderr)


def parse_simulate_size(text: str) -> tuple[int, int]:
    """``USERS:EVENTS`` (e.g. ``2000:200000``) -> (users, events)."""
    users, sep, events = text.partition(":")
    try:
        sizes = (int(users), int(events)) if sep else None
    except ValueError:
        sizes = None
    if sizes is None or sizes[0] < 1 or sizes[1] < 1:
        raise ClosedLoopError(
            "--simulate takes USERS:EVENTS with two positive integers, e.g. 2000:200000,"
            f" got {text!r}"
        )
    return sizes


def merged_backtest(run: ClosedLoopRun) -> BacktestResult:
    """One report over every campaign's own closed loop: each campaign's world is its own
    event stream, so the event counts shown are those of the first campaign's world."""
    results = list(run.backtests.values())
    groups = []
    for name, result in run.backtests.items():
        group = result.groups[0]
        group.name = name
        groups.append(group)
    first = results[0]
    return BacktestResult(
        groups=groups,
        events=first.events,
        first_ts=first.first_ts,
        last_ts=first.last_ts,
        statuses=first.statuses,
        events_by_kind=first.events_by_kind,
        seed=first.seed,
        batch_size=first.batch_size,
    )


def backtest_simulated(
    *, campaign_files: list[Path], config: ClosedLoopConfig, out: Path
) -> ClosedLoopRun:
    """``dealstream backtest --simulate``: the closed loop as a backtest report
    (``report.json``, ``report.html`` with the ``simulation`` section) and ``simulation.json``."""
    from streams.cli.backtest_files import file_sha256

    campaigns = load_all_campaigns(campaign_files)
    _make_dir(out)
    run = run_closed_loop(campaigns, config, progress=_say)
    inputs = {
        "simulated": {
            "users": config.users,
            "events": config.events,
            "seed": config.seed,
            "mean_gap_ms": config.mean_gap_ms,
            "margin": config.margin,
            "world": config.world.as_dict(),
        },
        "campaign_files": [{"file": p.name, "sha256": file_sha256(p)} for p in campaign_files],
    }
    report = build_report(merged_backtest(run), inputs=inputs, extra={"simulation": run.simulation})
    report_bytes = dumps_report(report)
    (out / "report.json").write_bytes(report_bytes)
    (out / "report.html").write_text(render_html(orjson.loads(report_bytes)), "utf-8")
    _write_simulation(out, run.simulation)
    return run


def _write_simulation(out: Path, simulation: dict[str, object]) -> None:
    path = out / "simulation.json"
    path.write_bytes(orjson.dumps(simulation, option=orjson.OPT_INDENT_2) + b"\n")


def simulate_closed_loop_to_dir(
    *, campaign_files: list[Path], config: ClosedLoopConfig, out: Path
) -> dict[str, object]:
    """Run the closed loop and write ``out/simulation.json``; returns the simulation dict."""
    campaigns = load_all_campaigns(campaign_files)
    _make_dir(out)
    simulation = simulate_closed_loop(campaigns, config, progress=_say)
    _write_simulation(out, simulation)
    return simulation
