"""Who gets offers: offer rate and mean discount per segment, and how far apart the rates are.

Three dimensions, over a campaign's non-holdout decisions (the holdout never gets offers):

- ``customer``: new vs returning (``purchase_count_30d`` > 0 in the decision's features);
- ``category``: the trigger event's category (the first ``MAX_CATEGORIES`` seen are tracked,
  later ones count as ``(other)``; a search without a category is ``(none)``);
- ``activity``: quintiles of the user's 30-day event count (``ACTIVITY_FIELDS`` summed).
  Counts are kept in fine fixed bins (exact below ``ACTIVITY_EXACT``, eighth-octave bins
  above), and the quintile edges are drawn at report time; a bin is never split, so a value
  shared by many decisions can leave a quintile larger than a fifth, or empty.

For each dimension the disparity is the highest offer rate over the lowest, among segments
with at least ``MIN_DECISIONS`` decisions. A zero lowest rate (with a non-zero highest) has
no finite ratio: ``disparity`` is then None, ``zero_rate`` true, and it exceeds any
``max_disparity``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ACTIVITY_FIELDS = (
    "view_count_30d",
    "cart_count_30d",
    "favorite_count_30d",
    "search_count_30d",
    "purchase_count_30d",
)
ACTIVITY_EXACT = 1000
"""Activity counts below this have a bin each; above, bins are 2^(1/8) wide."""
MAX_CATEGORIES = 200
MIN_DECISIONS = 30
"""Segments with fewer decisions are listed but left out of the disparity ratio."""
OTHER, NONE = "(other)", "(none)"
DIMENSIONS = ("customer", "category", "activity")


@dataclass(slots=True)
class OfferCounts:
    decisions: int = 0
    offers: int = 0
    discount_sum: float = 0.0

    def add(self, granted: bool, discount: float) -> None:
        self.decisions += 1
        if granted:
            self.offers += 1
            self.discount_sum += discount

    def merge(self, other: OfferCounts) -> None:
        self.decisions += other.decisions
        self.offers += other.offers
        self.discount_sum += other.discount_sum


def activity_count(features: Mapping[str, float]) -> int:
    """The user's events over 30 days, from a decision's features."""
    get = features.get
    total: float = 0  # added as ``sum`` adds (from int 0, left to right), without a generator
    for name in ACTIVITY_FIELDS:
        total += get(name, 0.0)
    return max(round(total), 0)


def activity_bin(count: int) -> int:
    if count < ACTIVITY_EXACT:
        return count
    return ACTIVITY_EXACT + int(8 * math.log2(count / ACTIVITY_EXACT))


def activity_bin_range(index: int) -> tuple[int, int]:
    """The smallest and largest activity count in a bin."""
    if index < ACTIVITY_EXACT:
        return index, index
    octave = index - ACTIVITY_EXACT
    low = math.ceil(ACTIVITY_EXACT * 2 ** (octave / 8))
    high = math.ceil(ACTIVITY_EXACT * 2 ** ((octave + 1) / 8)) - 1
    while activity_bin(low) < index:  # float edges: settle on the bin's own counts
        low += 1
    while activity_bin(high + 1) == index:
        high += 1
    return low, high


@dataclass(slots=True)
class FairnessCounts:
    """Per-segment decisions, offers and discounts of one campaign (bounded)."""

    customer: dict[str, OfferCounts] = field(default_factory=dict)
    category: dict[str, OfferCounts] = field(default_factory=dict)
    activity: dict[int, OfferCounts] = field(default_factory=dict)

    def add(
        self,
        features: Mapping[str, float],
        category: str | None,
        granted: bool,
        discount: float,
    ) -> None:
        """Book one non-holdout decision."""
        returning = features.get("purchase_count_30d", 0.0) > 0
        _counts(self.customer, "returning" if returning else "new").add(granted, discount)
        name = NONE if category is None else category
        if name not in self.category and len(self.category) >= MAX_CATEGORIES:
            name = OTHER
        _counts(self.category, name).add(granted, discount)
        _counts(self.activity, activity_bin(activity_count(features))).add(granted, discount)


def _counts(table: dict[Any, OfferCounts], key: Any) -> OfferCounts:
    found = table.get(key)
    if found is None:
        found = table[key] = OfferCounts()
    return found


@dataclass(frozen=True, slots=True)
class SegmentRate:
    segment: str
    decisions: int
    offers: int
    offer_rate: float | None
    mean_discount_pct: float | None
    """Over offers."""
    activity: tuple[int, int] | None = None
    """Smallest and largest 30-day event count (activity quintiles only)."""

    @classmethod
    def of(
        cls, segment: str, counts: OfferCounts, activity: tuple[int, int] | None = None
    ) -> SegmentRate:
        return cls(
            segment,
            counts.decisions,
            counts.offers,
            counts.offers / counts.decisions if counts.decisions else None,
            counts.discount_sum / counts.offers if counts.offers else None,
            activity,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "segment": self.segment,
            "decisions": self.decisions,
            "offers": self.offers,
            "offer_rate": self.offer_rate,
            "mean_discount_pct": self.mean_discount_pct,
        }
        if self.activity is not None:
            out["activity_min"], out["activity_max"] = self.activity
        return out


def activity_quintiles(activity: Mapping[int, OfferCounts]) -> list[SegmentRate]:
    """Bins grouped into quintiles of decisions by activity: a bin goes to the quintile its
    middle decision falls in (``Q1`` least active); empty quintiles are left out."""
    total = sum(c.decisions for c in activity.values())
    groups: dict[int, tuple[OfferCounts, int, int]] = {}
    before = 0
    for index in sorted(activity):
        counts = activity[index]
        quintile = min(int((before + counts.decisions / 2) / total * 5), 4) if total else 0
        before += counts.decisions
        low, high = activity_bin_range(index)
        if quintile in groups:
            merged, first, _ = groups[quintile]
            merged.merge(counts)
            groups[quintile] = (merged, first, high)
        else:
            fresh = OfferCounts()
            fresh.merge(counts)
            groups[quintile] = (fresh, low, high)
    return [
        SegmentRate.of(f"Q{quintile + 1}", counts, (low, high))
        for quintile, (counts, low, high) in sorted(groups.items())
    ]


@dataclass(frozen=True, slots=True)
class Disparity:
    """Highest over lowest offer rate among segments with enough decisions."""

    ratio: float | None
    compared: int
    """Segments with at least ``MIN_DECISIONS`` decisions."""
    highest: SegmentRate | None = None
    lowest: SegmentRate | None = None
    zero_rate: bool = False
    """The lowest rate is 0 while the highest is not: the ratio is infinite."""
    reason: str | None = None


def disparity(segments: Iterable[SegmentRate], min_decisions: int = MIN_DECISIONS) -> Disparity:
    compared = [s for s in segments if s.decisions >= min_decisions and s.offer_rate is not None]
    if len(compared) < 2:
        return Disparity(
            None,
            len(compared),
            reason=(
                f"fewer than two segments with at least {min_decisions} decisions "
                "(a longer input gives more)"
            ),
        )
    # Ties keep the first segment in the listed order, so the result is deterministic.
    highest = max(compared, key=lambda s: s.offer_rate or 0.0)
    lowest = min(compared, key=lambda s: s.offer_rate or 0.0)
    high, low = highest.offer_rate or 0.0, lowest.offer_rate or 0.0
    if high == 0:
        return Disparity(None, len(compared), highest, lowest, reason="no offers in any segment")
    if low == 0:
        return Disparity(None, len(compared), highest, lowest, zero_rate=True)
    return Disparity(high / low, len(compared), highest, lowest)


def exceeds(found: Disparity, limit: float | None) -> bool | None:
    """Whether a disparity breaks the campaign's ``max_disparity`` (None: not checked)."""
    if limit is None or (found.ratio is None and not found.zero_rate):
        return None
    return found.zero_rate or (found.ratio is not None and found.ratio > limit)


