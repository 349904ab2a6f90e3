"""Qini curves of the served uplift scores on hand-computable sets: IPW and holdout."""

from __future__ import annotations

import pytest

from engine.analysis.backtest.qini import (
    QINI_POINTS,
    UPLIFT_BINS,
    QiniSetup,
    UpliftBins,
    ipw_qini,
    qini_section,
    sample_curve,
    score_bin,
)


def test_score_bins_cover_minus_one_to_one_in_thousandths() -> None:
    assert score_bin(-1.0) == 0 and score_bin(1.0) == UPLIFT_BINS - 1
    assert score_bin(0.0) == 1000 and score_bin(0.0015) == 1001
    assert score_bin(-7.0) == 0 and score_bin(3.0) == UPLIFT_BINS - 1


def test_ipw_qini_on_four_decisions_by_hand() -> None:
    bins = UpliftBins()
    # score 0.3, e = 0.5: offered and converted (T/e = 2), unoffered without purchase.
    bins.add(0.3, False, True, 0.5, 1)
    bins.add(0.3, False, False, 0.5, 0)
    # score 0.1, e = 0.25: offered without purchase (T/e = 4), unoffered and converted
    # ((1-T)/(1-e) = 4/3).
    bins.add(0.1, False, True, 0.25, 0)
    bins.add(0.1, False, False, 0.25, 1)
    # Not exploring (deterministic, or holdout): left out of the IPW pool.
    bins.add(0.5, False, True, 1.0, 1)
    bins.add(0.5, True, False, 0.0, 0)
    curve = ipw_qini(bins)
    assert curve is not None and curve.method == "ipw"
    assert (curve.decisions, curve.treated, curve.control) == (4, 2, 2)
    # Top half (score 0.3): N_T = 2, Y_T = 2, N_C = 2, Y_C = 0 -> gain 2.
    # Everyone: N_T = 6, Y_T = 2, N_C = 10/3, Y_C = 4/3 -> 2 - 4/3 * 6 / (10/3) = -0.4.
    assert len(curve.points) == QINI_POINTS
    assert curve.points[50] == pytest.approx((0.5, 2.0))
    assert curve.points[25] == pytest.approx((0.25, 1.0))
    assert curve.points[-1] == pytest.approx((1.0, -0.4))
    # AUUC: 0.5 * 2 / 2 + 0.5 * (2 - 0.4) / 2 = 0.9; random area -0.2; normalised by 0.4.
    assert curve.auuc == pytest.approx(0.9)
    assert curve.coefficient == pytest.approx(1.1)
    assert curve.normalised == pytest.approx(2.75)


def test_a_chosen_offer_a_guardrail_denied_counts_as_treated() -> None:
    """The offer probability is that of the policy's choice, so the treatment is the choice:
    weighting a denied offer as untreated would use the wrong probability."""
    bins = UpliftBins()
    bins.add(0.2, False, True, 0.9, 1)
    bins.add(0.1, False, False, 0.9, 0, denied=True)
    bins.add(0.0, False, False, 0.9, 1)
    assert (bins.ipw_treated, bins.ipw_untreated) == (2, 1)
    section = qini_section(bins, QiniSetup("profit", 0.1, 0.0, 3))
    assert section["denied"] == 1 and "1 of the 2 treated" in section["note"]


def test_ipw_wins_over_holdout_and_needs_both_arms() -> None:
    bins = UpliftBins()
    bins.add(0.2, False, True, 0.9, 1)
    assert ipw_qini(bins) is None  # offered exploring decisions only
    bins.add(0.1, True, False, 0.0, 0)
    setup = QiniSetup("profit", 0.1, 0.1, 5)
    assert qini_section(bins, setup)["method"] == "holdout"
    bins.add(0.0, False, False, 0.9, 0)
    section = qini_section(bins, setup)
    assert section["method"] == "ipw" and section["decisions"] == 2
    assert "note" not in section


def test_missing_curve_says_which_setting_gives_one() -> None:
    empty = UpliftBins()
    deterministic = qini_section(empty, QiniSetup("linear", None, 0.0, 0))
    assert deterministic["points"] == [] and deterministic["auuc"] is None
    assert (
        "deterministic" in deterministic["reason"] and "`holdout = 0.1`" in deterministic["reason"]
    )
    no_epsilon = qini_section(empty, QiniSetup("profit", 0.0, 0.0, 0))["reason"]
    assert "`epsilon` is 0" in no_epsilon and "`epsilon` > 0" in no_epsilon
    pending = qini_section(empty, QiniSetup("profit", 0.1, 0.0, 12))["reason"]
    assert "12 exploring decisions" in pending and "longer input" in pending
    holdout_pending = qini_section(empty, QiniSetup("threshold", None, 0.2, 0))["reason"]
    assert "no holdout decision is labelled yet" in holdout_pending


def test_the_curve_stays_at_zero_until_a_control_decision_is_ranked() -> None:
    bins = UpliftBins()
    bins.add(0.5, False, True, 0.5, 1)  # the top bin: offered only, converted
    bins.add(0.1, False, True, 0.5, 1)
    bins.add(0.1, False, False, 0.5, 1)
    curve = ipw_qini(bins)
    assert curve is not None
    # Every label is 1: offering changes nothing measurable, so the curve is flat at 0.
    assert all(y == pytest.approx(0.0) for _, y in curve.points)
    assert curve.normalised is None


def test_sample_curve_interpolates_and_holds_the_last_value() -> None:
    points = sample_curve([(0.0, 0.0), (0.5, 1.0), (1.0, 1.0)])
    assert points[10] == pytest.approx((0.1, 0.2)) and points[100] == (1.0, 1.0)
