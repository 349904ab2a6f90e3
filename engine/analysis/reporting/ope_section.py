"""The report's ``ope`` section: constant-discount alternatives estimated from the backtest's log.

For a campaign that explored (some logged propensity < 1), each constant discount of its
ladder (or 0 and the levels it offered) is evaluated with ``engine.analysis.ope.evaluate.estimate``
(IPS, SNIPS, DR with bootstrap intervals, seeded by the backtest's seed) on the campaign's
labelled, non-holdout decisions: the value is the conversion rate per decision the constant
policy would have had. Holdout decisions are left out because the policy never acts on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

from engine.analysis.backtest.runner import BacktestResult
from engine.analysis.ope.decision_log import read_decision_log
from engine.analysis.ope.errors import OpeError
from engine.analysis.ope.evaluate import estimate
from engine.analysis.ope.targets import ConstantTarget
from engine.campaigns import Campaign

OPE_BOOTSTRAP = 200
OpeSection = tuple[dict[str, Any] | None, str | None]
"""(section, None) or (None, why there is none)."""


def _levels(campaign: Campaign, offered: Iterable[float]) -> list[float]:
    """The policy's own ladder, or 0 and the levels it offered."""
    levels = campaign.policy.discount_levels()
    if levels.is_ladder:
        return sorted(levels.levels)
    return sorted({0.0, *offered})


def campaign_ope(
    lines: Iterable[bytes], campaign: Campaign, offered: Sequence[float], seed: int
) -> OpeSection:
    """Estimates for one campaign from its decision-log lines (decision v1 + reward)."""
    log = read_decision_log(lines)
    records = [record for record in log.records if not record.holdout]
    if not records:
        return None, "no labelled non-holdout decisions to reweight"
    targets = []
    for level in _levels(campaign, offered):
        try:
            report = estimate(records, ConstantTarget(level), seed=seed, n_bootstrap=OPE_BOOTSTRAP)
        except OpeError as exc:
            targets.append({"target": f"constant:{level:g}", "error": str(exc)})
            continue
        result = report.to_dict()
        targets.append(
            {
                "target": f"constant:{level:g}",
                "ips": result["ips"],
                "snips": result["snips"],
                "dr": result["dr"],
                "ess": result["ess"],
                "supported": result["supported"],
                "warnings": result["warnings"],
            }
        )
    return {
        "reward": "conversion within the attribution window (per decision)",
        "records": len(records),
        "logged_value": sum(r.reward for r in records) / len(records),
        "n_bootstrap": OPE_BOOTSTRAP,
        "seed": seed,
        "targets": targets,
    }, None


def ope_sections(
    result: BacktestResult, log_lines: Callable[[], Iterable[bytes]]
) -> dict[str, OpeSection]:
    """Per campaign key; ``log_lines()`` returns a fresh iterable of the decision log's lines."""
    sections: dict[str, OpeSection] = {}
    for group in result.groups:
        for key, campaign, stats in zip(group.keys, group.campaigns, group.stats, strict=True):
            if not stats.propensity_below_one:
                sections[key] = (
                    None,
                    "every logged propensity is 1 (no exploration): nothing to reweight",
                )
                continue
            marker = b'"campaign_key":' + orjson.dumps(key) + b","
            lines = (line for line in log_lines() if marker in line)
            offered = [d for d in stats.discounts if d > 0]
            sections[key] = campaign_ope(lines, campaign, offered, result.seed)
    return sections
