"""The stop-loss in backtests: transitions at their exact event time whatever the batch size,
bounded bookkeeping, the report.json section and its place on the page."""

from __future__ import annotations

import io
import re
from typing import Any

import orjson
import pytest

from engine.analysis.backtest.runner import BacktestResult, run_backtest
from engine.analysis.backtest.stop_loss import TRANSITIONS_KEPT, StopLossLog, Transition
from engine.analysis.reporting.html import render_html
from engine.analysis.reporting.report import build_report, dumps_report
from engine.campaigns import Campaign, parse_campaigns
from engine.decisions import in_holdout
from engine.events import Event, parse_event
from engine.pipeline import EngineConfig

T0 = 1_767_225_600_000
MINUTE = 60_000
HOUR = 60 * MINUTE
USERS = 60
LOSING_ROUNDS, WINNING_ROUNDS = 9, 21
CONFIG = EngineConfig(attribution_window_ms=30 * MINUTE)


def campaigns() -> tuple[Campaign, ...]:
    return parse_campaigns(
        {
            "campaign": [
                {
                    "name": "deep-cut",
                    "policy": "threshold",
                    "threshold": 0.0,
                    "discount_pct": 40,
                    "triggers": ["view"],
                    "decision_interval_s": 0,
                    "holdout": 0.3,
                    "stop_loss": {"window_h": 1, "min_decisions": 40, "min_users": 5},
                },
                {"name": "plain", "policy": "threshold", "threshold": 0.0, "holdout": 0.3},
            ]
        }
    )


def shop() -> list[Event]:
    """Every 10 minutes every user views an item and buys it 30 s later. First treated users
    pay 60 % (the offer costs more margin than it brings: the campaign loses against its
    holdout), then they pay full price and holdout users stop buying (it earns)."""
    (campaign, _) = campaigns()
    held_out = {f"u{i:02d}" for i in range(USERS) if in_holdout(campaign, f"u{i:02d}")}
    events: list[dict[str, Any]] = []
    for round_ in range(LOSING_ROUNDS + WINNING_ROUNDS):
        losing = round_ < LOSING_ROUNDS
        for index in range(USERS):
            user = f"u{index:02d}"
            ts = T0 + round_ * 10 * MINUTE + index * 100
            price = 50.0 + index % 7
            events.append(
                {
                    "event_id": f"v{round_}-{user}",
                    "user_id": user,
                    "type": "browse",
                    "ts": ts,
                    "item_id": f"i{index}",
                    "category": "books",
                    "price": price,
                    "action": "view",
                }
            )
            if user in held_out and not losing:
                continue
            paid = round(price * 0.6, 2) if losing and user not in held_out else price
            events.append(
                {
                    "event_id": f"p{round_}-{user}",
                    "user_id": user,
                    "type": "purchase",
                    "ts": ts + 30_000,
                    "order_id": f"o{round_}-{user}",
                    "items": [
                        {"item_id": f"i{index}", "category": "books", "price": price, "quantity": 1}
                    ],
                    "amount": paid,
                }
            )
    events.sort(key=lambda e: int(e["ts"]))
    return [parse_event(e) for e in events]


def run(batch_size: int) -> tuple[BacktestResult, dict[str, Any]]:
    result = run_backtest(shop(), campaigns(), batch_size=batch_size, config=CONFIG)
    report = build_report(result, inputs={"file": "shop.jsonl"})
    return result, orjson.loads(dumps_report(report))


@pytest.fixture(scope="module")
def baseline() -> tuple[BacktestResult, dict[str, Any]]:
    return run(500)


