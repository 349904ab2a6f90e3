"""engine.analysis.ope targets (constant, campaigns) and the decision-log reader."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from engine.analysis.ope.decision_log import LoggedDecision, read_decision_log
from engine.analysis.ope.errors import OpeError
from engine.analysis.ope.evaluate import estimate
from engine.analysis.ope.targets import (
    CampaignsTarget,
    ConstantTarget,
    parse_target,
    policy_distribution,
)
from engine.campaigns import Campaign, parse_campaigns
from engine.decisions import in_holdout
from engine.policies.base import PolicyContext
from engine.policies.profit import ProfitPolicy
from engine.policies.rules import Rule, RulesPolicy
from engine.policies.threshold import ThresholdPolicy


def record(i: int, campaign: str = "c", discount: float = 0.0, **features: float) -> LoggedDecision:
    return LoggedDecision(discount, 0.5, float(i % 2), dict(features), campaign, f"u{i}")


def campaigns(text: str) -> tuple[Campaign, ...]:
    import tomllib

    return parse_campaigns(tomllib.loads(text))


def test_profit_distribution_is_epsilon_greedy() -> None:
    policy = ProfitPolicy(ladder=(0.0, 10.0, 20.0), margin=0.5, epsilon=0.3)
    context = PolicyContext({}, lambda d: 0.1 + d / 100.0, 100.0, 0.99)
    dist = policy_distribution(policy, context)
    greedy = policy.choose(context).discount_pct  # draw 0.99 > epsilon: the greedy level
    assert dist[greedy] == pytest.approx(1 - 0.3 + 0.1)
    assert sum(dist.values()) == pytest.approx(1.0)
    assert all(dist[d] == pytest.approx(0.1) for d in dist if d != greedy)
    # The distribution agrees with the propensities the policy itself logs.
    for draw in (0.01, 0.11, 0.21, 0.5):
        choice = policy.choose(PolicyContext({}, context.predict, 100.0, draw))
        assert dist[choice.discount_pct] == pytest.approx(choice.propensity)


def test_deterministic_policies_are_point_masses() -> None:
    threshold = ThresholdPolicy(threshold=0.2, discount_pct=15.0)
    assert policy_distribution(threshold, PolicyContext({}, lambda d: 0.5, 1.0, 0.1)) == {15.0: 1.0}
    rules = RulesPolicy((Rule("cart_count_24h", ">", 1.0, 5.0),))
    assert policy_distribution(rules, PolicyContext({"cart_count_24h": 2}, abs, 1.0, 0.0)) == {
        5.0: 1.0
    }


def test_campaigns_target_matches_names_and_skips_others() -> None:
    target = CampaignsTarget(
        campaigns(
            """
