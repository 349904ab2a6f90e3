"""Qini curves of the served uplift scores: does ranking by the model's uplift find the
decisions where an offer adds purchases?

Each labelled decision carries ``uplift_score`` (the model's P(purchase) at the proposed or
reference discount minus P without an offer, at decision time). Decisions are ranked by it,
highest first, in 0.001-wide bins (``UPLIFT_BINS`` over [-1, 1]), so memory is fixed however
many decisions there are. Two estimates, the first that has data wins:

- ``ipw``: decisions whose ``offer_propensity`` e is strictly between 0 and 1 (the profit
  policy's exploration). Treatment T = the policy chose an offer (granted, or denied by a
  guardrail afterwards: e is the probability of the choice, so T must be the choice too);
  each decision weighs T/e or (1-T)/(1-e), so the treated and untreated sums each stand for
  every decision in the bin. ``denied`` counts the chosen offers a guardrail withheld.
- ``holdout``: offered decisions against holdout decisions (unweighted), when a campaign
  never explores but has a holdout.

At each fraction phi of the ranked decisions the curve is Y_T - Y_C * N_T / N_C over the top
phi (N: weights or counts, Y: their conversions; 0 until a control decision is among them):
the purchases gained by offering the top phi instead of nobody. See ``docs/backtest.md``
for AUUC and the normalised coefficient.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

UPLIFT_BINS = 2000
"""Uplift-score resolution: [-1, 1] in 0.001-wide bins."""
QINI_POINTS = 101
"""Points of a reported curve: fractions 0, 0.01, ..., 1."""


def score_bin(score: float) -> int:
    """The bin of an uplift score in [-1, 1] (values outside are clamped)."""
    return min(max(int((score + 1.0) * (UPLIFT_BINS / 2)), 0), UPLIFT_BINS - 1)


def _ints() -> array[int]:
    return array("q", bytes(8 * UPLIFT_BINS))


def _floats() -> array[float]:
    return array("d", bytes(8 * UPLIFT_BINS))


@dataclass(slots=True)
class UpliftBins:
    """Labelled decisions by uplift-score bin, for both estimates (fixed size)."""

    treated_n: array[int] = field(default_factory=_ints)
    treated_y: array[int] = field(default_factory=_ints)
    holdout_n: array[int] = field(default_factory=_ints)
    holdout_y: array[int] = field(default_factory=_ints)
    ipw_n: array[int] = field(default_factory=_ints)
    """Exploring decisions per bin (0 < offer propensity < 1), offered or not."""
    ipw_wt: array[float] = field(default_factory=_floats)
    """Sum of T/e."""
    ipw_yt: array[float] = field(default_factory=_floats)
    """Sum of T*y/e."""
    ipw_wc: array[float] = field(default_factory=_floats)
    """Sum of (1-T)/(1-e)."""
    ipw_yc: array[float] = field(default_factory=_floats)
    """Sum of (1-T)*y/(1-e)."""
    ipw_treated: int = 0
    ipw_untreated: int = 0
    ipw_denied: int = 0
    """Exploring decisions whose chosen offer a guardrail denied (treated: the policy chose it)."""

    def add(
        self,
        score: float,
        holdout: bool,
        granted: bool,
        offer_propensity: float,
        label: int,
        denied: bool = False,
    ) -> None:
        """Book one labelled decision."""
        b = score_bin(score)
        if holdout:
            self.holdout_n[b] += 1
            self.holdout_y[b] += label
            return
        if granted:
            self.treated_n[b] += 1
            self.treated_y[b] += label
        e = offer_propensity
        if 0.0 < e < 1.0:
            self.ipw_n[b] += 1
            if granted or denied:
                self.ipw_treated += 1
                self.ipw_denied += denied
                self.ipw_wt[b] += 1.0 / e
                self.ipw_yt[b] += label / e
            else:
                self.ipw_untreated += 1
                self.ipw_wc[b] += 1.0 / (1.0 - e)
                self.ipw_yc[b] += label / (1.0 - e)


@dataclass(frozen=True, slots=True)
class QiniCurve:
    """A Qini curve sampled at ``QINI_POINTS`` fractions, and its areas.

    ``auuc``: area under the curve (fraction on x, incremental conversions on y);
    ``coefficient``: area between the curve and the random-targeting line from (0, 0) to
    (1, gain at 1); ``normalised``: ``coefficient / |gain at 1|``, None when that gain is 0.
    """

    method: str
    points: list[tuple[float, float]]
    auuc: float
    coefficient: float
    normalised: float | None
    decisions: int
    """Decisions ranked (the pool)."""
    treated: int
    control: int
    """Unoffered exploring decisions (ipw) or holdout decisions (holdout)."""


def sample_curve(steps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Cumulative (fraction, gain) steps, from (0, 0) to fraction 1, linearly interpolated at
    ``QINI_POINTS`` evenly spaced fractions (ties within a bin rise together)."""
    points: list[tuple[float, float]] = []
    cursor = 0
    for step in range(QINI_POINTS):
        phi = step / (QINI_POINTS - 1)
        while cursor + 1 < len(steps) and steps[cursor + 1][0] <= phi + 1e-12:
            cursor += 1
        if cursor + 1 < len(steps):
            (x0, y0), (x1, y1) = steps[cursor], steps[cursor + 1]
            y = y0 + (y1 - y0) * (phi - x0) / (x1 - x0)
        else:
            y = steps[cursor][1]
        points.append((phi, y))
    return points


