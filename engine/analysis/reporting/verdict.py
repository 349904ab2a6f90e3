"""The report's ``ranking``: campaigns by incremental margin, and what to do, in one sentence.

The margin an analyst can act on is measured against a counterfactual:

- ``simulation`` (a closed-loop run): each policy's realised incremental margin against the
  world that got no offers, with 95 % interval +- 1.96 ``incremental_margin_sd``, next to
  the oracle's margin and the regret;
- ``holdout`` (a replayed file): the intent-to-treat incremental margin against the
  campaign's holdout, with the by-user 95 % interval.

The verdict is "run" only when the best campaign's interval lies above 0; "do_not_run" when
it lies below 0; "inconclusive" when it straddles 0; "unknown" when nothing could be ranked
(the sentence says which setting makes it computable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.analysis.backtest.uplift import SUGGESTED_HOLDOUT, Z95


@dataclass(frozen=True, slots=True)
class RankedCampaign:
    campaign: str
    policy: str
    offers: int
    incremental_margin: float | None
    ci95: tuple[float, float] | None
    oracle_incremental_margin: float | None = None
    regret: float | None = None
    reason: str | None = None
    """Why there is no margin (and what to set), or why it says little."""

    def to_json(self) -> dict[str, Any]:
        return {
            "campaign": self.campaign,
            "policy": self.policy,
            "offers": self.offers,
            "incremental_margin": self.incremental_margin,
            "ci95": list(self.ci95) if self.ci95 else None,
            "oracle_incremental_margin": self.oracle_incremental_margin,
            "regret": self.regret,
            **({"reason": self.reason} if self.reason else {}),
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: str
    """run | do_not_run | inconclusive | no_offers | unknown"""
    best: str | None
    sentence: str


def money(value: float, scale: float | None = None) -> str:
    """A signed amount for a sentence: +4,167 or -12.50 (cents only below 100 in ``scale``,
    which defaults to the value itself)."""
    big = abs(value if scale is None else scale) >= 100
    return f"{value:+,.0f}" if big else f"{value:+,.2f}"


def _with_ci(row: RankedCampaign) -> str:
    """The margin and its interval, all with the same precision."""
    assert row.incremental_margin is not None
    if row.ci95 is None:
        return money(row.incremental_margin)
    low, high = row.ci95
    scale = max(abs(row.incremental_margin), abs(low), abs(high))
    return f"{money(row.incremental_margin, scale)} [{money(low, scale)}, {money(high, scale)}]"


def simulation_rows(simulation: Mapping[str, Any]) -> list[RankedCampaign]:
    rows = []
    for policy in simulation.get("policies", []):
        margin, sd = policy["incremental_margin"], policy.get("incremental_margin_sd")
        name = str(policy["campaign"])
        rows.append(
            RankedCampaign(
                campaign=name,
                policy=str(policy["policy"]),
                offers=int(policy["offers"]),
                incremental_margin=margin,
                ci95=(margin - Z95 * sd, margin + Z95 * sd) if sd is not None else None,
                oracle_incremental_margin=policy.get("oracle_incremental_margin"),
                regret=policy.get("regret"),
                reason=None if int(policy["offers"]) else "made no offers",
            )
        )
    return rows


def holdout_rows(campaigns: Mapping[str, Any]) -> list[RankedCampaign]:
    rows = []
    for key, section in campaigns.items():
        itt = section.get("itt") or {}
        margin = itt.get("incremental_margin")
        ci = itt.get("incremental_margin_ci95")
        reason = None
        if margin is None:
            reason = section.get("reason") or "no intent-to-treat margin"
        rows.append(
            RankedCampaign(
                campaign=key,
                policy=str(section.get("policy")),
                offers=int(section.get("offers") or 0),
                incremental_margin=margin,
                ci95=(ci[0], ci[1]) if ci else None,
                reason=reason,
            )
        )
    return rows


def ranked(rows: Sequence[RankedCampaign]) -> list[RankedCampaign]:
    """Highest margin first; campaigns without one last, in their order."""
    measured = [r for r in rows if r.incremental_margin is not None]
    measured.sort(key=lambda r: -(r.incremental_margin or 0.0))
    return measured + [r for r in rows if r.incremental_margin is None]


def decide(
    rows: Sequence[RankedCampaign], *, basis: str, oracle: float | None, holdout_hint: str
) -> Verdict:
    """The one-sentence verdict over ranked rows (see the module docstring)."""
    against = "against no offers" if basis == "simulation" else "against its holdout"
    measured = [r for r in rows if r.incremental_margin is not None]
    if not measured:
        return Verdict(
            "unknown",
            None,
            "No campaign has labelled holdout decisions, so no incremental margin can be "
            f"computed: set `holdout = {SUGGESTED_HOLDOUT:g}` in the campaigns TOML"
            f"{holdout_hint}.",
        )
    active = [r for r in measured if r.offers > 0]
    unmeasured = [r.campaign for r in rows if r.incremental_margin is None]
    tail = f" ({', '.join(unmeasured)}: no margin, see below)" if unmeasured else ""
    if not active:
        return Verdict(
            "no_offers",
            None,
            "No campaign made an offer, so there is nothing to run: check the triggers, "
            f"thresholds and budgets{tail}.",
        )
    best = active[0]
    oracle_clause = f"; the oracle earns {money(oracle)}" if oracle is not None else ""
    silent = [r.campaign for r in measured if r.offers == 0]
    silent_clause = f"; {', '.join(silent)} made no offers" if silent else ""
    low, high = best.ci95 if best.ci95 else (None, None)
    if low is not None and low > 0:
        regret = f", regret {money(best.regret)}" if best.regret is not None else ""
        oracle_part = (
            f" (oracle {money(best.oracle_incremental_margin)}{regret})"
            if best.oracle_incremental_margin is not None
            else ""
        )
        return Verdict(
            "run",
            best.campaign,
            f"Run {best.campaign}: it earns {_with_ci(best)} {against}{oracle_part}{tail}.",
        )
    if high is not None and high < 0:
        every = "Every policy" if basis == "simulation" else "Every campaign"
        making = " that makes offers" if silent else ""
        return Verdict(
            "do_not_run",
            best.campaign,
            f"{every}{making} loses {against} (best: {best.campaign}, {_with_ci(best)}"
            f"{silent_clause}){oracle_clause}: do not run these campaigns{tail}.",
        )
    if (best.incremental_margin or 0.0) > 0:
        return Verdict(
            "inconclusive",
            best.campaign,
            f"{best.campaign} earns {_with_ci(best)} {against}, but the interval includes 0: "
            f"not yet a reason to run it; a longer run narrows the interval{oracle_clause}"
            f"{tail}.",
        )
    return Verdict(
        "do_not_run",
        best.campaign,
        f"No campaign is shown to beat {against.removeprefix('against ')} (best: "
        f"{best.campaign}, {_with_ci(best)}){oracle_clause}: do not run these campaigns yet"
        f"{tail}.",
    )


def ranking_section(
    campaigns: Mapping[str, Any], simulation: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The ``ranking`` section from the report's campaign sections (and ``simulation``)."""
    if simulation and simulation.get("policies"):
        basis = "simulation"
        rows = ranked(simulation_rows(simulation))
        oracle = simulation.get("oracle_incremental_margin")
        baseline = (simulation.get("baseline") or {}).get("margin")
        measure = (
            "realised incremental margin against the no-offer world; 95 % interval "
            "+- 1.96 x incremental_margin_sd"
        )
    else:
        basis, oracle, baseline = "holdout", None, None
        rows = ranked(holdout_rows(campaigns))
        measure = "intent-to-treat incremental margin against the holdout; by-user 95 % interval"
    verdict = decide(rows, basis=basis, oracle=oracle, holdout_hint=_holdout_hint(campaigns))
    return {
        "basis": basis,
        "measure": measure,
        "rows": [row.to_json() for row in rows],
        "baseline_margin": baseline,
        "oracle_incremental_margin": oracle,
        "decision": verdict.decision,
        "best": verdict.best,
        "verdict": verdict.sentence,
    }


def _holdout_hint(campaigns: Mapping[str, Any]) -> str:
    """The largest holdout share any campaign's power estimate asks for, as a clause."""
    shares = [
        (power["share_needed"], key)
        for key, section in campaigns.items()
        if (power := section.get("holdout_power")) and power.get("share_needed") is not None
    ]
    if not shares:
        return ""
    share, key = max(shares)
    return f" (the power estimate asks for a holdout of about {share:.0%} for {key})"
