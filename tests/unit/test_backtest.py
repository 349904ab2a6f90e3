"""The backtest runner and report: determinism, accounting, closed loop, campaign sets."""

from __future__ import annotations

import io
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.analysis.backtest.metrics import ModelStats
from engine.analysis.backtest.runner import (
    BacktestError,
    BacktestResult,
    finalize_decision_lines,
    run_backtest,
)
from engine.analysis.reporting.report import build_report, dumps_report
from engine.analysis.simulation.world import open_loop
from engine.campaigns import Campaign, parse_campaigns
from engine.events import Event, parse_event
from engine.features.state import DAY_MS
from engine.pipeline import EngineConfig

CONFIG = EngineConfig(attribution_window_ms=1800 * 1000)
CAMPAIGNS_TOML: dict[str, Any] = {
    "campaign": [
        {
            "name": "threshold",
            "policy": "threshold",
            "threshold": 0.3,
            "triggers": ["view", "cart"],
            "decision_interval_s": 300,
            "daily_budget": 40.0,
            "holdout": 0.25,
        },
        {
            "name": "profit",
            "policy": "profit",
            "epsilon": 0.3,
            "max_discount_pct": 20,
            "triggers": ["cart", "view"],
            "decision_interval_s": 300,
            "cooldown_s": 600,
            "daily_budget": 30.0,
            "holdout": 0.25,
        },
    ]
}


def sim(events: int = 3000, seed: int = 5) -> list[Event]:
    # 4 s apart on average: 3000 events span ~3.2 h, so most 30-minute windows close.
    return [parse_event(e) for e in open_loop(users=80, events=events, seed=seed, mean_gap_ms=4000)]


def campaigns(**changes: Any) -> tuple[Campaign, ...]:
    doc = {"campaign": [{**c, **changes} for c in CAMPAIGNS_TOML["campaign"]]}
    return parse_campaigns(doc)


def run(events: list[Event], seed: int = 0, **kwargs: Any) -> tuple[BacktestResult, bytes]:
    out = io.BytesIO()
    result = run_backtest(
        events,
        kwargs.pop("sets", campaigns()),
        seed=seed,
        decisions_out=out,
        config=CONFIG,
        **kwargs,
    )
    return result, out.getvalue()


def report_bytes(result: BacktestResult) -> bytes:
    return dumps_report(build_report(result, inputs={"file": "sim.jsonl"}))


