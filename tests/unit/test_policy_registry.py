"""The policy registry: a new policy is one module and one registry line.

A toy policy defined here, registered with ``register_policy``, is read from a campaigns file,
decides in a backtest, and is evaluated by off-policy evaluation, the report's OPE section and
the closed loop's oracle, with no other code knowing about it.
"""

from __future__ import annotations

import io
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from engine.analysis.backtest.runner import BacktestResult, finalize_decision_lines, run_backtest
from engine.analysis.ope.decision_log import LoggedDecision, read_decision_log
from engine.analysis.ope.evaluate import estimate
from engine.analysis.ope.targets import parse_target
from engine.analysis.reporting.ope_section import ope_sections
from engine.analysis.simulation.closed_loop import oracle_action_space
from engine.analysis.simulation.world import open_loop
from engine.campaigns import Campaign, CampaignError, parse_campaigns
from engine.events import parse_event
from engine.pipeline import EngineConfig
from engine.policies.base import (
    ActionProbability,
    DiscountLevels,
    Policy,
    PolicyChoice,
    PolicyContext,
    entry_number,
)
from engine.policies.registry import policy_names, register_policy, unregister_policy


@dataclass(frozen=True, slots=True)
class CoinPolicy(Policy):
    """Offers ``discount_pct`` when the decision's draw falls below ``offer_share``: a
    randomised policy that needs no model."""

    discount_pct: float = 7.0
    offer_share: float = 0.25
    name: str = "coin"
    uses_model: ClassVar[bool] = False

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> CoinPolicy:
        return cls(
            discount_pct=entry_number(entry, "discount_pct", 7.0, maximum=100.0),
            offer_share=entry_number(entry, "offer_share", 0.25, maximum=1.0),
        )

    @property
    def reference_discount_pct(self) -> float:
        return self.discount_pct

    def discount_levels(self) -> DiscountLevels:
        return DiscountLevels((0.0, self.discount_pct))

    def choose(self, context: PolicyContext) -> PolicyChoice:
        if context.draw < self.offer_share:
            return PolicyChoice(
                self.discount_pct,
                self.offer_share,
                rules=("coin",),
                offer_propensity=self.offer_share,
            )
        return PolicyChoice(0.0, 1.0 - self.offer_share, offer_propensity=self.offer_share)

    def action_probabilities(self, context: PolicyContext) -> tuple[ActionProbability, ...]:
        return (
            ActionProbability(0.0, 1.0 - self.offer_share),
            ActionProbability(self.discount_pct, self.offer_share),
        )


COIN_TOML = """
[[campaign]]
name = "flip"
policy = "coin"
discount_pct = 7
offer_share = 0.25
triggers = ["view", "cart"]
decision_interval_s = 300
"""
CONFIG = EngineConfig(attribution_window_ms=1800 * 1000)


@pytest.fixture
def coin_registered() -> Iterator[None]:
    register_policy("coin", CoinPolicy.from_entry)
    try:
        yield
    finally:
        unregister_policy("coin")


def coin_campaigns() -> tuple[Campaign, ...]:
    return parse_campaigns(tomllib.loads(COIN_TOML))


def labelled_log(result: BacktestResult, raw: bytes) -> list[bytes]:
    labelled, pending = io.BytesIO(), io.BytesIO()
    finalize_decision_lines(raw.splitlines(keepends=True), result.rewards, labelled, pending)
    return labelled.getvalue().splitlines()


def run_coin_backtest(campaigns: tuple[Campaign, ...]) -> tuple[BacktestResult, list[bytes]]:
    events = [parse_event(e) for e in open_loop(users=80, events=2000, seed=5, mean_gap_ms=4000)]
    out = io.BytesIO()
    result = run_backtest(events, campaigns, seed=0, decisions_out=out, config=CONFIG)
    return result, labelled_log(result, out.getvalue())


def test_an_unregistered_policy_is_unknown() -> None:
    assert "coin" not in policy_names()
    with pytest.raises(
        CampaignError, match=r"unknown policy 'coin' \(known: threshold, linear, rules, profit\)"
    ):
        coin_campaigns()


def test_a_registered_policy_is_read_from_a_campaigns_file(coin_registered: None) -> None:
    assert policy_names() == ("threshold", "linear", "rules", "profit", "coin")
    (campaign,) = coin_campaigns()
    assert campaign.policy == CoinPolicy(discount_pct=7.0, offer_share=0.25)
    bad = COIN_TOML.replace("offer_share = 0.25", "offer_share = 2")
    with pytest.raises(
        CampaignError, match=r"campaign 'flip': 'offer_share' must be within \[0, 1\], got 2"
    ):
        parse_campaigns(tomllib.loads(bad))
    with pytest.raises(ValueError, match="already registered"):
        register_policy("coin", CoinPolicy.from_entry)


def test_a_registered_policy_decides_in_a_backtest_and_ope_evaluates_it(
    coin_registered: None, tmp_path: Path
) -> None:
    campaigns = coin_campaigns()
    result, lines = run_coin_backtest(campaigns)
    decisions = [orjson.loads(line) for line in lines]
    offers = [d for d in decisions if d["offer_id"]]
    assert len(decisions) > 100 and offers
    # Every offer is at the toy's discount and carries its propensity; about a quarter offer.
    assert {d["discount_pct"] for d in offers} == {7.0}
    assert {d["propensity"] for d in offers} == {0.25}
    assert {d["propensity"] for d in decisions if not d["offer_id"]} == {0.75}
    assert 0.15 < len(offers) / len(decisions) < 0.35

    # OPE with the campaigns file as the target: the toy's own distribution on every decision,
    # so every importance weight is 1 and IPS equals the logged mean reward.
    records = read_decision_log(lines).records
    target_file = tmp_path / "coin.toml"
    target_file.write_text(COIN_TOML)
    target = parse_target(str(target_file))
    actions = target.actions(records)
    assert actions.distributions == [{0.0: 0.75, 7.0: 0.25}] * len(records)
    report = estimate(records, target, seed=0, n_bootstrap=20)
    assert report.max_weight == pytest.approx(1.0) and report.supported == len(records)
    assert report.ips.value == pytest.approx(logged_value(records))

    # The report's OPE section evaluates 0 and the offered level; the oracle may choose the
    # default ladder plus the toy's discount.
    sections = ope_sections(result, lambda: lines)
    section, why = sections[result.groups[0].keys[0]]
    assert why is None and section is not None
    assert [t["target"] for t in section["targets"]] == ["constant:0", "constant:7"]
    assert oracle_action_space(campaigns[0]) == ((0.0, 5.0, 7.0, 10.0, 15.0, 20.0), False)


def logged_value(records: list[LoggedDecision]) -> float:
    return sum(r.reward for r in records) / len(records)