def test_a_losing_campaign_stops_then_resumes_at_exact_event_times(
    baseline: tuple[BacktestResult, dict[str, Any]],
) -> None:
    result, report = baseline
    section = report["campaigns"]["deep-cut"]["stop_loss"]
    assert (section["window_h"], section["min_decisions"], section["min_users"]) == (1.0, 40, 5)
    assert section["explore"] == 0.05
    directions = [t["direction"] for t in section["transitions"]]
    assert directions[0] == "stopped" and directions[-1] == "resumed", directions
    assert directions == ["stopped", "resumed"] * (len(directions) // 2)
    assert section["stops"] == len(directions) // 2
    assert section["transitions_total"] == len(directions) and section["transitions_omitted"] == 0
    stamps = [t["ts"] for t in section["transitions"]]
    assert stamps == sorted(stamps)
    assert T0 < stamps[0] < T0 + LOSING_ROUNDS * 10 * MINUTE < stamps[-1]
    # The final status is the engine's: active again, since the last transition.
    final = section["final"]
    engine = result.groups[0].engine
    assert final["stopped"] is False and final["since_ts"] == stamps[-1]
    assert final["since_ts"] == engine.stop_loss["deep-cut"].since_ms
    assert final["lower_bound"] <= final["incremental_margin"] <= final["upper_bound"]
    assert final["upper_bound"] >= 0 and final["decisions"] > 0
    # Time stopped = the sum of the stopped intervals.
    stopped_ms = sum(b - a for a, b in zip(stamps[::2], stamps[1::2], strict=True))
    assert section["stopped_s"] == pytest.approx(stopped_ms / 1000, rel=1e-5)
    # A campaign without a stop-loss has no section.
    assert report["campaigns"]["plain"]["stop_loss"] is None
    assert report["report_version"] == 3


def test_decisions_made_while_stopped_are_counted_from_their_rules() -> None:
    log = io.BytesIO()
    result = run_backtest(shop(), campaigns(), batch_size=500, config=CONFIG, decisions_out=log)
    report = orjson.loads(dumps_report(build_report(result, inputs={"file": "shop.jsonl"})))
    section = report["campaigns"]["deep-cut"]["stop_loss"]
    decisions = [orjson.loads(line) for line in log.getvalue().splitlines()]
    mine = [d for d in decisions if d["campaign"] == "deep-cut" and not d["holdout"]]
    stopped = [d for d in mine if "stop_loss:explore_only" in d["rules"]]
    assert 0 < len(stopped) < len(mine)
    assert section["stopped_decisions"] == len(stopped)
    assert section["stopped_offers"] == sum(1 for d in stopped if d["offer_id"] is not None)
    assert section["stopped_offers"] < len(stopped) / 4  # explore = 5 %
    assert section["stopped_share"] == pytest.approx(len(stopped) / len(mine), rel=1e-5)
    # Each decision's state agrees with the transitions (a decision sees the state settled
    # before its own event, so one at a transition's very time may still see the old state).
    stamps = [t["ts"] for t in section["transitions"]]
    intervals = list(zip(stamps[::2], stamps[1::2], strict=True))
    for d in mine:
        if "stop_loss:explore_only" in d["rules"]:
            assert any(a <= d["ts"] <= b for a, b in intervals), d["ts"]
        else:
            assert not any(a < d["ts"] < b for a, b in intervals), d["ts"]
    warning = next(w for w in report["warnings"] if w.startswith("deep-cut: the stop-loss"))
    assert f"stopped the campaign {section['stops']} time(s)" in warning


def test_transitions_do_not_depend_on_the_batch_size(
    baseline: tuple[BacktestResult, dict[str, Any]],
) -> None:
    _, report = baseline
    _, small = run(37)
    section = report["campaigns"]["deep-cut"]["stop_loss"]
    assert small["campaigns"]["deep-cut"]["stop_loss"] == section
    _, again = run(500)
    assert dumps_report(again) == dumps_report(report)


def test_the_transition_log_is_bounded_and_counts_what_it_leaves_out() -> None:
    log = StopLossLog()
    for k in range(2 * TRANSITIONS_KEPT + 7):
        log.add(T0 + k * HOUR, stopped=k % 2 == 0)
    assert len(log.transitions) == TRANSITIONS_KEPT
    assert log.transitions[:2] == [Transition(T0, True), Transition(T0 + HOUR, False)]
    assert log.total == 2 * TRANSITIONS_KEPT + 7
    assert log.stops == TRANSITIONS_KEPT + 4
    # Stopped for one hour out of every two; the last stop runs until the end asked for.
    last = T0 + (2 * TRANSITIONS_KEPT + 6) * HOUR
    assert log.stopped_time_ms(last + 30 * MINUTE) == (TRANSITIONS_KEPT + 3) * HOUR + 30 * MINUTE


def test_the_page_shows_the_stop_loss_after_the_campaigns(
    baseline: tuple[BacktestResult, dict[str, Any]],
) -> None:
    _, report = baseline
    page = render_html(report)
    assert page.index('id="campaigns"') < page.index('id="section-stop-loss"')
    assert page.index('id="section-stop-loss"') < page.index("<h2>Model</h2>")
    table = page.split('<table id="stop-loss">', 1)[1].split("</table>", 1)[0]
    rows = table.split("<tr>")[2:]
    assert len(rows) == 1 and "deep-cut" in rows[0] and "plain" not in table
    section = report["campaigns"]["deep-cut"]["stop_loss"]
    assert "active since" in rows[0]
    assert f"{100 * section['stopped_share']:.2f}&nbsp;%" in rows[0]
    transitions = page.split('id="stop-loss-transitions">', 1)[1].split("</ul>", 1)[0]
    first = (section["transitions"][0]["ts"] - report["event_time"]["first_ts"]) / HOUR
    assert f"stopped at {first:,.2f}&nbsp;h" in transitions
    assert len(re.findall(r"(stopped|resumed) at", transitions)) == len(section["transitions"])


def test_no_section_without_a_stop_loss() -> None:
    (_, plain) = campaigns()
    result = run_backtest(shop()[:400], (plain,), config=CONFIG)
    report = orjson.loads(dumps_report(build_report(result, inputs={"file": "shop.jsonl"})))
    assert report["campaigns"]["plain"]["stop_loss"] is None
    assert "section-stop-loss" not in render_html(report)