def split_log(
    result: BacktestResult, raw: bytes
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    labelled, pending = io.BytesIO(), io.BytesIO()
    finalize_decision_lines(raw.splitlines(keepends=True), result.rewards, labelled, pending)
    return (
        [orjson.loads(line) for line in labelled.getvalue().splitlines()],
        [orjson.loads(line) for line in pending.getvalue().splitlines()],
    )


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return sim()


@pytest.fixture(scope="module")
def baseline(events: list[Event]) -> tuple[BacktestResult, bytes]:
    return run(events)


def test_same_events_and_seed_give_byte_identical_reports_and_logs(
    events: list[Event], baseline: tuple[BacktestResult, bytes]
) -> None:
    result, log = baseline
    again, log_again = run(list(events))
    assert report_bytes(again) == report_bytes(result)
    assert log_again == log


def test_the_seed_reaches_exploration(
    events: list[Event], baseline: tuple[BacktestResult, bytes]
) -> None:
    other, _ = run(events, seed=7)
    report, seeded = orjson.loads(report_bytes(baseline[0])), orjson.loads(report_bytes(other))
    assert seeded["seed"] == 7 and seeded["campaigns"]["profit"]["seed"] == 7
    assert (
        report["campaigns"]["profit"]["discount_distribution"]
        != (seeded["campaigns"]["profit"]["discount_distribution"])
    )


def test_results_do_not_depend_on_the_batch_size(
    events: list[Event], baseline: tuple[BacktestResult, bytes]
) -> None:
    small, _ = run(events, batch_size=97)
    a = orjson.loads(report_bytes(baseline[0]))
    b = orjson.loads(report_bytes(small))
    a.pop("batch_size"), b.pop("batch_size")
    assert a == b


def test_accounting_adds_up(baseline: tuple[BacktestResult, bytes]) -> None:
    result, raw = baseline
    report = orjson.loads(report_bytes(result))
    labelled, pending = split_log(result, raw)
    assert len(labelled) + len(pending) == report["decisions"] > 0
    assert len(pending) == report["pending_decisions"]
    assert {d["reward"] for d in labelled} == {0, 1}
    assert all(d["reward"] is None for d in pending)
    for key, section in report["campaigns"].items():
        mine = [d for d in labelled if d["campaign_key"] == key]
        treated = [d for d in mine if not d["holdout"] and d["offer_id"] is not None]
        holdout = [d for d in mine if d["holdout"]]
        assert section["treated"] == {
            "labelled": len(treated),
            "converted": sum(d["reward"] for d in treated),
        }
        assert section["holdout"]["labelled"] == len(holdout)
        assert section["conversion_holdout"] == pytest.approx(
            sum(d["reward"] for d in holdout) / len(holdout), rel=1e-5
        )
        assert section["uplift"] == pytest.approx(
            section["conversion_treated"] - section["conversion_holdout"], abs=2e-6
        )
        low, high = section["uplift_ci95"]
        assert low < section["uplift"] < high
        itt = section["itt"]
        non_holdout = [d for d in mine if not d["holdout"]]
        assert itt["labelled"] == len(non_holdout)
        assert itt["converted"] == sum(d["reward"] for d in non_holdout)
        assert itt["uplift"] == pytest.approx(
            itt["conversion"] - section["conversion_holdout"], abs=2e-6
        )
        decided = section["treated"]["labelled"] + section["holdout"]["labelled"]
        assert (
            decided + section["untreated"]["labelled"] + section["pending"]["total"]
            == (section["decisions"])
        )
        assert section["offers"] == sum(
            1 for d in labelled + pending if d["campaign_key"] == key and d["offer_id"]
        )
        assert all(not d["offer_id"] for d in holdout)
        assert section["spend"] <= section["committed_spend"]
        # Budget burn: cumulative spend within each day never passes the daily budget, and
        # the last point of the run's days adds up to everything the ledger committed.
        burn = section["budget_burn"]
        assert burn and all(point[2] <= section["daily_budget"] + 1e-9 for point in burn)
        last_per_day = {point[0]: point[2] for point in burn}
        assert sum(last_per_day.values()) == pytest.approx(section["committed_spend"])
        assert all(point[1] // DAY_MS == point[0] for point in burn)
        assert sum(d["count"] for d in section["discount_distribution"]) == (
            section["decisions"] - section["holdout_decisions"]
        )
        qini = section["qini"]
        assert len(qini["points"]) == 101 and qini["points"][0] == [0.0, 0.0]
        exploring = [d for d in mine if 0 < d["offer_propensity"] < 1]
        if section["policy"] == "profit":
            # IPW over the exploring decisions: the whole pool's gain from the log itself.
            assert qini["method"] == "ipw" and qini["decisions"] == len(exploring)
            # Treated: the policy chose an offer (granted, or denied by a guardrail).
            chosen = [d for d in exploring if d["offer_id"] or _denied(d)]
            treated_w = sum(1 / d["offer_propensity"] for d in chosen)
            treated_y = sum(d["reward"] / d["offer_propensity"] for d in chosen)
            control = [d for d in exploring if not d["offer_id"] and not _denied(d)]
            control_w = sum(1 / (1 - d["offer_propensity"]) for d in control)
            control_y = sum(d["reward"] / (1 - d["offer_propensity"]) for d in control)
            gain = treated_y - control_y * treated_w / control_w
        else:  # deterministic: offered against holdout decisions
            assert qini["method"] == "holdout" and not exploring
            gain = section["incremental_conversions"]
        assert qini["points"][-1][1] == pytest.approx(gain, rel=1e-4, abs=1e-4)
        assert qini["auuc"] == pytest.approx(
            sum((a[1] + b[1]) / 2 * 0.01 for a, b in pairwise(qini["points"])),
            rel=1e-4,
            abs=1e-4,
        )
    assert report["discount_spend"] == pytest.approx(
        sum(c["spend"] for c in report["campaigns"].values())
    )


def _denied(decision: dict[str, Any]) -> bool:
    return any(rule.startswith("denied:") for rule in decision["rules"])


def test_model_metrics_are_prequential_over_every_label(
    baseline: tuple[BacktestResult, bytes],
) -> None:
    result, _ = baseline
    report = orjson.loads(report_bytes(result))
    model = report["model"]
    labels = sum(
        c["treated"]["labelled"] + c["holdout"]["labelled"] + c["untreated"]["labelled"]
        for c in report["campaigns"].values()
    )
    # Every final label is scored once, by the model as it was just before that label
    # reached it (engine.model.prequential.OnlineLearner); the learner saw at least as many updates.
    assert model["n_labels"] == labels <= result.groups[0].engine.model.examples_learned
    assert sum(b["count"] for b in model["calibration"]) == labels
    assert 0.0 <= model["auc"] <= 1.0 and 0 < model["ece"] < 1 and model["log_loss"] > 0


def test_report_has_no_wall_clock_or_absolute_paths(baseline: tuple[BacktestResult, bytes]) -> None:
    text = report_bytes(baseline[0]).decode()
    assert "/" not in orjson.loads(text)["input"]["file"]
    assert "elapsed" not in text and str(Path.cwd()) not in text
    report = orjson.loads(text)
    assert report["events_per_second"] == pytest.approx(
        report["events"] / report["event_time"]["span_s"], rel=1e-5
    )


def test_offers_hook_runs_after_each_batch_before_the_next_is_pulled(events: list[Event]) -> None:
    pulled: list[int] = []
    calls: list[tuple[int, int]] = []

    def source() -> Iterator[Event]:
        for event in events[:1000]:
            pulled.append(1)
            yield event

    def on_offers(offers: list[dict[str, object]]) -> None:
        calls.append((len(pulled), len(offers)))
        assert all("campaign_key" in offer for offer in offers)

    result = run_backtest(source(), campaigns(), batch_size=300, on_offers=on_offers, config=CONFIG)
    assert [pulled for pulled, _ in calls] == [300, 600, 900, 1000]
    offers = sum(c["offers"] for c in orjson.loads(report_bytes(result))["campaigns"].values())
    assert sum(n for _, n in calls) == offers > 0


def test_a_closed_loop_world_can_feed_events_back(events: list[Event]) -> None:
    """The hook's reaction reaches the engine through the source: purchases after offers."""
    queue: list[Event] = []
    sent: set[str] = set()

    def source() -> Iterator[Event]:
        for event in events[:1500]:
            while queue:
                yield queue.pop(0)
            yield event

    def world(offers: list[dict[str, object]]) -> None:
        for offer in offers:
            user, ts = str(offer["user_id"]), int(offer["issued_at"])  # type: ignore[call-overload]
            if user in sent:
                continue
            sent.add(user)
            queue.append(
                parse_event(
                    {
                        "event_id": f"world-{offer['offer_id']}",
                        "user_id": user,
                        "type": "purchase",
                        "ts": ts + 1000,
                        "order_id": f"w-{offer['offer_id']}",
                        "items": [
                            {"item_id": "i1", "category": "books", "price": 9.0, "quantity": 1}
                        ],
                        "amount": 9.0,
                        "offer_id": offer["offer_id"],
                    }
                )
            )

    closed = run_backtest(
        source(), campaigns(holdout=0.0), batch_size=100, on_offers=world, config=CONFIG
    )
    opened = run_backtest(events[:1500], campaigns(holdout=0.0), batch_size=100, config=CONFIG)
    assert closed.events > opened.events
    closed_c = orjson.loads(report_bytes(closed))["campaigns"]
    opened_c = orjson.loads(report_bytes(opened))["campaigns"]
    assert closed_c["threshold"]["conversion_treated"] > opened_c["threshold"]["conversion_treated"]
    assert closed_c["threshold"]["uplift"] is None
    assert "holdout" in closed_c["threshold"]["reason"]
    assert closed_c["threshold"]["incremental_margin"] is None


def test_campaign_sets_run_in_their_own_engines(events: list[Event]) -> None:
    alone, _ = run(events)
    both, raw = run(events, sets={"a": campaigns(), "b": campaigns(holdout=0.5)})
    single = orjson.loads(report_bytes(alone))["campaigns"]
    paired = orjson.loads(report_bytes(both))
    assert sorted(paired["campaigns"]) == ["a/profit", "a/threshold", "b/profit", "b/threshold"]
    assert set(paired["models"]) == {"a", "b"}
    for name, section in single.items():
        twin = dict(paired["campaigns"][f"a/{name}"])
        assert twin.pop("campaign_set") == "a"
        assert {**section, "campaign_set": None} == {**twin, "campaign_set": None}
    assert paired["campaigns"]["b/profit"]["holdout_fraction"] == 0.5
    keys = {orjson.loads(line)["campaign_key"] for line in raw.splitlines()}
    assert keys == set(paired["campaigns"])


def test_extra_sections_are_placed_in_the_report(baseline: tuple[BacktestResult, bytes]) -> None:
    table = [{"policy": "profit", "incremental_margin": 1.5, "oracle_margin": 2.0, "regret": 0.5}]
    report = build_report(baseline[0], inputs={}, extra={"simulation": {"regret": table}})
    assert orjson.loads(dumps_report(report))["simulation"]["regret"] == table
    with pytest.raises(BacktestError, match="campaigns"):
        build_report(baseline[0], inputs={}, extra={"campaigns": {}})


def test_bad_arguments_are_backtest_errors(events: list[Event]) -> None:
    with pytest.raises(BacktestError, match="batch_size"):
        run_backtest(events, campaigns(), batch_size=0)
    with pytest.raises(BacktestError, match="at least one campaign"):
        run_backtest(events, {"a": ()})


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), batch_size=st.integers(1, 900))
def test_any_seed_and_batch_size_keep_budgets_and_determinism(seed: int, batch_size: int) -> None:
    events = SMALL
    first, _ = run(events, seed=seed, batch_size=batch_size)
    again, _ = run(events, seed=seed, batch_size=batch_size)
    assert report_bytes(first) == report_bytes(again)
    for section in orjson.loads(report_bytes(first))["campaigns"].values():
        per_day: dict[int, float] = {}
        for day, _, spent in section["budget_burn"]:
            per_day[day] = spent
        assert all(spent <= section["daily_budget"] + 1e-9 for spent in per_day.values())
        assert section["spend"] <= section["committed_spend"]


