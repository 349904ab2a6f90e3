"""Per-campaign and model aggregates of a backtest, bounded in memory.

A backtest may see millions of decisions; these aggregates keep counters, fixed-size bins and
thinned series only, so memory grows with the number of campaigns and segments, not with the
input. Decisions wait in ``GroupResult.open`` (an ``OpenDecision`` tuple each) only until
their label arrives, i.e. for at most the attribution window of event time.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.analysis.backtest.fairness import FairnessCounts
from engine.analysis.backtest.qini import UpliftBins
from engine.model.prequential import CalibrationBins, log_loss, roc_auc

BURN_BUCKET_MS = 60_000
"""Initial time resolution of the budget-burn series; doubled whenever it holds too many."""
BURN_MAX_POINTS = 1200
"""Points the budget-burn series may hold while running (thinned to the report's limit)."""


@dataclass(slots=True)
class ModelStats:
    """Prequential metrics over every label of a run: each prediction is made before learning.

    The metrics are those of the learner's window (``engine.model.prequential``: ``log_loss``,
    ``roc_auc``, ``CalibrationBins``), over the whole run. Predictions and labels are kept
    compactly (9 bytes per label) because an exact ROC AUC needs the full ranking; log loss
    and calibration are running sums. The log loss is summed as labels come, not with
    ``math.fsum`` over the stored predictions like the window's: that sum is what report.json
    has always shown, and an exact sum would move its last bits.
    """

    scores: array[float] = field(default_factory=lambda: array("d"))
    labels: bytearray = field(default_factory=bytearray)
    log_loss_sum: float = 0.0
    calibration: CalibrationBins = field(default_factory=CalibrationBins)

    def update(self, p: float, label: int) -> None:
        self.scores.append(p)
        self.labels.append(label)
        self.log_loss_sum += log_loss(p, label)
        self.calibration.add(p, label)

    def merge(self, other: ModelStats) -> None:
        self.scores.extend(other.scores)
        self.labels.extend(other.labels)
        self.log_loss_sum += other.log_loss_sum
        self.calibration.merge(other.calibration)

    def summary(self) -> dict[str, object]:
        """``auc``, ``log_loss``, ``ece``, ``n_labels`` and the calibration bins (JSON-ready)."""
        n = len(self.labels)
        if not n:
            return {"auc": None, "log_loss": None, "ece": None, "n_labels": 0, "calibration": []}
        return {
            "auc": roc_auc(zip(self.scores, self.labels, strict=True)),
            "log_loss": self.log_loss_sum / n,
            "ece": self.calibration.ece(),
            "n_labels": n,
            "label_rate": sum(self.labels) / n,
            "calibration": self.calibration.rows(),
        }


@dataclass(slots=True)
class Segment:
    decisions: int = 0
    """Non-holdout decisions in the segment."""
    offers: int = 0
    discount_sum: float = 0.0
    labelled: int = 0
    converted: int = 0


class BudgetBurn:
    """Cumulative committed spend within each event-time day, thinned to bounded points.

    One point per time bucket (the latest wins); when the series grows past ``max_points``
    the bucket doubles and the series is re-thinned, so memory is bounded and the result is
    a deterministic function of the offers.
    """

    def __init__(self, max_points: int = BURN_MAX_POINTS) -> None:
        self.max_points = max_points
        self.bucket_ms = BURN_BUCKET_MS
        self.points: list[tuple[int, int, int]] = []  # (day, ts, cumulative cents in day)
        self._day = -1
        self._cumulative = 0

    def add(self, day: int, ts: int, cents: int) -> None:
        if day != self._day:
            self._day, self._cumulative = day, 0
        self._cumulative += cents
        point = (day, ts, self._cumulative)
        last = self.points[-1] if self.points else None
        if (
            last is not None
            and last[0] == day
            and last[1] // self.bucket_ms == ts // self.bucket_ms
        ):
            self.points[-1] = point
        else:
            self.points.append(point)
            if len(self.points) > self.max_points:
                self._thin(self.max_points // 2)

    def _thin(self, limit: int) -> None:
        while len(self.points) > limit:
            self.bucket_ms *= 2
            kept: list[tuple[int, int, int]] = []
            for point in self.points:
                if (
                    kept
                    and kept[-1][0] == point[0]
                    and (kept[-1][1] // self.bucket_ms == point[1] // self.bucket_ms)
                ):
                    kept[-1] = point
                else:
                    kept.append(point)
            self.points = kept

    def series(self, limit: int) -> list[tuple[int, int, int]]:
        """At most ``limit`` points (the latest in each bucket, so day totals survive)."""
        if len(self.points) > limit:
            self._thin(limit)
        return list(self.points)


class OpenDecision(NamedTuple):
    """A decision waiting for its label (a tuple: there may be a window's worth of them)."""

    seq: int
    """Position in processing order (index into ``BacktestResult.rewards``)."""
    holdout: bool
    granted: bool
    cost_cents: int
    value: float
    """Order value the discount applies to."""
    p_purchase: float
    segments: tuple[str, ...]
    user_id: str
    uplift_score: float
    offer_propensity: float
    denied: bool
    """A guardrail denied the offer the policy chose (so the decision went without one)."""


# Offsets into a user's counters: [treated n, converted, untreated n, converted, holdout n,
# converted].
TREATED = 0
UNTREATED = 2
HOLDOUT = 4


@dataclass(slots=True)
class CampaignStats:
    """Everything the report needs about one campaign, updated decision by decision."""

    key: str
    decisions: int = 0
    holdout_decisions: int = 0
    offers: int = 0
    committed_spend_cents: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    discounts: dict[float, int] = field(default_factory=dict)
    """Non-holdout decisions by final discount (0 = no offer)."""
    treated_n: int = 0
    treated_converted: int = 0
    holdout_n: int = 0
    holdout_converted: int = 0
    untreated_n: int = 0
    untreated_converted: int = 0
    spend_cents: int = 0
    """Cost of offers whose decision converted: the discount the shop actually paid."""
    treated_value_sum: float = 0.0
    segments: dict[str, Segment] = field(default_factory=dict)
    uplift: UpliftBins = field(default_factory=UpliftBins)
    """Labelled decisions by served uplift score, for the Qini curves."""
    exploring_decisions: int = 0
    """Decisions made with an offer propensity strictly between 0 and 1."""
    fairness: FairnessCounts = field(default_factory=FairnessCounts)
    """Non-holdout decisions and offers by customer, trigger category and activity."""
    propensity_below_one: int = 0
    stopped_decisions: int = 0
    """Non-holdout decisions made while the campaign's stop-loss held it to exploration."""
    stopped_offers: int = 0
    """... and the offers among them (the explored share that passed the guardrails)."""
    burn: BudgetBurn = field(default_factory=BudgetBurn)
    by_user: dict[str, list[int]] = field(default_factory=dict)
    """Labelled decisions and conversions per user and group: decisions of one user are not
    independent, so intervals are computed over users (cluster-robust)."""

    def segment(self, name: str) -> Segment:
        found = self.segments.get(name)
        if found is None:
            found = self.segments[name] = Segment()
        return found

    def on_label(self, opened: OpenDecision, label: int) -> None:
        """Book the label of a decision that was waiting for it."""
        holdout, granted = opened.holdout, opened.granted
        counts = self.by_user.get(opened.user_id)
        if counts is None:
            counts = self.by_user[opened.user_id] = [0, 0, 0, 0, 0, 0]
        group = HOLDOUT if holdout else TREATED if granted else UNTREATED
        counts[group] += 1
        counts[group + 1] += label
        self.uplift.add(
            opened.uplift_score, holdout, granted, opened.offer_propensity, label, opened.denied
        )
        if holdout:
            self.holdout_n += 1
            self.holdout_converted += label
            return
        if granted:
            self.treated_n += 1
            self.treated_converted += label
            self.treated_value_sum += opened.value
            if label:
                self.spend_cents += opened.cost_cents
        else:
            self.untreated_n += 1
            self.untreated_converted += label
        for name in opened.segments:
            segment = self.segment(name)
            segment.labelled += 1
            segment.converted += label


def _p_segment_name(decile: int) -> str:
    return f"p_purchase:{decile / 10:.1f}-{(decile + 1) / 10:.1f}"


_P_SEGMENTS = tuple(_p_segment_name(decile) for decile in range(10))
"""The names of the deciles of a probability, built once (one per decision is looked up)."""


def p_segment(p: float) -> str:
    """The P(purchase) decile a decision falls in, as a segment name."""
    decile = min(int(p * 10), 9)
    return _P_SEGMENTS[decile] if decile >= 0 else _p_segment_name(decile)
