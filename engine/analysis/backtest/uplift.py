"""Uplift against the holdout: conversion rates, intervals, incremental margin, and how large
a holdout has to be for the interval to say anything.

Decisions of one user move together, so the intervals to trust treat users as clusters
(``by_user_interval``); the independent normal interval is kept beside them for reference.
See ``docs/backtest.md`` for every definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.analysis.backtest.metrics import HOLDOUT, TREATED, UNTREATED, CampaignStats
from engine.stop_loss import ArmSums

Z95 = 1.959964
ASSUMED_RELATIVE_UPLIFT = 0.1
"""Smallest effect a holdout is sized for: 10 % of the conversion rate."""
SUGGESTED_HOLDOUT = 0.1


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def clustered_variance(pairs: list[tuple[int, int]]) -> tuple[float, int] | None:
    """Variance of the pooled rate sum(y) / sum(n) over clusters (users) of (n, y), and the
    number of clusters; None with fewer than two clusters.

    Cluster-robust (sandwich) estimate: G / (G - 1) * sum_g (y_g - p n_g)^2 / (sum n)^2, the
    stop-loss's own (``engine.stop_loss.ArmSums``).
    """
    sums = ArmSums.of_clusters(pairs)
    found = sums.mean_and_variance()
    return None if found is None else (found[1], sums.users)


def _group_pairs(stats: CampaignStats, offsets: tuple[int, ...]) -> list[tuple[int, int]]:
    return [
        (sum(c[o] for o in offsets), sum(c[o + 1] for o in offsets)) for c in stats.by_user.values()
    ]


def by_user_interval(
    stats: CampaignStats, offsets: tuple[int, ...], diff: float
) -> dict[str, Any] | None:
    """95 % interval of ``diff`` (a group's rate minus the holdout's) with users as clusters."""
    group = clustered_variance(_group_pairs(stats, offsets))
    holdout = clustered_variance([(c[HOLDOUT], c[HOLDOUT + 1]) for c in stats.by_user.values()])
    if group is None or holdout is None:
        return None
    se = math.sqrt(group[0] + holdout[0])
    return {
        "ci95": [diff - Z95 * se, diff + Z95 * se],
        "users": group[1],
        "holdout_users": holdout[1],
    }


def missing_uplift_reason(stats: CampaignStats, holdout_fraction: float) -> str:
    """Why a campaign has no uplift, and which setting gives it one."""
    if not stats.holdout_n:
        if holdout_fraction <= 0:
            return (
                "no holdout: the campaign's `holdout` is 0, so nothing shows what users do "
                f"without offers; set `holdout = {SUGGESTED_HOLDOUT:g}` in its TOML entry "
                "(holdout_power says how many holdout decisions the interval needs)"
            )
        return (
            f"no labelled holdout decision yet (holdout {holdout_fraction:g}: all pending, or "
            "too few users drawn): use a longer input or a larger `holdout`"
        )
    return "no labelled offered decisions (no offers granted, or all pending)"


def uplift_section(
    stats: CampaignStats, margin: float, *, holdout_fraction: float
) -> dict[str, Any]:
    """Treated vs holdout conversion, their difference with a 95 % interval, and margin."""
    nt, ct, nh, ch = (
        stats.treated_n,
        stats.treated_converted,
        stats.holdout_n,
        stats.holdout_converted,
    )
    pt, ph = _rate(ct, nt), _rate(ch, nh)
    spend = stats.spend_cents / 100
    mean_value = stats.treated_value_sum / nt if nt else None
    out: dict[str, Any] = {
        "conversion_treated": pt,
        "conversion_holdout": ph,
        "treated": {"labelled": nt, "converted": ct},
        "holdout": {"labelled": nh, "converted": ch},
        "mean_order_value": mean_value,
        "margin": margin,
        "uplift": None,
        "uplift_ci95": None,
        "uplift_by_user": None,
        "incremental_conversions": None,
        "incremental_margin": None,
        "itt": None,
    }
    if pt is None or ph is None:
        out["reason"] = missing_uplift_reason(stats, holdout_fraction)
        return out
    uplift = pt - ph
    se = math.sqrt(pt * (1 - pt) / nt + ph * (1 - ph) / nh)
    assert mean_value is not None
    incremental = uplift * nt
    out.update(
        uplift=uplift,
        uplift_ci95=[uplift - Z95 * se, uplift + Z95 * se],
        incremental_conversions=incremental,
        incremental_margin=incremental * mean_value * margin - spend,
        uplift_by_user=by_user_interval(stats, (TREATED,), uplift),
        itt=intent_to_treat(stats, ph, mean_value * margin, spend),
    )
    return out


def intent_to_treat(
    stats: CampaignStats, holdout_rate: float, margin_per_order: float, spend: float
) -> dict[str, Any]:
    """Every labelled non-holdout decision (offer or not) against the holdout.

    Both groups then contain all of a user's decisions, so the comparison is not skewed by
    which decisions the policy and guardrails picked for an offer (a purchase labels only the
    latest open decision, and offered decisions are often followed by unoffered ones).
    ``incremental_margin_ci95`` carries the by-user uplift interval (else the independent
    one) through the same formula as ``incremental_margin``.
    """
    n = stats.treated_n + stats.untreated_n
    converted = stats.treated_converted + stats.untreated_converted
    nh = stats.holdout_n
    if not n:
        return {"labelled": 0, "converted": 0, "conversion": None, "uplift": None}
    rate = converted / n
    uplift = rate - holdout_rate
    se = math.sqrt(rate * (1 - rate) / n + holdout_rate * (1 - holdout_rate) / nh)
    independent = [uplift - Z95 * se, uplift + Z95 * se]
    by_user = by_user_interval(stats, (TREATED, UNTREATED), uplift)
    low, high = by_user["ci95"] if by_user else independent
    return {
        "labelled": n,
        "converted": converted,
        "conversion": rate,
        "uplift": uplift,
        "uplift_ci95": independent,
        "incremental_conversions": uplift * n,
        "incremental_margin": uplift * n * margin_per_order - spend,
        "incremental_margin_ci95": [
            low * n * margin_per_order - spend,
            high * n * margin_per_order - spend,
        ],
        "uplift_by_user": by_user,
    }


@dataclass(frozen=True, slots=True)
class HoldoutPower:
    """How many labelled holdout decisions the intent-to-treat interval needs.

    The 95 % half-width is z * sqrt(D v / n + D v / n_h), v = p (1 - p): p the non-holdout
    conversion (standing in for the holdout's too), n the labelled non-holdout decisions,
    n_h the holdout's, D >= 1 the design effect of users as clusters (clustered over
    independent variance of the non-holdout rate). The half-width must fall below
    ``effect``: ``ASSUMED_RELATIVE_UPLIFT`` of p (the smallest effect worth resolving), or
    the observed ITT uplift when that is larger.

    - ``holdout_needed``: the smallest n_h at this run's n; ``share_needed`` = n_h / (n_h + n),
      the ``holdout`` to set for a run of the same length (None when no n_h suffices, i.e.
      D v / n alone is too wide);
    - ``labelled_needed``: labelled decisions a run needs in all with holdout share
      ``planned_holdout`` (the campaign's, else ``SUGGESTED_HOLDOUT``):
      D v (1 / (1 - h) + 1 / h) (z / effect)^2, to compare with ``labelled`` +
      ``holdout_labelled``.
    """

    labelled: int
    holdout_labelled: int
    conversion: float | None = None
    effect: float | None = None
    effect_source: str | None = None
    design_effect: float | None = None
    holdout_needed: int | None = None
    share_needed: float | None = None
    planned_holdout: float | None = None
    labelled_needed: int | None = None
    reason: str | None = None

    @property
    def enough(self) -> bool | None:
        if self.holdout_needed is None:
            return None
        return self.holdout_labelled >= self.holdout_needed

    def to_json(self) -> dict[str, Any]:
        return {
            "labelled": self.labelled,
            "holdout_labelled": self.holdout_labelled,
            "conversion": self.conversion,
            "effect": self.effect,
            "effect_source": self.effect_source,
            "design_effect": self.design_effect,
            "holdout_needed": self.holdout_needed,
            "share_needed": self.share_needed,
            "planned_holdout": self.planned_holdout,
            "labelled_needed": self.labelled_needed,
            "enough": self.enough,
            **({"reason": self.reason} if self.reason else {}),
        }


def holdout_power(
    stats: CampaignStats, observed_uplift: float | None, holdout_fraction: float
) -> HoldoutPower:
    """See ``HoldoutPower``; ``observed_uplift`` is the ITT uplift, None without a holdout."""
    n = stats.treated_n + stats.untreated_n
    nh = stats.holdout_n
    if not n:
        return HoldoutPower(n, nh, reason="no labelled non-holdout decision to plan from")
    p = (stats.treated_converted + stats.untreated_converted) / n
    variance = p * (1 - p)
    if variance == 0:
        return HoldoutPower(
            n,
            nh,
            conversion=p,
            reason=(
                f"every labelled non-holdout decision has the same outcome (conversion {p:.0%}),"
                " so there is no variance to plan with: the input is probably shorter than the "
                "attribution window (only purchases have labelled decisions yet)"
            ),
        )
    clustered = clustered_variance(_group_pairs(stats, (TREATED, UNTREATED)))
    design = max(1.0, clustered[0] / (variance / n)) if clustered else 1.0
    assumed = ASSUMED_RELATIVE_UPLIFT * p
    if observed_uplift is not None and abs(observed_uplift) >= assumed:
        effect, source = abs(observed_uplift), "observed ITT uplift"
    else:
        effect = assumed
        source = f"assumed: {ASSUMED_RELATIVE_UPLIFT * 100:g} % of the conversion rate" + (
            f"; the observed ITT uplift ({observed_uplift * 100:+.2f} points) is smaller"
            if observed_uplift is not None
            else ""
        )
    planned = holdout_fraction if 0 < holdout_fraction < 1 else SUGGESTED_HOLDOUT
    scale = design * variance * (Z95 / effect) ** 2
    total = math.ceil(scale * (1 / (1 - planned) + 1 / planned))
    room = (effect / Z95) ** 2 - design * variance / n
    needed = math.ceil(design * variance / room) if room > 0 else None
    return HoldoutPower(
        n,
        nh,
        p,
        effect,
        source,
        design,
        holdout_needed=needed,
        share_needed=needed / (needed + n) if needed is not None else None,
        planned_holdout=planned,
        labelled_needed=total,
        reason=(
            None
            if needed is not None
            else f"with {n:,} labelled non-holdout decisions no holdout is large enough: the "
            f"run is too short for an effect of {effect:.2%}"
        ),
    )