def _curve(
    method: str, steps: list[tuple[float, float]], decisions: int, treated: int, control: int
) -> QiniCurve:
    points = sample_curve(steps)
    auuc = math.fsum(
        (points[i][1] + points[i + 1][1]) / 2 * (points[i + 1][0] - points[i][0])
        for i in range(len(points) - 1)
    )
    final = points[-1][1]
    coefficient = auuc - final / 2
    normalised = coefficient / abs(final) if final != 0 else None
    return QiniCurve(method, points, auuc, coefficient, normalised, decisions, treated, control)


def _steps(
    counts: array[int], columns: tuple[array[int] | array[float], ...], total: int
) -> list[tuple[float, float]]:
    """Walk the bins from the highest score down: (fraction of decisions, gain) per bin.

    ``columns`` = (N_T, Y_T, N_C, Y_C) per bin; the gain is Y_T - Y_C * N_T / N_C, and 0
    while no control has been seen (nothing to compare with yet, rather than a spike of
    every treated conversion).
    """
    wt_col, yt_col, wc_col, yc_col = columns
    steps = [(0.0, 0.0)]
    seen = 0
    wt = yt = wc = yc = 0.0
    for b in range(UPLIFT_BINS - 1, -1, -1):
        if not counts[b]:
            continue
        seen += counts[b]
        wt += wt_col[b]
        yt += yt_col[b]
        wc += wc_col[b]
        yc += yc_col[b]
        steps.append((seen / total, yt - yc * wt / wc if wc else 0.0))
    return steps


def ipw_qini(bins: UpliftBins) -> QiniCurve | None:
    """The inverse-propensity-weighted curve; None without both offered and unoffered
    exploring decisions."""
    if not bins.ipw_treated or not bins.ipw_untreated:
        return None
    total = bins.ipw_treated + bins.ipw_untreated
    columns = (bins.ipw_wt, bins.ipw_yt, bins.ipw_wc, bins.ipw_yc)
    steps = _steps(bins.ipw_n, columns, total)
    return _curve("ipw", steps, total, bins.ipw_treated, bins.ipw_untreated)


def holdout_qini(bins: UpliftBins) -> QiniCurve | None:
    """Offered against holdout decisions; None without both."""
    treated, holdout = sum(bins.treated_n), sum(bins.holdout_n)
    if not treated or not holdout:
        return None
    counts = array("q", (t + h for t, h in zip(bins.treated_n, bins.holdout_n, strict=True)))
    columns = (bins.treated_n, bins.treated_y, bins.holdout_n, bins.holdout_y)
    steps = _steps(counts, columns, treated + holdout)
    return _curve("holdout", steps, treated + holdout, treated, holdout)


@dataclass(frozen=True, slots=True)
class QiniSetup:
    """What a campaign could have produced a curve from, to explain a missing one."""

    policy: str
    epsilon: float | None
    """The profit policy's exploration rate; None for other policies."""
    holdout: float
    exploring_decisions: int
    """Decisions made with 0 < offer propensity < 1, labelled or not."""


def missing_reason(bins: UpliftBins, setup: QiniSetup) -> str:
    """Why neither curve exists, and which campaign setting would give one."""
    if setup.exploring_decisions:
        why = (
            f"none of its {setup.exploring_decisions:,} exploring decisions is labelled yet "
            "(attribution windows still open): use a longer input"
            if not bins.ipw_treated + bins.ipw_untreated
            else "its labelled exploring decisions are all "
            + ("offered" if bins.ipw_treated else "unoffered")
            + ": a longer input or a larger `epsilon` gives both"
        )
        return f"no Qini curve: {why}."
    if setup.policy == "profit":
        explore = (
            "`epsilon` is 0"
            if not setup.epsilon
            else "its ladder has no 0 level, so every decision offers something"
        )
    else:
        explore = f"the {setup.policy} policy is deterministic (offer probability 0 or 1)"
    if setup.holdout <= 0:
        holdout = "it has no holdout"
    elif not sum(bins.holdout_n):
        holdout = "no holdout decision is labelled yet"
    else:
        holdout = "no offered decision is labelled yet"
    return (
        f"no Qini curve: {explore} and {holdout}. Set `holdout = 0.1` in the campaign's "
        "TOML entry" + (", or `epsilon` > 0 (e.g. 0.1)" if setup.policy == "profit" else "") + "."
    )


def qini_section(bins: UpliftBins, setup: QiniSetup) -> dict[str, Any]:
    """The campaign's ``qini`` section: the IPW curve, else the holdout one, else why not."""
    curve = ipw_qini(bins) or holdout_qini(bins)
    if curve is None:
        return {
            "method": None,
            "ranked_by": "uplift_score",
            "points": [],
            "auuc": None,
            "coefficient": None,
            "normalised": None,
            "reason": missing_reason(bins, setup),
        }
    section: dict[str, Any] = {
        "method": curve.method,
        "ranked_by": "uplift_score",
        "points": [list(point) for point in curve.points],
        "auuc": curve.auuc,
        "coefficient": curve.coefficient,
        "normalised": curve.normalised,
        "decisions": curve.decisions,
        "treated": curve.treated,
        "control": curve.control,
    }
    if curve.method == "holdout":
        section["note"] = (
            "offered against holdout decisions: the policy never explored "
            "(no offer probability strictly between 0 and 1)"
        )
    else:
        section["denied"] = bins.ipw_denied
        if bins.ipw_denied:
            section["note"] = (
                f"{bins.ipw_denied:,} of the {curve.treated:,} treated decisions (the policy "
                "chose an offer) had it denied by a guardrail (cooldown, caps, budget): the "
                "curve measures choosing an offer, guardrails included"
            )
    return section
