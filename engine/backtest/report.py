"""``report.json``: a deterministic summary of a backtest (see ``docs/backtest.md``).

Everything here is a pure function of the ``BacktestResult`` and the caller's input
description: no wall clock, no absolute paths, sorted keys and floats rounded to
``SIGNIFICANT_DIGITS`` significant digits, so the same input and seed give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from engine.backtest.metrics import (
    HOLDOUT,
    QINI_BINS,
    TREATED,
    UNTREATED,
    CampaignStats,
    ModelStats,
)
from engine.backtest.runner import BacktestError, BacktestResult, GroupResult
from engine.campaigns import Campaign
from engine.policy import ProfitPolicy

REPORT_VERSION = 1
SIGNIFICANT_DIGITS = 6
DEFAULT_MARGIN = 0.3
"""Gross margin assumed for campaigns whose policy has none (every policy but ``profit``)."""
BURN_POINTS = 300
QINI_POINTS = 101
Z95 = 1.959964


def canonical(value: Any) -> Any:
    """``value`` with every float rounded to 6 significant digits (NaN/inf become None)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
        return 0.0 if rounded == 0 else rounded
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def dumps_report(report: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a report: sorted keys, rounded floats, two-space indent."""
    return (
        orjson.dumps(canonical(dict(report)), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
        + b"\n"
    )


def campaign_margin(campaign: Campaign) -> float:
    policy = campaign.policy
    return policy.margin if isinstance(policy, ProfitPolicy) else DEFAULT_MARGIN


def _rate(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def clustered_variance(pairs: list[tuple[int, int]]) -> tuple[float, int] | None:
    """Variance of the pooled rate sum(y) / sum(n) over clusters (users) of (n, y), and the
    number of clusters; None with fewer than two clusters.

    Cluster-robust (sandwich) estimate: G / (G - 1) * sum_g (y_g - p n_g)^2 / (sum n)^2.
    """
    clusters = [(n, y) for n, y in pairs if n]
    if len(clusters) < 2:
        return None
    total = sum(n for n, _ in clusters)
    rate = sum(y for _, y in clusters) / total
    g = len(clusters)
    spread = math.fsum((y - rate * n) ** 2 for n, y in clusters)
    return g / (g - 1) * spread / total**2, g


def by_user_interval(
    stats: CampaignStats, offsets: tuple[int, ...], diff: float
) -> dict[str, Any] | None:
    """95 % interval of ``diff`` (a group's rate minus the holdout's) with users as clusters."""
    group = clustered_variance(
        [
            (sum(c[o] for o in offsets), sum(c[o + 1] for o in offsets))
            for c in stats.by_user.values()
        ]
    )
    holdout = clustered_variance([(c[HOLDOUT], c[HOLDOUT + 1]) for c in stats.by_user.values()])
    if group is None or holdout is None:
        return None
    se = math.sqrt(group[0] + holdout[0])
    return {
        "ci95": [diff - Z95 * se, diff + Z95 * se],
        "users": group[1],
        "holdout_users": holdout[1],
    }


def uplift_section(stats: CampaignStats, margin: float) -> dict[str, Any]:
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
        out["reason"] = (
            "no labelled holdout decisions (campaign holdout is 0 or too small)"
            if ph is None
            else "no labelled treated decisions (no offers granted or all pending)"
        )
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
    """
    n = stats.treated_n + stats.untreated_n
    converted = stats.treated_converted + stats.untreated_converted
    nh = stats.holdout_n
    if not n:
        return {"labelled": 0, "converted": 0, "conversion": None, "uplift": None}
    rate = converted / n
    uplift = rate - holdout_rate
    se = math.sqrt(rate * (1 - rate) / n + holdout_rate * (1 - holdout_rate) / nh)
    return {
        "labelled": n,
        "converted": converted,
        "conversion": rate,
        "uplift": uplift,
        "uplift_ci95": [uplift - Z95 * se, uplift + Z95 * se],
        "incremental_conversions": uplift * n,
        "incremental_margin": uplift * n * margin_per_order - spend,
        "uplift_by_user": by_user_interval(stats, (TREATED, UNTREATED), uplift),
    }


def qini_curve(stats: CampaignStats) -> dict[str, Any]:
    """Incremental conversions when targeting the top fraction by recorded P(purchase).

    Treated and holdout decisions are pooled and ranked by the decision's ``p_purchase``
    (highest first, in 0.001-wide bins); at each fraction phi of that pool, the curve is
    treated conversions - holdout conversions * treated count / holdout count, both within
    the top phi. ``random`` is the straight line to the last point; ``coefficient`` is the
    area between the curve and that line (fraction of the pool on x).
    """
    treated, holdout = stats.qini_treated, stats.qini_holdout
    total = stats.treated_n + stats.holdout_n
    if not stats.treated_n or not stats.holdout_n:
        return {"ranked_by": "p_purchase", "points": [], "coefficient": None}
    cumulative: list[tuple[float, float]] = [(0.0, 0.0)]
    nt = ct = nh = ch = 0
    for b in range(QINI_BINS - 1, -1, -1):
        if not treated[b] and not holdout[b]:
            continue
        nt += treated[b]
        ct += treated[QINI_BINS + b]
        nh += holdout[b]
        ch += holdout[QINI_BINS + b]
        gain = ct - (ch * nt / nh if nh else 0.0)
        cumulative.append(((nt + nh) / total, gain))
    points: list[list[float]] = []
    cursor = 0
    for step in range(QINI_POINTS):
        phi = step / (QINI_POINTS - 1)
        while cursor + 1 < len(cumulative) and cumulative[cursor + 1][0] <= phi + 1e-12:
            cursor += 1
        if cursor + 1 < len(cumulative):
            (x0, y0), (x1, y1) = cumulative[cursor], cumulative[cursor + 1]
            y = y0 + (y1 - y0) * (phi - x0) / (x1 - x0)
        else:
            y = cumulative[cursor][1]
        points.append([phi, y])
    final = points[-1][1]
    area = math.fsum(
        (points[i][1] + points[i + 1][1]) / 2 * (points[i + 1][0] - points[i][0])
        for i in range(len(points) - 1)
    )
    return {"ranked_by": "p_purchase", "points": points, "coefficient": area - final / 2}


def campaign_section(
    group: GroupResult, index: int, pending: dict[str, int], ope: tuple[Any, str | None]
) -> dict[str, Any]:
    campaign, stats = group.campaigns[index], group.stats[index]
    margin = campaign_margin(campaign)
    treated_decisions = stats.decisions - stats.holdout_decisions
    segments = [
        {
            "segment": name,
            "decisions": seg.decisions,
            "offers": seg.offers,
            "offer_rate": seg.offers / seg.decisions if seg.decisions else None,
            "mean_discount_pct": seg.discount_sum / seg.offers if seg.offers else None,
            "labelled": seg.labelled,
            "conversion": seg.converted / seg.labelled if seg.labelled else None,
        }
        for name, seg in sorted(stats.segments.items())
    ]
    budget = campaign.daily_budget_cents
    return {
        "campaign": campaign.name,
        "campaign_set": group.name or None,
        "policy": campaign.policy.name,
        "holdout_fraction": campaign.holdout,
        "daily_budget": budget / 100 if budget is not None else None,
        "seed": campaign.seed,
        "decisions": stats.decisions,
        "holdout_decisions": stats.holdout_decisions,
        "offers": stats.offers,
        "offer_rate": stats.offers / treated_decisions if treated_decisions else None,
        "denied": dict(sorted(stats.denied.items())),
        "pending": {**pending, "total": sum(pending.values())},
        "untreated": {
            "labelled": stats.untreated_n,
            "converted": stats.untreated_converted,
            "conversion": _rate(stats.untreated_converted, stats.untreated_n),
        },
        **uplift_section(stats, margin),
        "spend": stats.spend_cents / 100,
        "committed_spend": stats.committed_spend_cents / 100,
        "discount_distribution": [
            {"discount_pct": d, "count": n} for d, n in sorted(stats.discounts.items())
        ],
        "budget_burn": [
            [day, ts, cents / 100] for day, ts, cents in stats.burn.series(BURN_POINTS)
        ],
        "qini": qini_curve(stats),
        "segments": segments,
        "propensity_below_one": stats.propensity_below_one,
        "ope": ope[0],
        **({"ope_reason": ope[1]} if ope[0] is None else {}),
    }


PENDING_WARNING_SHARE = 0.2


def report_warnings(report: Mapping[str, Any]) -> list[str]:
    """What a reader must know before trusting the rates: said in the report, not only in docs."""
    warnings: list[str] = []
    decisions = int(report["decisions"])
    pending = int(report["pending_decisions"])
    if decisions and pending / decisions > PENDING_WARNING_SHARE:
        warnings.append(
            f"{pending / decisions:.0%} of decisions are still pending at the end of the input "
            "(their attribution window is open). A purchase labels a decision at once, while "
            "'no purchase' waits for the whole window, so the rates, the uplift and the model's "
            "metrics over labelled decisions overstate conversion. Use an input that spans "
            "more than the attribution window."
        )
    labels = report["model"].get("n_labels") or 0
    if labels and report["model"].get("auc") is None:
        warnings.append("every labelled decision has the same outcome: no AUC can be computed")
    return warnings


def build_report(
    result: BacktestResult,
    *,
    inputs: Mapping[str, Any],
    ope: Mapping[str, tuple[Any, str | None]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report dict (before ``canonical``); ``extra`` sections are placed at the top level.

    ``inputs`` describes the input and campaign files (names and sha256, never absolute
    paths). ``ope`` maps a campaign key to (off-policy section, None) or (None, why not).
    """
    campaigns: dict[str, Any] = {}
    models: dict[str, Any] = {}
    pooled = ModelStats()
    served = ModelStats()
    no_ope: tuple[Any, str | None] = (None, "no off-policy estimates were computed")
    for group in result.groups:
        pending = group.pending_by_campaign()
        for index, key in enumerate(group.keys):
            section_ope = (ope or {}).get(key, no_ope)
            campaigns[key] = campaign_section(group, index, pending[index], section_ope)
        pooled.merge(group.model)
        served.merge(group.served)
        if len(result.groups) > 1:
            models[group.name] = {**group.model.summary(), "served": group.served.summary()}
    span_s = (
        (result.last_ts - result.first_ts) / 1000
        if result.first_ts is not None and result.last_ts is not None
        else 0.0
    )
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "seed": result.seed,
        "batch_size": result.batch_size,
        "input": dict(inputs),
        "events": result.events,
        "events_by_kind": dict(sorted(result.events_by_kind.items())),
        "event_statuses": dict(sorted(result.statuses.items())),
        "event_time": {"first_ts": result.first_ts, "last_ts": result.last_ts, "span_s": span_s},
        "events_per_second": result.events / span_s if span_s > 0 else None,
        "decisions": sum(c["decisions"] for c in campaigns.values()),
        "offers": sum(c["offers"] for c in campaigns.values()),
        "discount_spend": math.fsum(c["spend"] for c in campaigns.values()),
        "committed_spend": math.fsum(c["committed_spend"] for c in campaigns.values()),
        "pending_decisions": sum(c["pending"]["total"] for c in campaigns.values()),
        "model": {**pooled.summary(), "served": served.summary()},
        "campaigns": campaigns,
    }
    report["warnings"] = report_warnings(report)
    if models:
        report["models"] = models
    for name, section in (extra or {}).items():
        if name in report:
            raise BacktestError(f"extra report section {name!r} would replace a built-in one")
        report[name] = section
    return report