[[campaign]]
name = "a"
policy = "rules"
rules = [{feature = "cart_count_24h", op = ">", value = 0, discount_pct = 10}]
[[campaign]]
name = "b"
policy = "threshold"
threshold = 0.0
discount_pct = 5
"""
        )
    )
    records = [record(0, "a", cart_count_24h=1), record(1, "a"), record(2, "b"), record(3, "z")]
    actions = target.actions(records)
    assert actions.distributions[:2] == [{10.0: 1.0}, {0.0: 1.0}]
    assert actions.distributions[2] == {5.0: 1.0}  # threshold 0: always 5 %
    assert actions.distributions[3] is None
    assert actions.details == {"evaluated_by_campaign": {"a": 2, "b": 1}, "skipped": 1}


def test_a_single_campaign_file_applies_to_every_decision() -> None:
    target = CampaignsTarget(campaigns('[[campaign]]\nname = "x"\npolicy = "profit"\n'))
    actions = target.actions([record(i, "logged-name") for i in range(20)])
    assert all(
        d is not None and sum(d.values()) == pytest.approx(1.0) for d in actions.distributions
    )


def test_no_matching_name_with_several_campaigns_is_an_error() -> None:
    target = CampaignsTarget(campaigns('[[campaign]]\nname = "x"\n[[campaign]]\nname = "y"\n'))
    with pytest.raises(OpeError, match=r"no logged campaign .* is named in the target file"):
        target.actions([record(0, "z")])


def test_campaign_holdout_and_cap_apply() -> None:
    (campaign,) = campaigns(
        '[[campaign]]\nname = "c"\npolicy = "threshold"\nthreshold = 0.0\n'
        "discount_pct = 30\nmax_discount_pct = 20\nholdout = 0.5\n"
    )
    records = [record(i) for i in range(200)]
    dists = CampaignsTarget((campaign,)).actions(records).distributions
    for rec, dist in zip(records, dists, strict=True):
        expected = {0.0: 1.0} if in_holdout(campaign, rec.user_id) else {20.0: 1.0}
        assert dist == expected
    assert 50 < sum(1 for d in dists if d == {0.0: 1.0}) < 150


def test_the_model_behind_a_campaign_target_learns_in_log_order() -> None:
    """A threshold target decided with a prequential model: early decisions, before any
    purchase was seen, get no discount; once buyers with carts were seen, they do."""
    (campaign,) = campaigns('[[campaign]]\nname = "c"\npolicy = "threshold"\nthreshold = 0.5\n')
    records = [
        LoggedDecision(0.0, 0.5, 1.0 if i % 2 else 0.0, {"cart_count_24h": 5.0 * (i % 2)}, "c", "u")
        for i in range(400)
    ]
    dists = CampaignsTarget((campaign,)).actions(records).distributions
    assert dists[1] == {0.0: 1.0}
    assert dists[-1] == {10.0: 1.0} and dists[-2] == {0.0: 1.0}


def test_parse_target() -> None:
    assert parse_target("constant:10") == ConstantTarget(10.0)
    for bad, message in (
        ("constant:ten", "needs a number"),
        ("constant:120", r"within \[0, 100\]"),
        ("bogus", "unknown target"),
        ("campaigns:/nonexistent.toml", "cannot read campaigns file"),
    ):
        with pytest.raises(OpeError, match=message):
            parse_target(bad)


def test_parse_target_reads_a_campaigns_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[campaign]]\nname = "x"\npolicy = "profit"\nepsilon = 0.2\n')
    for spec in (f"campaigns:{path}", str(path)):
        target = parse_target(spec)
        assert isinstance(target, CampaignsTarget) and target.campaigns[0].name == "x"
    path.write_text("not toml [")
    with pytest.raises(OpeError, match="not valid TOML"):
        parse_target(str(path))


def test_campaign_target_estimate_runs_end_to_end() -> None:
    (campaign,) = campaigns('[[campaign]]\nname = "c"\npolicy = "profit"\nepsilon = 0.2\n')
    records = [
        LoggedDecision(
            d, 0.2, float((i * 7 + int(d)) % 5 == 0), {"cart_count_24h": float(i % 3)}, "c", f"u{i}"
        )
        for i in range(500)
        for d in ((0.0, 5.0, 10.0, 15.0, 20.0)[i % 5],)
    ]
    report = estimate(records, CampaignsTarget((campaign,)), seed=0, n_bootstrap=30)
    assert report.defined and report.n == 500
    assert report.details["evaluated_by_campaign"] == {"c": 500}
    assert report.ess > 50


def test_decision_log_reader_counts_bad_lines() -> None:
    good = {
        "decision_id": "d1",
        "user_id": "u1",
        "campaign": "c",
        "trigger_event_id": "e1",
        "features": {"cart_count_24h": 2},
        "discount_pct": 10,
        "propensity": 0.25,
        "p_purchase": 0.3,
        "holdout": False,
        "rules": ["profit:argmax=10"],
        "reward": 1,
    }
    lines = [
        orjson.dumps(good),
        b"{not json",
        b"[1, 2]",
        orjson.dumps({**good, "propensity": None}),
        orjson.dumps({**good, "propensity": 0}),
        orjson.dumps({**good, "propensity": 1.5}),
        orjson.dumps({k: v for k, v in good.items() if k != "reward"}),
        orjson.dumps({**good, "reward": "yes"}),
        orjson.dumps({**good, "discount_pct": 120}),
        orjson.dumps({**good, "features": {"x": "high"}}),
        b"",
        orjson.dumps({**good, "discount_pct": 0, "propensity": 1, "rules": ["denied:budget"]}),
        orjson.dumps({**good, "propensity": True}),
    ]
    log = read_decision_log(lines)
    assert log.lines == 12 and len(log.records) == 2
    assert dict(log.bad) == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_propensity": 1,
        "bad_propensity": 3,
        "missing_reward": 1,
        "bad_reward": 1,
        "bad_discount": 1,
        "bad_features": 1,
    }
    assert log.bad_lines["bad_propensity"] == [5, 6, 13]
    first, denied = log.records
    assert first.features == {"cart_count_24h": 2.0} and first.p_purchase == 0.3
    assert first.line == 1 and not first.denied and first.trigger_event_id == "e1"
    assert denied.denied and denied.propensity == 1.0 and denied.line == 12
    assert log.summary()["valid"] == 2


async def test_the_engines_own_decisions_are_a_valid_log() -> None:
    """Decision v1 exactly as engine/pipeline.py emits it, plus the label of its training
    example as ``reward``: every labelled decision is read, holdout and denied ones included."""
    from engine.analysis.simulation.world import open_loop
    from engine.events import parse_event
    from engine.features.store import InMemoryFeatureStore, Position
    from engine.pipeline import DiscountEngine, EngineConfig, Incoming

    (campaign,) = campaigns(
        '[[campaign]]\nname = "p"\npolicy = "profit"\nepsilon = 0.5\nholdout = 0.2\n'
        "decision_interval_s = 60\nmax_offers_per_day = 2\noffer_ttl_s = 600\n"
    )
    config = EngineConfig(attribution_window_ms=5 * 60 * 1000)  # labels within the run
    engine = DiscountEngine(InMemoryFeatureStore(), campaigns=(campaign,), config=config)
    events = [
        parse_event(orjson.loads(orjson.dumps(doc)))
        for doc in open_loop(users=40, events=3000, seed=3, mean_gap_ms=2000)
    ]
    messages: list[dict[str, object]] = []
    labels: dict[str, int] = {}
    for start in range(0, len(events), 250):
        batch = [
            Incoming(event, Position("events.browse", 0, start + i))
            for i, event in enumerate(events[start : start + 250])
        ]
        result = await engine.process(batch)
        messages.extend(decision.to_message() for decision in result.decisions)
        labels.update({t.decision_id: t.label for t in result.training})
    lines = [
        orjson.dumps({**d, "reward": labels[str(d["decision_id"])]})
        if d["decision_id"] in labels
        else orjson.dumps(d)
        for d in messages
    ]
    log = read_decision_log(lines)
    assert len(log.records) == len(labels) > 100
    assert dict(log.bad) == (
        {"missing_reward": len(messages) - len(labels)} if len(messages) > len(labels) else {}
    )
    holdout = [r for r in log.records if r.holdout]
    denied = [r for r in log.records if r.denied]
    assert holdout and denied
    assert all(r.propensity == 1.0 and r.discount_pct == 0.0 for r in holdout + denied)
    report = estimate(log.records, CampaignsTarget((campaign,)), seed=0, n_bootstrap=50)
    assert report.defined and report.details["records_by_kind"]["holdout"] == len(holdout)
    # The same campaign: its holdout users get 0 % under the target too (weight 1).
    assert report.details["records_by_kind"]["denied"] == len(denied)
    constant = estimate(log.records, ConstantTarget(0.0), seed=0, n_bootstrap=50)
    assert constant.supported >= len(holdout) + len(denied)