def _dimension(segments: list[SegmentRate], limit: float | None) -> dict[str, Any]:
    found = disparity(segments)
    return {
        "segments": [s.to_json() for s in segments],
        "disparity": found.ratio,
        "zero_rate": found.zero_rate,
        "compared": found.compared,
        "highest": found.highest.segment if found.highest else None,
        "highest_offer_rate": found.highest.offer_rate if found.highest else None,
        "lowest": found.lowest.segment if found.lowest else None,
        "lowest_offer_rate": found.lowest.offer_rate if found.lowest else None,
        "exceeds": exceeds(found, limit),
        **({"reason": found.reason} if found.reason else {}),
    }


def fairness_section(counts: FairnessCounts, max_disparity: float | None) -> dict[str, Any]:
    """The campaign's ``fairness`` section (see the module docstring)."""
    categories = sorted(counts.category.items(), key=lambda item: (-item[1].decisions, item[0]))
    dimensions = {
        "customer": _dimension(
            [SegmentRate.of(name, c) for name, c in sorted(counts.customer.items())],
            max_disparity,
        ),
        "category": _dimension([SegmentRate.of(n, c) for n, c in categories], max_disparity),
        "activity": _dimension(activity_quintiles(counts.activity), max_disparity),
    }
    return {
        "max_disparity": max_disparity,
        "min_decisions": MIN_DECISIONS,
        "dimensions": dimensions,
        "flagged": [name for name in DIMENSIONS if dimensions[name]["exceeds"]],
    }
