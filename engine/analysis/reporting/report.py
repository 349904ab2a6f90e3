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

from engine.analysis.backtest.fairness import fairness_section
from engine.analysis.backtest.metrics import ModelStats
from engine.analysis.backtest.qini import QiniSetup, qini_section
from engine.analysis.backtest.runner import BacktestError, BacktestResult, GroupResult
from engine.analysis.backtest.stop_loss import stop_loss_section
from engine.analysis.backtest.uplift import holdout_power, uplift_section
from engine.analysis.reporting.verdict import ranking_section
from engine.campaigns import Campaign
from engine.stop_loss import StopLossStatus

REPORT_VERSION = 3
"""2: Qini ranked by the served uplift score (IPW on exploring decisions), ``fairness``,
``holdout_power``, ``ranking``, ``itt.incremental_margin_ci95``. 3: ``stop_loss``."""
SIGNIFICANT_DIGITS = 6
DEFAULT_MARGIN = 0.3
"""Gross margin assumed for campaigns whose policy optimises none (``Policy.optimised_margin``
is None: every built-in policy but ``profit``)."""
BURN_POINTS = 300


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
    margin = campaign.policy.optimised_margin()
    return margin if margin is not None else DEFAULT_MARGIN


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
    uplift = uplift_section(stats, margin, holdout_fraction=campaign.holdout)
    policy = campaign.policy
    setup = QiniSetup(
        policy=policy.name,
        epsilon=policy.exploration_rate(),
        holdout=campaign.holdout,
        exploring_decisions=stats.exploring_decisions,
    )
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
            "conversion": (
                stats.untreated_converted / stats.untreated_n if stats.untreated_n else None
            ),
        },
        **uplift,
        "holdout_power": holdout_power(
            stats, (uplift["itt"] or {}).get("uplift"), campaign.holdout
        ).to_json(),
        "spend": stats.spend_cents / 100,
        "committed_spend": stats.committed_spend_cents / 100,
        "discount_distribution": [
            {"discount_pct": d, "count": n} for d, n in sorted(stats.discounts.items())
        ],
        "budget_burn": [
            [day, ts, cents / 100] for day, ts, cents in stats.burn.series(BURN_POINTS)
        ],
        "qini": qini_section(stats.uplift, setup),
        "segments": segments,
        "fairness": fairness_section(stats.fairness, campaign.max_disparity),
        "propensity_below_one": stats.propensity_below_one,
        "stop_loss": stop_loss_section(
            campaign,
            group.stop_loss.get(campaign.name),
            group.engine.stop_loss.get(campaign.name, StopLossStatus()),
            non_holdout_decisions=treated_decisions,
            stopped_decisions=stats.stopped_decisions,
            stopped_offers=stats.stopped_offers,
            end_ms=group.engine.clock_ms,
        ),
        "ope": ope[0],
        **({"ope_reason": ope[1]} if ope[0] is None else {}),
    }


PENDING_WARNING_SHARE = 0.2


def _longer_input(report: Mapping[str, Any]) -> str:
    """The setting that makes a run span more than the attribution window."""
    if "simulated" in (report.get("input") or {}):
        return "simulate more events (`--simulate USERS:EVENTS`)"
    return (
        "use an input that spans more than the attribution window, or shorten "
        "DEALSTREAM_ATTRIBUTION_WINDOW_S"
    )


def _fairness_warnings(campaigns: Mapping[str, Any]) -> list[str]:
    warnings = []
    for key, section in campaigns.items():
        fairness = section["fairness"]
        for name in fairness["flagged"]:
            found = fairness["dimensions"][name]
            ratio = "infinite" if found["zero_rate"] else f"{found['disparity']:.2f}"
            warnings.append(
                f"{key}: offer-rate disparity across {name} segments is {ratio} "
                f"({found['highest']} vs {found['lowest']}), above its max_disparity "
                f"{fairness['max_disparity']:g}"
            )
    return warnings


def _stop_loss_warnings(campaigns: Mapping[str, Any]) -> list[str]:
    warnings = []
    for key, section in campaigns.items():
        stop_loss = section.get("stop_loss")
        if not stop_loss or not stop_loss["stops"]:
            continue
        share = stop_loss["stopped_share"] or 0.0
        warnings.append(
            f"{key}: the stop-loss stopped the campaign {stop_loss['stops']} time(s); "
            f"{share:.0%} of its non-holdout decisions were made while stopped (only "
            f"{stop_loss['explore']:.0%} of the policy's offers went out), so its figures "
            "mix the policy with exploration: see the stop-loss section."
        )
    return warnings


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
            f"metrics over labelled decisions overstate conversion: {_longer_input(report)}."
        )
    labels = report["model"].get("n_labels") or 0
    if labels and report["model"].get("auc") is None:
        warnings.append(
            "every labelled decision has the same outcome, so no AUC can be computed: "
            f"{_longer_input(report)}."
        )
    warnings.extend(_fairness_warnings(report["campaigns"]))
    warnings.extend(_stop_loss_warnings(report["campaigns"]))
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
    no_ope: tuple[Any, str | None] = (
        None,
        "no off-policy estimates for this run: they are computed from the decision log that "
        "`dealstream backtest --in FILE` writes (a `--simulate` run writes none)",
    )
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
        if name in report or name == "ranking":
            raise BacktestError(f"extra report section {name!r} would replace a built-in one")
        report[name] = section
    simulation = report.get("simulation")
    report["ranking"] = ranking_section(
        campaigns, simulation if isinstance(simulation, Mapping) else None
    )
    return report
