"""The backtest's aggregates on hand-made numbers: uplift, power, Qini, budget burn, rounding."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.analysis.backtest.metrics import BudgetBurn, CampaignStats, ModelStats, OpenDecision
from engine.analysis.backtest.qini import QiniSetup, qini_section
from engine.analysis.backtest.uplift import Z95, holdout_power, uplift_section
from engine.analysis.reporting.report import canonical, dumps_report
from engine.model.prequential import roc_auc


def opened(
    seq: int,
    holdout: bool,
    granted: bool,
    user: str,
    *,
    cost: int = 0,
    value: float = 0.0,
    p: float = 0.5,
    score: float = 0.0,
    e: float | None = None,
    segments: tuple[str, ...] = (),
) -> OpenDecision:
    """A decision waiting for its label; deterministic policies by default (e = 0 or 1)."""
    propensity = e if e is not None else 0.0 if holdout else float(granted)
    return OpenDecision(
        seq, holdout, granted, cost, value, p, segments, user, score, propensity, False
    )


def stats_with(treated: tuple[int, int], holdout: tuple[int, int]) -> CampaignStats:
    stats = CampaignStats("c")
    for index in range(treated[0]):
        stats.on_label(
            opened(index, False, True, f"t{index}", cost=150, value=30.0),
            int(index < treated[1]),
        )
    for index in range(holdout[0]):
        stats.on_label(opened(index, True, False, f"h{index}"), int(index < holdout[1]))
    return stats


def test_uplift_interval_and_incremental_margin_by_hand() -> None:
    stats = stats_with(treated=(200, 50), holdout=(100, 20))
    out = uplift_section(stats, margin=0.3, holdout_fraction=0.3)
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
        stats.on_label(opened(index, False, False, f"u{index}"), int(index % 10 < 3))
    out = uplift_section(stats, margin=0.3, holdout_fraction=0.2)
    assert out["uplift"] == pytest.approx(0.1 - 0.2)
    itt = out["itt"]
    assert itt["labelled"] == 400 and itt["converted"] == 100
    assert itt["uplift"] == pytest.approx(0.25 - 0.2)
    assert itt["incremental_conversions"] == pytest.approx(20.0)
    assert itt["incremental_margin"] == pytest.approx(20 * 30.0 * 0.3 - 15.0)
    # The margin interval is the by-user uplift interval through the same formula.
    low, high = itt["uplift_by_user"]["ci95"]
    assert itt["incremental_margin_ci95"] == pytest.approx(
        [low * 400 * 9.0 - 15.0, high * 400 * 9.0 - 15.0]
    )


def test_by_user_intervals_widen_when_a_users_decisions_move_together() -> None:
    independent = uplift_section(
        stats_with(treated=(200, 50), holdout=(200, 40)), margin=0.3, holdout_fraction=0.5
    )
    naive = independent["uplift_ci95"]
    by_user = independent["uplift_by_user"]
    assert by_user["users"] == 200 and by_user["holdout_users"] == 200
    # One decision per user: the clustered interval is the naive one (up to G / (G - 1)).
    assert by_user["ci95"][1] - by_user["ci95"][0] == pytest.approx(naive[1] - naive[0], rel=0.01)
    clustered = CampaignStats("c")
    for index in range(200):  # 20 users with 10 decisions each, all converting or none
        treated = opened(index, False, True, f"t{index // 10}", cost=150, value=30.0)
        clustered.on_label(treated, int(index // 10 < 5))
        clustered.on_label(opened(index, True, False, f"h{index // 10}"), int(index // 10 < 4))
    out = uplift_section(clustered, margin=0.3, holdout_fraction=0.5)
    assert out["uplift"] == pytest.approx(0.05)
    width = out["uplift_by_user"]["ci95"][1] - out["uplift_by_user"]["ci95"][0]
    assert width > 2.5 * (out["uplift_ci95"][1] - out["uplift_ci95"][0])
    assert out["uplift_by_user"]["users"] == 20


def test_no_holdout_gives_nulls_with_a_reason_and_the_setting() -> None:
    out = uplift_section(
        stats_with(treated=(10, 3), holdout=(0, 0)), margin=0.3, holdout_fraction=0
    )
    assert out["uplift"] is None and out["incremental_margin"] is None
    assert out["uplift_ci95"] is None and "`holdout = 0.1`" in out["reason"]
    assert out["conversion_treated"] == 0.3
    late = uplift_section(
        stats_with(treated=(10, 3), holdout=(0, 0)), margin=0.3, holdout_fraction=0.2
    )
    assert "no labelled holdout decision yet" in late["reason"]


def test_holdout_power_by_hand() -> None:
    # 400 non-holdout decisions, one per user, 25 % convert; no holdout: the effect is
    # assumed at 10 % of 0.25 = 0.025. Half-width z sqrt(v/n + v/n_h) < 0.025 with
    # v = 0.1875 (design effect 1 up to G / (G - 1)).
    stats = CampaignStats("c")
    for index in range(400):
        stats.on_label(opened(index, False, index % 2 == 0, f"u{index}"), int(index % 4 == 0))
    power = holdout_power(stats, None, 0.0)
    d, v = 400 / 399, 0.1875
    assert power.conversion == 0.25 and power.effect == pytest.approx(0.025)
    assert power.design_effect == pytest.approx(d)
    # v / n alone (0.00047) exceeds (0.025 / z)^2 (0.000163): no holdout share can do it.
    assert power.holdout_needed is None and power.share_needed is None
    assert "too short" in (power.reason or "")
    # A run with the suggested 10 % holdout needs D v (1/0.9 + 1/0.1) (z / 0.025)^2 in all.
    assert power.planned_holdout == 0.1
    assert power.labelled_needed == math.ceil(d * v * (1 / 0.9 + 1 / 0.1) * (Z95 / 0.025) ** 2)

    # An observed ITT uplift of 0.1: n_h = D v / ((0.1 / z)^2 - D v / n).
    observed = holdout_power(stats, -0.1, 0.2)
    assert observed.planned_holdout == 0.2
    needed = math.ceil(d * v / ((0.1 / Z95) ** 2 - d * v / 400))
    assert observed.effect == pytest.approx(0.1) and observed.effect_source == "observed ITT uplift"
    # An observed uplift below the assumed 10 % of p does not shrink the effect to plan for.
    tiny = holdout_power(stats, 0.001, 0.2)
    assert tiny.effect == pytest.approx(0.025) and "+0.10 points" in (tiny.effect_source or "")
    assert observed.holdout_needed == needed
    assert observed.share_needed == pytest.approx(needed / (needed + 400))
    assert observed.enough is False and observed.to_json()["enough"] is False


def test_holdout_power_says_why_it_cannot_plan() -> None:
    assert holdout_power(CampaignStats("c"), None, 0.1).reason is not None
    same = CampaignStats("c")
    for index in range(50):  # the short-input case: only purchases have labels yet
        same.on_label(opened(index, False, True, f"u{index}"), 1)
    power = holdout_power(same, None, 0.0)
    assert power.holdout_needed is None and "attribution window" in (power.reason or "")


def test_clustered_users_raise_the_design_effect_and_the_holdout_needed() -> None:
    independent, clustered = CampaignStats("a"), CampaignStats("b")
    for index in range(400):
        label = int(index % 4 == 0)
        independent.on_label(opened(index, False, False, f"u{index}"), label)
        # 40 users of 10 decisions, each user converting all or nothing
        clustered.on_label(opened(index, False, False, f"u{index // 10}"), int(index // 40 == 0))
    a, b = holdout_power(independent, 0.2, 0.1), holdout_power(clustered, 0.2, 0.1)
    assert b.design_effect is not None and a.design_effect is not None
    assert b.design_effect > 5 * a.design_effect
    assert (b.holdout_needed or 0) > 5 * (a.holdout_needed or 0)


def test_holdout_qini_ranks_by_uplift_score_and_ends_at_the_total_gain() -> None:
    stats = CampaignStats("c")
    # High scores: offers convert, holdout does not; low scores: both convert half the time.
    for i in range(100):
        stats.on_label(opened(i, False, True, "a", cost=100, value=20.0, score=0.3), 1)
        stats.on_label(opened(i, True, False, "b", score=0.3), 0)
        stats.on_label(opened(i, False, True, "a", cost=100, value=20.0, score=-0.1), i % 2)
        stats.on_label(opened(i, True, False, "b", score=-0.1), i % 2)
    setup = QiniSetup("threshold", None, 0.5, 0)
    curve = qini_section(stats.uplift, setup)
    points = curve["points"]
    assert curve["method"] == "holdout" and curve["ranked_by"] == "uplift_score"
    assert len(points) == 101 and points[0] == [0.0, 0.0]
    assert points[50][1] == pytest.approx(100.0)  # the top half holds every extra purchase
    assert points[-1][1] == pytest.approx(100.0)
    # Area: the triangle up to 0.5 (25) plus the flat half (50); random: 100 / 2.
    assert curve["auuc"] == pytest.approx(75.0)
    assert curve["coefficient"] == pytest.approx(25.0)
    assert curve["normalised"] == pytest.approx(0.25)
    assert curve["decisions"] == 400 and sum(stats.uplift.treated_n) == 200


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
        decision = opened(
            seq,
            holdout,
            granted and not holdout,
            str(seq % 7),
            cost=10,
            value=5.0,
            p=p,
            score=2 * p - 1,
            e=None if seq % 3 else 0.5,
            segments=("s",),
        )
        stats.on_label(decision, int(label))
    assert stats.treated_n + stats.holdout_n + stats.untreated_n == len(decisions)
    bins = stats.uplift
    assert sum(bins.treated_n) == stats.treated_n
    assert sum(bins.holdout_y) == stats.holdout_converted
    assert sum(bins.ipw_n) == bins.ipw_treated + bins.ipw_untreated
    assert bins.ipw_treated + bins.ipw_untreated <= stats.treated_n + stats.untreated_n
    assert stats.spend_cents == 10 * stats.treated_converted
