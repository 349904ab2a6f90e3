"""The report's ranking and its one-sentence verdict."""

from __future__ import annotations

from typing import Any

import pytest

from engine.analysis.reporting.verdict import RankedCampaign, decide, money, ranking_section


def policy_row(name: str, margin: float, sd: float, offers: int = 10) -> dict[str, Any]:
    return {
        "campaign": name,
        "policy": name,
        "offers": offers,
        "incremental_margin": margin,
        "incremental_margin_sd": sd,
        "oracle_incremental_margin": 4167.0,
        "regret": 4167.0 - margin,
    }


def simulation(*rows: dict[str, Any]) -> dict[str, Any]:
    return {
        "policies": list(rows),
        "oracle_incremental_margin": 4167.0,
        "baseline": {"margin": 100000.0},
    }


def test_money_is_signed_and_readable() -> None:
    assert money(4167.4) == "+4,167" and money(-12.5) == "-12.50" and money(0.0) == "+0.00"
    assert money(-12.5, scale=634.0) == "-12"


def test_every_policy_losing_means_do_not_run_and_names_the_oracle() -> None:
    section = ranking_section(
        {},
        simulation(
            policy_row("linear", -3127.0, 277.0),
            policy_row("profit", -754.6, 151.4),
            policy_row("rules", 0.0, 0.0, offers=0),
        ),
    )
    assert section["basis"] == "simulation" and section["decision"] == "do_not_run"
    assert [r["campaign"] for r in section["rows"]] == ["rules", "profit", "linear"]
    assert section["rows"][1]["ci95"] == pytest.approx(
        [-754.6 - 1.959964 * 151.4, -754.6 + 1.959964 * 151.4]
    )
    assert section["rows"][0]["reason"] == "made no offers"
    assert section["best"] == "profit" and section["baseline_margin"] == 100000.0
    assert section["verdict"] == (
        "Every policy that makes offers loses against no offers (best: profit, -755 "
        "[-1,051, -458]; rules made no offers); the oracle earns +4,167: do not run these "
        "campaigns."
    )


def test_a_positive_interval_means_run_it() -> None:
    section = ranking_section(
        {}, simulation(policy_row("profit", 900.0, 200.0), policy_row("linear", -50.0, 10.0))
    )
    assert section["decision"] == "run" and section["best"] == "profit"
    assert section["verdict"].startswith("Run profit: it earns +900 [+508, +1,292] against no")
    assert "oracle +4,167, regret +3,267" in section["verdict"]


def test_an_interval_across_zero_is_inconclusive() -> None:
    section = ranking_section({}, simulation(policy_row("profit", 90.0, 100.0)))
    assert section["decision"] == "inconclusive"
    assert "includes 0" in section["verdict"] and "longer run" in section["verdict"]


def holdout_campaign(margin: float | None, ci: list[float] | None, **extra: Any) -> dict[str, Any]:
    itt = None if margin is None else {"incremental_margin": margin, "incremental_margin_ci95": ci}
    return {"policy": "threshold", "offers": 20, "itt": itt, **extra}


def test_file_runs_rank_by_itt_margin_and_say_what_to_set_without_a_holdout() -> None:
    campaigns = {
        "a": holdout_campaign(
            None,
            None,
            reason="no holdout: set `holdout = 0.1`",
            holdout_power={"share_needed": 0.2},
        ),
        "b": holdout_campaign(
            None, None, reason="no holdout", holdout_power={"share_needed": 0.35}
        ),
    }
    section = ranking_section(campaigns, None)
    assert section["basis"] == "holdout" and section["decision"] == "unknown"
    assert "`holdout = 0.1`" in section["verdict"]
    assert "about 35% for b" in section["verdict"]
    assert section["rows"][0]["reason"] == "no holdout: set `holdout = 0.1`"

    campaigns["c"] = holdout_campaign(120.0, [20.0, 220.0])
    section = ranking_section(campaigns, None)
    assert section["decision"] == "run" and section["best"] == "c"
    assert [r["campaign"] for r in section["rows"]] == ["c", "a", "b"]
    assert section["verdict"] == (
        "Run c: it earns +120 [+20, +220] against its holdout (a, b: no margin, see below)."
    )


def test_no_offers_anywhere() -> None:
    rows = [RankedCampaign("r", "rules", 0, 0.0, (0.0, 0.0))]
    verdict = decide(rows, basis="simulation", oracle=10.0, holdout_hint="")
    assert verdict.decision == "no_offers" and verdict.best is None
