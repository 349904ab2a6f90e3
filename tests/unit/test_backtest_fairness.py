"""Fairness section: offer rates per segment, activity quintiles, disparity and its limit."""

from __future__ import annotations

import pytest

from engine.analysis.backtest.fairness import (
    ACTIVITY_EXACT,
    MAX_CATEGORIES,
    MIN_DECISIONS,
    OTHER,
    FairnessCounts,
    OfferCounts,
    SegmentRate,
    activity_bin,
    activity_bin_range,
    activity_count,
    activity_quintiles,
    disparity,
    exceeds,
    fairness_section,
)


def test_activity_is_the_sum_of_the_thirty_day_counts() -> None:
    features = {
        "view_count_30d": 7.0,
        "cart_count_30d": 2.0,
        "favorite_count_30d": 1.0,
        "search_count_30d": 3.0,
        "purchase_count_30d": 1.0,
        "view_count_7d": 100.0,  # other windows do not count
    }
    assert activity_count(features) == 14 and activity_count({}) == 0


def test_activity_bins_are_exact_then_geometric_and_their_ranges_tile() -> None:
    assert activity_bin(0) == 0 and activity_bin(ACTIVITY_EXACT - 1) == ACTIVITY_EXACT - 1
    assert activity_bin(ACTIVITY_EXACT) == ACTIVITY_EXACT
    assert activity_bin(2 * ACTIVITY_EXACT) == ACTIVITY_EXACT + 8  # eight bins per doubling
    previous_high = ACTIVITY_EXACT - 1
    for index in range(ACTIVITY_EXACT, ACTIVITY_EXACT + 40):
        low, high = activity_bin_range(index)
        assert low == previous_high + 1 and low <= high
        assert activity_bin(low) == index == activity_bin(high)
        previous_high = high


def counts(decisions: int, offers: int, discount: float = 10.0) -> OfferCounts:
    return OfferCounts(decisions, offers, discount * offers)


def test_quintiles_split_decisions_by_activity_without_splitting_a_bin() -> None:
    # 100 decisions at activity 0..99, one each: quintiles of 20, edges at 20, 40, ...
    even = {a: counts(1, int(a >= 50)) for a in range(100)}
    groups = activity_quintiles(even)
    assert [g.segment for g in groups] == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    assert [g.decisions for g in groups] == [20] * 5
    assert [g.activity for g in groups] == [(0, 19), (20, 39), (40, 59), (60, 79), (80, 99)]
    assert [g.offer_rate for g in groups] == [0.0, 0.0, 0.5, 1.0, 1.0]
    # One activity value holds 60 % of decisions: its middle falls in Q3, so it is Q3 alone
    # and Q2 (and Q1's share beyond the small bins) stay empty.
    lumpy = {0: counts(10, 1), 1: counts(10, 1), 2: counts(60, 6), 3: counts(20, 2)}
    assert [(g.segment, g.decisions) for g in activity_quintiles(lumpy)] == [
        ("Q1", 20),
        ("Q3", 60),
        ("Q5", 20),
    ]
    assert activity_quintiles({}) == []


def rate(segment: str, decisions: int, offers: int) -> SegmentRate:
    return SegmentRate.of(segment, counts(decisions, offers))


def test_disparity_is_highest_over_lowest_among_large_enough_segments() -> None:
    found = disparity([rate("a", 100, 50), rate("b", 100, 20), rate("tiny", 5, 0)])
    assert found.ratio == pytest.approx(2.5) and found.compared == 2
    assert found.highest is not None and found.highest.segment == "a"
    assert found.lowest is not None and found.lowest.segment == "b"
    assert exceeds(found, 3.0) is False and exceeds(found, 2.0) is True
    assert exceeds(found, None) is None


def test_a_zero_rate_is_an_infinite_disparity_that_exceeds_any_limit() -> None:
    found = disparity([rate("a", 100, 50), rate("b", 100, 0)])
    assert found.ratio is None and found.zero_rate
    assert exceeds(found, 1000.0) is True
    nothing = disparity([rate("a", 100, 0), rate("b", 100, 0)])
    assert (
        nothing.ratio is None
        and not nothing.zero_rate
        and nothing.reason == ("no offers in any segment")
    )
    assert exceeds(nothing, 2.0) is None
    alone = disparity([rate("a", 100, 10), rate("b", MIN_DECISIONS - 1, 0)])
    assert alone.ratio is None and "fewer than two segments" in (alone.reason or "")


def test_section_flags_the_dimensions_above_max_disparity() -> None:
    fairness = FairnessCounts()
    for index in range(200):
        returning = index % 2 == 0
        features = {
            "purchase_count_30d": 1.0 if returning else 0.0,
            "view_count_30d": float(index),
        }
        # Returning customers get every offer; new ones one in ten.
        granted = returning or index % 20 == 1
        category = "shoes" if index < 100 else None
        fairness.add(features, category, granted, 10.0 if granted else 0.0)
    section = fairness_section(fairness, max_disparity=3.0)
    customer = section["dimensions"]["customer"]
    assert [s["segment"] for s in customer["segments"]] == ["new", "returning"]
    assert customer["disparity"] == pytest.approx(10.0)
    assert customer["highest"] == "returning" and customer["exceeds"] is True
    assert customer["highest_offer_rate"] == 1.0 and customer["lowest_offer_rate"] == 0.1
    category = section["dimensions"]["category"]
    assert {s["segment"] for s in category["segments"]} == {"shoes", "(none)"}
    assert section["flagged"] == ["customer"]
    activity = section["dimensions"]["activity"]["segments"]
    assert [s["segment"] for s in activity] == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    # purchase_count_30d counts as activity too: returning users have one event more.
    assert activity[0]["activity_min"] == 1 and activity[-1]["activity_max"] == 199
    unchecked = fairness_section(fairness, max_disparity=None)
    assert unchecked["flagged"] == [] and unchecked["dimensions"]["customer"]["exceeds"] is None


def test_categories_beyond_the_cap_are_pooled() -> None:
    fairness = FairnessCounts()
    for index in range(MAX_CATEGORIES + 5):
        fairness.add({}, f"c{index}", False, 0.0)
    assert len(fairness.category) == MAX_CATEGORIES + 1
    assert fairness.category[OTHER].decisions == 5
