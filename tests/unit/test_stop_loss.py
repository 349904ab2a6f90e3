"""The stop-loss guardrail (engine/stop_loss.py) and what a stopped campaign does in the engine.

The running sums give exactly the cluster-robust variance computed from the per-user totals;
the state changes only with enough evidence; a stopped campaign offers only a random share of
its proposals and logs the exact propensities of what it did.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.campaigns import Campaign, parse_campaigns
from engine.events import BrowseEvent
from engine.features.store import InMemoryFeatureStore
from engine.labels import Arm
from engine.ledger import InMemoryLedger, LedgerConfig, PurchaseNotice, StopLossSetting
from engine.pipeline import DiscountEngine, Incoming
from engine.policies.profit import ProfitPolicy
from engine.policies.threshold import ThresholdPolicy
from engine.stop_loss import (
    ArmSums,
    CampaignStopLoss,
    StopLoss,
    StopLossStatus,
    evaluate,
    purchase_margin_cents,
)

T0 = 1_767_225_600_000
HOUR = 3_600_000


def direct(clusters: list[tuple[int, int]]) -> tuple[float, float]:
    """Mean per decision and its cluster-robust variance, from the per-user totals."""
    n = sum(c[0] for c in clusters)
    y = sum(c[1] for c in clusters)
    mean = y / n
    g = len(clusters)
    spread = math.fsum((yg - mean * ng) ** 2 for ng, yg in clusters)
    return mean, g / (g - 1) * spread / n**2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(-5000, 9000)), min_size=6, max_size=80))
def test_running_sums_give_the_cluster_robust_variance(
    steps: list[tuple[int, int]],
) -> None:
    """Decisions and outcomes arrive user by user in any order; the sums always agree."""
    sums = ArmSums()
    users: dict[int, tuple[int, int]] = {}
    for user, cents in steps:
        n, y = users.get(user, (0, 0))
        if cents % 3 == 0 or n == 0:  # a decision
            sums.add_decision(n, y)
            n += 1
        else:  # an outcome of one of the user's decisions
            sums.add_outcome(n, y, cents)
            y += cents
        users[user] = (n, y)
    clusters = [c for c in users.values() if c[0] > 0]
    got = sums.mean_and_variance()
    if len(clusters) < 2:
        assert got is None
        return
    assert got is not None
    mean, variance = direct(clusters)
    assert got[0] == pytest.approx(mean)
    assert got[1] == pytest.approx(variance, rel=1e-9, abs=1e-9)
    assert sums.users == len(clusters)


def test_a_purchase_margin_is_what_is_left_after_the_cost_of_goods() -> None:
    assert purchase_margin_cents(10_000, 10_000, 0.3) == 3000  # full price
    assert purchase_margin_cents(9_000, 10_000, 0.3) == 2000  # 10 % off
    assert purchase_margin_cents(6_000, 10_000, 0.3) == -1000  # 40 % off loses money
    assert purchase_margin_cents(0, 0, 0.3) == 0


def sums(outcomes: list[int], users: int) -> ArmSums:
    """One decision per outcome, spread over ``users`` users round robin."""
    arm = ArmSums()
    per_user: dict[int, tuple[int, int]] = {}
    for index, cents in enumerate(outcomes):
        user = index % users
        n, y = per_user.get(user, (0, 0))
        arm.add_decision(n, y)
        arm.add_outcome(n + 1, y, cents)
        per_user[user] = (n + 1, y + cents)
    return arm


def test_the_state_changes_only_with_enough_evidence() -> None:
    config = StopLoss(min_decisions=100, min_users=20)
    losing = sums([-500 + 10 * (i % 7) for i in range(80)], users=40)
    holdout = sums([1500 + 10 * (i % 5) for i in range(30)], users=25)
    start = StopLossStatus()
    # 110 decisions, 40 and 25 users: enough, and the upper bound is far below zero.
    stopped = evaluate(losing, holdout, config, start, now_ms=T0)
    assert stopped.stopped and stopped.since_ms == T0 and stopped.decisions == 110
    assert stopped.upper_bound is not None and stopped.upper_bound < 0
    assert stopped.incremental_margin == pytest.approx(
        -(losing.y / losing.n - holdout.y / holdout.n) / -100
    )
    # Too few holdout users: the figures are reported, the state is kept.
    thin = sums([1500] * 30, users=10)
    kept = evaluate(losing, thin, config, stopped, now_ms=T0 + 1)
    assert kept.stopped and kept.since_ms == T0
    # Too few decisions: the same.
    few = evaluate(sums([-500] * 40, users=30), holdout, config, start, now_ms=T0)
    assert not few.stopped and few.since_ms is None
    # Stop on the bound, resume on the estimate: a noisy arm whose estimate is below zero but
    # whose bound is not keeps a stopped campaign stopped and a running one running.
    noisy = sums([1500 + (2900 if i % 2 else -3100) for i in range(80)], users=40)
    straddles = evaluate(noisy, holdout, config, stopped, now_ms=T0 + config.epoch_ms)
    assert straddles.incremental_margin is not None and straddles.incremental_margin < 0
    assert straddles.upper_bound is not None and straddles.upper_bound > 0
    assert straddles.stopped and straddles.since_ms == T0
    assert not evaluate(noisy, holdout, config, start, now_ms=T0).stopped
    # Winning again with enough evidence: it resumes, but not within half a window of the
    # last change (a bound hovering around zero must not flip the state every few minutes).
    winning = sums([4000 + 10 * (i % 3) for i in range(80)], users=40)
    held = evaluate(winning, holdout, config, stopped, now_ms=T0 + config.epoch_ms - 1)
    assert held.stopped and held.since_ms == T0
    resumed = evaluate(winning, holdout, config, stopped, now_ms=T0 + config.epoch_ms)
    assert not resumed.stopped and resumed.since_ms == T0 + config.epoch_ms


def test_the_window_is_the_current_and_the_previous_epoch() -> None:
    campaign = CampaignStopLoss(StopLoss(window_ms=2 * HOUR, min_decisions=1, min_users=2), 0.3)
    for user in ("a", "b", "c"):
        campaign.record_decision(campaign.config.epoch(T0), "T", user)
        campaign.record_outcome(campaign.config.epoch(T0), "T", user, -900)
        campaign.record_decision(campaign.config.epoch(T0), "H", user + "h")
        campaign.record_outcome(campaign.config.epoch(T0), "H", user + "h", 900)
    assert campaign.update(T0).stopped
    assert campaign.update(T0 + HOUR).decisions == 6  # the previous epoch still counts
    later = campaign.update(T0 + 3 * HOUR)  # two epochs later: nothing in the window
    assert later.decisions == 0 and later.stopped, "no evidence: the state stays"
    assert all(key[0] >= campaign.config.epoch(T0 + 3 * HOUR) - 2 for key in campaign.sums)


def test_campaign_files_configure_the_stop_loss() -> None:
    (campaign,) = parse_campaigns(
        {
            "campaign": [
                {
                    "name": "c",
                    "holdout": 0.2,
                    "margin": 0.4,
                    "stop_loss": {"window_h": 12, "min_decisions": 50, "explore": 0.1},
                }
            ]
        }
    )
    assert campaign.stop_loss == StopLoss(12 * HOUR, 50, 0.1)
    assert campaign.margin == 0.4
    (default,) = parse_campaigns({"campaign": [{"name": "c", "holdout": 0.1, "stop_loss": True}]})
    assert default.stop_loss == StopLoss()
    (off,) = parse_campaigns({"campaign": [{"name": "c"}]})
    assert off.stop_loss is None


# -- in the engine ------------------------------------------------------------------------------


def view(event_id: str, ts: int, user_id: str) -> BrowseEvent:
    return BrowseEvent(event_id, user_id, ts, "i1", "books", 40.0, "view")


def stopped_engine(campaign: Campaign) -> DiscountEngine:
    """An engine whose ledger holds the campaign stopped (its thresholds keep it so)."""
    engine = DiscountEngine(InMemoryFeatureStore(), campaigns=(campaign,))
    assert isinstance(engine.ledger, InMemoryLedger)
    stopped = StopLossStatus(stopped=True, since_ms=T0)
    engine.ledger.stop_loss[campaign.name].status = stopped
    engine.stop_loss[campaign.name] = stopped
    return engine


def test_a_stopped_campaign_offers_only_an_explored_share_with_exact_propensities() -> None:
    explore = 0.2
    campaign = Campaign(
        name="c",
        policy=ThresholdPolicy(threshold=0.0, discount_pct=10.0),  # proposes to everyone
        holdout=0.1,
        decision_interval_ms=0,
        stop_loss=StopLoss(min_decisions=10**9, explore=explore),  # never resumes here
    )
    engine = stopped_engine(campaign)
    events = [view(f"e{i}", T0 + i, f"u{i}") for i in range(3000)]
    result = asyncio.run(engine.process([Incoming(e) for e in events]))
    treated = [d for d in result.decisions if not d.holdout]
    offered = [d for d in treated if d.offer_id]
    assert all("stop_loss:explore_only" in d.rules for d in treated)
    assert all("stop_loss:explored" in d.rules for d in offered)
    share = len(offered) / len(treated)
    assert abs(share - explore) < 4 * math.sqrt(explore * (1 - explore) / len(treated))
    for d in treated:
        assert d.offer_propensity == pytest.approx(explore)
        assert d.propensity == pytest.approx(explore if d.offer_id else 1 - explore)
        assert d.proposed_discount_pct == 10.0  # what the policy wanted
    # Holdout decisions still record the policy's would-be offer (the comparison needs it).
    holdout = [d for d in result.decisions if d.holdout]
    assert holdout and all(d.proposed_discount_pct == 10.0 for d in holdout)


def test_exploring_policies_multiply_their_propensities_while_stopped() -> None:
    policy = ProfitPolicy(epsilon=1.0)  # uniform over 5 levels: offer probability 0.8
    campaign = Campaign(
        name="c",
        policy=policy,
        holdout=0.1,
        decision_interval_ms=0,
        stop_loss=StopLoss(min_decisions=10**9, explore=0.5),
    )
    engine = stopped_engine(campaign)
    events = [view(f"e{i}", T0 + i, f"u{i}") for i in range(400)]
    result = asyncio.run(engine.process([Incoming(e) for e in events]))
    for d in (d for d in result.decisions if not d.holdout):
        assert d.offer_propensity == pytest.approx(0.5 * 0.8)
        expected = 0.5 * 0.2 if d.discount_pct > 0 else 0.2 + 0.5 * 0.8
        assert d.propensity == pytest.approx(expected)


def test_the_ledger_samples_proposals_into_their_arms() -> None:
    """Treated decisions join the sample only when their offer was live; holdout decisions
    when the policy would have offered."""
    campaign = Campaign(
        name="c",
        policy=ThresholdPolicy(threshold=0.0, discount_pct=10.0),
        holdout=0.5,
        decision_interval_ms=0,
        stop_loss=StopLoss(min_decisions=1, min_users=2),
    )
    engine = DiscountEngine(InMemoryFeatureStore(), campaigns=(campaign,))
    events = [view(f"e{i}", T0 + i, f"u{i}") for i in range(200)]
    result = asyncio.run(engine.process([Incoming(e) for e in events]))
    ledger = engine.ledger
    assert isinstance(ledger, InMemoryLedger)
    state = ledger.stop_loss["c"]
    epoch = state.config.epoch(T0)
    holdout = sum(1 for d in result.decisions if d.holdout)
    assert state.sums[(epoch, "H")].n == holdout
    assert state.sums[(epoch, "T")].n == len(result.decisions) - holdout
    status = result.stop_loss["c"]
    assert status.decisions == len(result.decisions)
    assert status.incremental_margin == 0.0  # nobody bought anything yet


def test_purchases_count_once_per_decision_they_convert() -> None:
    setting = StopLossSetting(StopLoss(min_decisions=1, min_users=1), 0.3)
    ledger = InMemoryLedger(LedgerConfig(stop_loss={"c": setting}))
    from engine.labels import PendingDecision
    from engine.ledger import DecisionRequest

    decision = PendingDecision("d1", "u1", "c", T0, {}, 0.0, 1.0, "lr-0", None, Arm.TREATED)
    asyncio.run(ledger.settle([DecisionRequest(decision)], now_ms=T0))
    for ts in (T0 + 1, T0 + 2):  # the second purchase does not count again
        asyncio.run(ledger.settle([PurchaseNotice("u1", ts, None, 10_000, 10_000)], now_ms=ts))
    sums_t = ledger.stop_loss["c"].sums[(ledger.stop_loss["c"].config.epoch(T0), "T")]
    assert (sums_t.n, sums_t.y) == (1, 3000)


def test_random_outcomes_rarely_stop_a_campaign_that_does_not_lose() -> None:
    """With the same outcome distribution in both arms, the 95 % upper bound is below zero
    in about 2.5 % of windows: the stop-loss is not trigger-happy."""
    rng = random.Random(5)
    config = StopLoss(min_decisions=100, min_users=20)
    stops = 0
    for _ in range(400):
        outcomes = [rng.choice([0, 0, 0, 2100, 2700]) for _ in range(240)]
        treated, holdout = sums(outcomes[:200], 100), sums(outcomes[200:], 30)
        stops += evaluate(treated, holdout, config, StopLossStatus(), T0).stopped
    assert stops / 400 < 0.06


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["decide", "outcome", "update"]),
            st.sampled_from(["T", "H"]),
            st.integers(0, 5),
            st.integers(-3000, 3000),
            st.integers(0, 40 * 60_000),
        ),
        max_size=300,
    )
)
def test_an_update_with_nothing_recorded_returns_what_an_evaluation_would(
    steps: list[tuple[str, str, int, int, int]],
) -> None:
    """``update`` keeps its status while nothing is recorded in the epoch (the ledger updates
    after every call): exactly the status a fresh evaluation gives, stop or resume."""
    config = StopLoss(window_ms=2 * HOUR, min_decisions=4, min_users=2)
    kept, fresh = CampaignStopLoss(config, 0.3), CampaignStopLoss(config, 0.3)
    now = T0
    for action, arm, user, cents, advance in steps:
        now += advance
        epoch = config.epoch(now)
        for campaign in (kept, fresh):
            if action == "decide":
                campaign.record_decision(epoch, arm, f"{arm}{user}")
            elif action == "outcome":
                bias = -1500 if (now // HOUR) % 3 else 1500  # turns losing and winning
                campaign.record_outcome(epoch, arm, f"{arm}{user}", cents + bias * (arm == "T"))
        if action == "update":
            fresh.settled_epoch = None  # always evaluated
            assert kept.update(now) == fresh.update(now)
            assert kept.sums == fresh.sums and kept.users == fresh.users


def test_a_status_held_by_the_half_window_rule_is_evaluated_again_when_it_may_change() -> None:
    """Nothing recorded since, same epoch: a status kept only because the last change was
    recent must still change once it no longer is."""
    config = StopLoss(window_ms=2 * HOUR, min_decisions=1, min_users=2)
    campaign = CampaignStopLoss(config, 0.3)
    epoch = config.epoch(T0)
    for user in ("a", "b", "c"):
        campaign.record_decision(epoch, "T", user)
        campaign.record_outcome(epoch, "T", user, -900)
        campaign.record_decision(epoch, "H", user + "h")
        campaign.record_outcome(epoch, "H", user + "h", 900)
    stop = T0 + 9 * HOUR // 10
    assert campaign.update(stop).since_ms == stop and campaign.status.stopped
    for user in ("a", "b", "c"):  # the treated arm now wins by far
        campaign.record_outcome(config.epoch(T0 + HOUR), "T", user, 50_000)
    held = campaign.update(T0 + 12 * HOUR // 10)
    assert held.stopped and held.incremental_margin is not None and held.incremental_margin > 0
    assert config.epoch(T0 + 19 * HOUR // 10) == config.epoch(T0 + 12 * HOUR // 10)
    resumed = campaign.update(T0 + 19 * HOUR // 10)
    assert not resumed.stopped and resumed.since_ms == T0 + 19 * HOUR // 10
