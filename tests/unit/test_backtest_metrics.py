"""The backtest's aggregates on hand-made numbers: uplift, Qini, budget burn, rounding."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.backtest.metrics import QINI_BINS, BudgetBurn, CampaignStats, ModelStats
from engine.backtest.report import canonical, dumps_report, qini_curve, uplift_section
from engine.backtest.runner import BacktestError, drive
from engine.prequential import roc_auc


def stats_with(treated: tuple[int, int], holdout: tuple[int, int]) -> CampaignStats:
    stats = CampaignStats("c")
    for index in range(treated[0]):
        stats.on_label(
            (index, False, True, 150, 30.0, 0.5, (), f"t{index}"), int(index < treated[1])
        )
    for index in range(holdout[0]):
        stats.on_label((index, True, False, 0, 0.0, 0.5, (), f"h{index}"), int(index < holdout[1]))
    return stats


def test_uplift_interval_and_incremental_margin_by_hand() -> None:
    stats = stats_with(treated=(200, 50), holdout=(100, 20))
    out = uplift_section(stats, margin=0.3)
    assert out["conversion_treated"] == 0.25 and out["conversion_holdout"] == 0.2
    assert out["uplift"] == pytest.approx(0.05)
    se = math.sqrt(0.25 * 0.75 / 200 + 0.2 * 0.8 / 100)
    assert out["uplift_ci95"] == pytest.approx([0.05 - 1.959964 * se, 0.05 + 1.959964 * se])
    # 50 converted offers cost 1.50 each; 10 incremental purchases of 30.00 at 30 % margin.
    assert stats.spend_cents == 50 * 150
    assert out["incremental_conversions"] == pytest.approx(10.0)
    assert out["incremental_margin"] == pytest.approx(10 * 30.0 * 0.3 - 75.0)
    assert out["itt"]["uplift"] == pytest.approx(0.05)  # no untreated decisions here


def test_intent_to_treat_counts_every_non_holdout_decision() -> None:
    stats = stats_with(treated=(100, 10), holdout=(100, 20))
    for index in range(300):  # non-holdout decisions without an offer, 30 % convert
        stats.on_label((index, False, False, 0, 0.0, 0.5, (), f"u{index}"), int(index % 10 < 3))
    out = uplift_section(stats, margin=0.3)
    assert out["uplift"] == pytest.approx(0.1 - 0.2)
    itt = out["itt"]
    assert itt["labelled"] == 400 and itt["converted"] == 100
    assert itt["uplift"] == pytest.approx(0.25 - 0.2)
    assert itt["incremental_conversions"] == pytest.approx(20.0)
    assert itt["incremental_margin"] == pytest.approx(20 * 30.0 * 0.3 - 15.0)


def test_by_user_intervals_widen_when_a_users_decisions_move_together() -> None:
    independent = uplift_section(stats_with(treated=(200, 50), holdout=(200, 40)), margin=0.3)
    naive = independent["uplift_ci95"]
    by_user = independent["uplift_by_user"]
    assert by_user["users"] == 200 and by_user["holdout_users"] == 200
    # One decision per user: the clustered interval is the naive one (up to G / (G - 1)).
    assert by_user["ci95"][1] - by_user["ci95"][0] == pytest.approx(naive[1] - naive[0], rel=0.01)
    clustered = CampaignStats("c")
    for index in range(200):  # 20 users with 10 decisions each, all converting or none
        user = f"t{index // 10}"
        clustered.on_label((index, False, True, 150, 30.0, 0.5, (), user), int(index // 10 < 5))
        user = f"h{index // 10}"
        clustered.on_label((index, True, False, 0, 0.0, 0.5, (), user), int(index // 10 < 4))
    out = uplift_section(clustered, margin=0.3)
    assert out["uplift"] == pytest.approx(0.05)
    width = out["uplift_by_user"]["ci95"][1] - out["uplift_by_user"]["ci95"][0]
    assert width > 2.5 * (out["uplift_ci95"][1] - out["uplift_ci95"][0])
    assert out["uplift_by_user"]["users"] == 20


def test_no_holdout_gives_nulls_with_a_reason() -> None:
    out = uplift_section(stats_with(treated=(10, 3), holdout=(0, 0)), margin=0.3)
    assert out["uplift"] is None and out["incremental_margin"] is None
    assert out["uplift_ci95"] is None and "holdout" in out["reason"]
    assert out["conversion_treated"] == 0.3


def test_qini_curve_ranks_by_p_purchase_and_ends_at_the_total_gain() -> None:
    stats = CampaignStats("c")
    # High scores: offers convert, holdout does not; low scores: both convert half the time.
    for i in range(100):
        stats.on_label((i, False, True, 100, 20.0, 0.9, (), "a"), 1)
        stats.on_label((i, True, False, 0, 0.0, 0.9, (), "b"), 0)
        stats.on_label((i, False, True, 100, 20.0, 0.1, (), "a"), i % 2)
        stats.on_label((i, True, False, 0, 0.0, 0.1, (), "b"), i % 2)
    curve = qini_curve(stats)
    points = curve["points"]
    assert len(points) == 101 and points[0] == [0.0, 0.0]
    assert points[50][1] == pytest.approx(100.0)  # the top half holds every extra purchase
    assert points[-1][1] == pytest.approx(100.0)
    assert curve["coefficient"] > 0
    assert sum(stats.qini_treated[:QINI_BINS]) == 200


def test_budget_burn_is_bounded_and_keeps_each_days_total() -> None:
    burn = BudgetBurn(max_points=40)
    rng = random.Random(3)
    totals: dict[int, int] = {}
    ts = 0
    for _ in range(5000):
        ts += rng.randrange(1, 120_000)
        day = ts // 86_400_000
        cents = rng.randrange(1, 500)
        totals[day] = totals.get(day, 0) + cents
        burn.add(day, ts, cents)
        assert len(burn.points) <= 40
    series = burn.series(20)
    assert len(series) <= 20
    assert [p[1] for p in series] == sorted(p[1] for p in series)
    assert {day: cents for day, _, cents in series} == totals


def test_model_stats_match_the_reference_auc_and_log_loss() -> None:
    rng = random.Random(1)
    pairs = [(rng.random(), int(rng.random() < 0.3)) for _ in range(500)]
    stats = ModelStats()
    for p, y in pairs:
        stats.update(p, y)
    summary = stats.summary()
    assert summary["auc"] == roc_auc(pairs)
    expected = -sum(math.log(p if y else 1 - p) for p, y in pairs) / len(pairs)
    assert summary["log_loss"] == pytest.approx(expected)
    assert summary["n_labels"] == 500
    assert ModelStats().summary()["auc"] is None


def test_canonical_rounds_to_six_significant_digits() -> None:
    assert canonical({"b": 1 / 3, "a": [2e-9 / 3, 123456789.0, float("nan"), -0.0, 5]}) == {
        "b": 0.333333,
        "a": [6.66667e-10, 123457000.0, None, 0.0, 5],
    }
    assert dumps_report({"b": 1, "a": 2}).startswith(b'{\n  "a"')


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1), st.booleans(), st.booleans(), st.booleans()), max_size=60)
)
def test_label_counts_always_add_up(decisions: list[tuple[float, bool, bool, bool]]) -> None:
    stats = CampaignStats("c")
    for seq, (p, holdout, granted, label) in enumerate(decisions):
        stats.on_label(
            (seq, holdout, granted and not holdout, 10, 5.0, p, ("s",), str(seq % 7)), int(label)
        )
    assert stats.treated_n + stats.holdout_n + stats.untreated_n == len(decisions)
    assert sum(stats.qini_treated[:QINI_BINS]) == stats.treated_n
    assert sum(stats.qini_holdout[QINI_BINS:]) == stats.holdout_converted
    assert stats.spend_cents == 10 * stats.treated_converted


def test_a_suspending_engine_is_refused() -> None:
    class Suspends:
        def __await__(self):  # type: ignore[no-untyped-def]
            yield None

    async def waits() -> int:
        await Suspends()
        return 1

    with pytest.raises(BacktestError, match="in-memory"):
        drive(waits())