SMALL = sim(events=800, seed=9)


def test_the_report_warns_when_most_decisions_are_still_pending() -> None:
    # 3,000 events 4 s apart span most 30-minute windows; the same world (same shoppers and
    # sessions) at a 50 ms population gap squeezes 3,000 events into a few minutes, which
    # leaves nearly every window open.
    spread = build_report(run(sim())[0], inputs={"file": "sim.jsonl"})
    squeezed_events = [
        parse_event(e) for e in open_loop(users=80, events=3000, seed=5, mean_gap_ms=50)
    ]
    squeezed = build_report(run(squeezed_events)[0], inputs={"file": "sim.jsonl"})
    assert squeezed["pending_decisions"] / squeezed["decisions"] > 0.2
    assert any("still pending" in w for w in squeezed["warnings"])
    assert spread["pending_decisions"] / spread["decisions"] <= 0.2
    assert not any("still pending" in w for w in spread["warnings"])


def test_the_model_as_served_is_the_logged_p_purchase_against_the_label(
    baseline: tuple[BacktestResult, bytes],
) -> None:
    result, raw = baseline
    labelled, _ = split_log(result, raw)
    expected = ModelStats()
    for decision in labelled:
        expected.update(float(decision["p_purchase"]), int(decision["reward"]))
    model = build_report(result, inputs={"file": "sim.jsonl"})["model"]
    served, want = model["served"], expected.summary()
    # Same pairs, summed in label order there and log order here: equal up to rounding.
    assert served["auc"] == want["auc"] and served["label_rate"] == want["label_rate"]
    assert served["log_loss"] == pytest.approx(want["log_loss"], rel=1e-12)
    assert served["ece"] == pytest.approx(want["ece"], rel=1e-9, abs=1e-12)
    assert [(b["bin"], b["count"]) for b in served["calibration"]] == [
        (b["bin"], b["count"]) for b in want["calibration"]
    ]
    assert model["served"]["n_labels"] == model["n_labels"] == len(labelled) > 0
