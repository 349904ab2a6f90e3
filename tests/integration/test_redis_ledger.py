"""The Redis decision ledger (redis_ledger.py + commit_batch.lua) against a real Redis.

1. Parity: random sequences of decision requests and purchases (some out of event-time order,
   so remembered purchases convert later-read decisions), settled in random batches with an
   advancing ``now_ms`` on two lanes (one trailing the other), give the same outcomes, label
   events (in the same order), stop-loss statuses (state and figures, to the last bit),
   budget counters and pending counts as ``InMemoryLedger``.
   What the Redis ledger remembers of its own decisions (``rate_limited``) agrees with the
   in-memory ledger after every settle.
2. ``forget`` removes a user's guard and pending keys and their queue members, nothing else,
   and every ledger forgets the user's decision times at its next call.
3. Concurrency: eight clients race for one campaign budget; the total granted never exceeds
   it, not by one cent.

Every test uses its own key prefix and deletes its keys at the end; nothing here flushes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import tomllib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from engine.campaigns import parse_campaigns
from engine.events import BrowseEvent
from engine.features.catalogue import compute_features
from engine.features.state import HOUR_MS, MINUTE_MS
from engine.features.store import Position, StateUpdate
from engine.labels import Arm, LabelEvent, LabelKind, PendingDecision
from engine.ledger import (
    DecisionOutcome,
    DecisionRequest,
    InMemoryLedger,
    LedgerConfig,
    LedgerOp,
    OfferLimits,
    PurchaseNotice,
    StopLossSetting,
    event_day,
)
from engine.pipeline import DiscountEngine, EngineConfig, Incoming
from engine.stop_loss import StopLoss
from streams.adapters.batch_commit import BatchCommit, CommitReply, ReplyWait
from streams.adapters.outbox import Outbox
from streams.adapters.redis_errors import RedisBatchFailed
from streams.adapters.redis_ledger import RedisLedger
from streams.adapters.redis_store import RedisFeatureStore, hash_tag, user_key
from streams.adapters.replica_wait import ReplicaWait
from tests.conftest import Isolation, Services
from tests.integration.conftest import delete_prefix, keys_under

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000 + 22 * HOUR_MS
"""2026-01-01T22:00Z: scenarios cross a UTC midnight, so budgets and day counters roll over."""
WINDOW = 3 * HOUR_MS
USERS = ("u0", "u1", "ü2", "u{3}")
"""Include a non-ASCII id and one with braces (escaped by ``hash_tag``)."""
CAMPAIGNS = ("alpha", "beta", "gamma")
CONFIG = LedgerConfig(
    attribution_window_ms=WINDOW,
    elapsed_ms=40 * MINUTE_MS,
    purchase_memory_ms=HOUR_MS,
    # Small windows and thresholds, so that scenarios of a few dozen ops flip the state.
    stop_loss={
        "alpha": StopLossSetting(StopLoss(2 * HOUR_MS, min_decisions=3, min_users=2), 0.3),
        "beta": StopLossSetting(StopLoss(HOUR_MS, min_decisions=1, min_users=2), 0.45),
    },
)
PLAIN = LedgerConfig(attribution_window_ms=WINDOW)
"""No elapsed events, no stop-loss: the hand-written scenarios."""


# -- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecisionSpec:
    user: int
    campaign: int
    step_ms: int
    interval_ms: int
    offer: OfferLimits | None
    discount_pct: float
    propensity: float
    arm: str
    boundary: int | None
    """When set, the decision lands at the previous decision of the same user and campaign plus
    the larger of its interval and cooldown plus ``boundary`` ms (-1, 0 or 1): right at the
    edge where a guardrail flips."""


@dataclass(frozen=True)
class PurchaseSpec:
    user: int
    step_ms: int
    redeem: int | None
    """Which offer id the purchase carries: 0-3 one of the user's own recent offers (the
    latest first, whether granted or denied), 4-9 any earlier decision's (maybe none)."""
    gross_cents: int
    paid_share: float


Spec = DecisionSpec | PurchaseSpec

steps = st.one_of(
    st.integers(0, 40 * MINUTE_MS),
    # Exact guardrail and window boundaries (intervals, cooldowns, the attribution window).
    st.sampled_from([0, 1, MINUTE_MS, 5 * MINUTE_MS, 10 * MINUTE_MS, 30 * MINUTE_MS, HOUR_MS]),
    st.sampled_from([WINDOW - 1, WINDOW, WINDOW + 1]),
    st.integers(-30 * MINUTE_MS, 0),  # out of order, within a typical allowed lateness
)
offer_limits = st.builds(
    OfferLimits,
    cost_cents=st.one_of(st.sampled_from([0, 100, 250, 500]), st.integers(0, 900)),
    cooldown_ms=st.sampled_from([0, 0, 10 * MINUTE_MS, HOUR_MS]),
    max_per_day=st.sampled_from([None, None, 0, 1, 2]),
    # Round budgets meet round costs exactly at the limit.
    budget_cents=st.one_of(st.none(), st.sampled_from([0, 500, 1000]), st.integers(0, 2500)),
)
# Skewed towards one user and campaign, so that guardrails meet their boundaries often.
some_user = st.sampled_from([0, 0, 0, 1, 2, 3])
decision_specs = st.builds(
    DecisionSpec,
    user=some_user,
    campaign=st.sampled_from([0, 0, 1, 2]),
    step_ms=steps,
    interval_ms=st.sampled_from([0, 0, 5 * MINUTE_MS, 30 * MINUTE_MS]),
    offer=st.one_of(st.none(), offer_limits, offer_limits),
    discount_pct=st.sampled_from([5.0, 10.0, 12.5, 20.0]),
    propensity=st.floats(0.01, 1.0),
    arm=st.sampled_from(["", "T", "T", "H"]),
    boundary=st.one_of(st.none(), st.none(), st.sampled_from([-1, 0, 1])),
)
purchase_specs = st.builds(
    PurchaseSpec,
    user=some_user,
    step_ms=steps,
    redeem=st.one_of(st.none(), st.integers(0, 9)),
    gross_cents=st.one_of(st.sampled_from([0, 1, 999]), st.integers(0, 40_000)),
    paid_share=st.sampled_from([1.0, 0.95, 0.8, 0.5, 0.0]),
)


@dataclass(frozen=True)
class Scenario:
    batches: list[tuple[list[LedgerOp], int]]
    """(ops, now_ms) per settle call."""

    @property
    def days(self) -> list[int]:
        """The event-time days of the scenario's decisions (where budgets are spent)."""
        return sorted(
            {
                event_day(op.decision.ts)
                for ops, _ in self.batches
                for op in ops
                if isinstance(op, DecisionRequest)
            }
        )

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        lines = []
        for ops, now in self.batches:
            lines.append(f"-- settle now={now - T0:+d}")
            for op in ops:
                if isinstance(op, PurchaseNotice):
                    lines.append(
                        f"   P {op.user_id} ts={op.ts - T0:+d} offer={op.offer_id} "
                        f"paid={op.amount_cents}/{op.gross_cents}"
                    )
                else:
                    d = op.decision
                    lines.append(
                        f"   D {d.decision_id} {d.user_id}/{d.campaign} ts={d.ts - T0:+d} "
                        f"iv={op.decision_interval_ms} offer={d.offer_id} arm={d.arm!r} {op.offer}"
                    )
        return "\n".join(lines)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    specs: list[Spec] = draw(
        st.lists(st.one_of(decision_specs, decision_specs, purchase_specs), min_size=8, max_size=60)
    )
    ops: list[LedgerOp] = []
    ts = T0
    decisions: list[PendingDecision] = []
    previous: dict[tuple[int, int], int] = {}
    for index, spec in enumerate(specs):
        ts = max(T0 - HOUR_MS, ts + spec.step_ms)
        if isinstance(spec, DecisionSpec):
            offered = spec.offer is not None
            at = ts
            key = (spec.user, spec.campaign)
            if spec.boundary is not None and key in previous:
                gap = max(spec.interval_ms, spec.offer.cooldown_ms if spec.offer else 0)
                at = previous[key] + gap + spec.boundary
                ts = max(ts, at)
            previous[key] = at
            decision = PendingDecision(
                decision_id=f"d{index:03d}",
                user_id=USERS[spec.user],
                campaign=CAMPAIGNS[spec.campaign],
                ts=at,
                features={"cart_count_24h": float(index % 4), "spend_30d": 12.5 + index / 10},
                discount_pct=spec.discount_pct if offered else 0.0,
                propensity=spec.propensity,
                model_version=f"lr-{index}",
                offer_id=f"o{index:03d}" if offered else None,
                arm=Arm(spec.arm),
            )
            decisions.append(decision)
            ops.append(DecisionRequest(decision, spec.interval_ms, spec.offer, lane=index % 2))
        else:
            offer_id = None
            own = [d.offer_id for d in decisions if d.user_id == USERS[spec.user] and d.offer_id]
            if spec.redeem is not None and spec.redeem < 4 and own:
                offer_id = own[-1 - spec.redeem % len(own)]
            elif spec.redeem is not None and decisions:
                offer_id = decisions[spec.redeem * 7 % len(decisions)].offer_id
            paid = round(spec.gross_cents * spec.paid_share)
            ops.append(PurchaseNotice(USERS[spec.user], ts, offer_id, paid, spec.gross_cents))
    batches: list[tuple[list[LedgerOp], int]] = []
    clock = T0 - HOUR_MS
    start = 0
    while start < len(ops):
        size = draw(st.integers(1, 8))
        chunk = ops[start : start + size]
        start += size
        latest = max(op.decision.ts if isinstance(op, DecisionRequest) else op.ts for op in chunk)
        clock = max(clock, latest) + draw(st.sampled_from([0, 0, 1, HOUR_MS, WINDOW + 1]))
        seen = [d.ts for d in decisions if d.decision_id < f"d{start:03d}"]
        at_deadline: bool = draw(st.booleans())
        if seen and at_deadline:
            # Exactly at an attribution deadline: it is not yet past (expiry needs now > it).
            clock = max(clock, draw(st.sampled_from(seen)) + WINDOW)
        batches.append((chunk, clock))
    # A last, empty settle far ahead expires everything still pending.
    batches.append(([], clock + 2 * WINDOW + 1))
    return Scenario(batches)


def _remembered_conversions(ops: Sequence[LedgerOp], events: Sequence[LabelEvent]) -> int:
    """Conversions of this call's decisions by no purchase read after them in the call."""
    order = {
        op.decision.decision_id: k for k, op in enumerate(ops) if isinstance(op, DecisionRequest)
    }
    count = 0
    for event in events:
        at = order.get(event.decision.decision_id)
        if event.kind is not LabelKind.CONVERTED or at is None:
            continue
        if not any(
            isinstance(op, PurchaseNotice)
            and op.user_id == event.decision.user_id
            and op.ts == event.ts
            for op in ops[at + 1 :]
        ):
            count += 1
    return count


def _outcome_name(outcome: DecisionOutcome) -> str:
    if not outcome.decided:
        return "rate-limited"
    if outcome.denied_by is not None:
        return f"denied by {outcome.denied_by}"
    return "granted" if outcome.granted else "no offer"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def lane_clocks(number: int, now: int) -> dict[int, int]:
    """Two lanes (decisions alternate between them): lane 1 trails lane 0 by 0 to 60 minutes,
    as a partition read behind another does."""
    return {0: now, 1: now - number % 3 * 30 * MINUTE_MS}


def ledger_keys(prefix: str, days: Sequence[int]) -> list[str]:
    """Every key the ledger can write for ``USERS``, ``CAMPAIGNS``, ``days`` (commit_batch.lua)."""
    keys = [f"{prefix}lq:{lane}" for lane in (0, 1)]
    keys.append(f"{prefix}pn")
    keys += [f"{prefix}sl:{campaign}" for campaign in CAMPAIGNS]
    keys += [user_key(prefix, user) for user in USERS]
    keys += [f"{prefix}b:{campaign}:{day}" for campaign in CAMPAIGNS for day in days]
    return keys


async def check_parity(redis_url: str, prefix: str, scenario: Scenario) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        redis_ledger = RedisLedger(client, prefix=prefix, config=CONFIG)
        memory = InMemoryLedger(CONFIG)
        days = scenario.days
        longest: dict[str, int] = {}  # per campaign, the longest decision interval so far
        horizon: dict[str, int] = {}  # per campaign, before it remembered times may be gone
        for number, (ops, now) in enumerate(scenario.batches):
            lanes = lane_clocks(number, now)
            expected = await memory.settle(ops, now_ms=now, lanes=lanes)
            actual = await redis_ledger.settle(ops, now_ms=now, lanes=lanes)
            where = f"settle #{number}"
            assert actual.outcomes == expected.outcomes, where
            assert [(e.decision.decision_id, e.kind, e.ts, e.label) for e in actual.events] == [
                (e.decision.decision_id, e.kind, e.ts, e.label) for e in expected.events
            ], where
            assert actual.events == expected.events, where
            assert actual.stop_loss == expected.stop_loss, where
            for campaign in CAMPAIGNS:
                for day in days:
                    assert await redis_ledger.budget_spent_cents(
                        campaign, day
                    ) == await memory.budget_spent_cents(campaign, day), (where, campaign, day)
            assert await redis_ledger.pending_count() == await memory.pending_count(), where
            probes = {op.decision.ts for op in ops if isinstance(op, DecisionRequest)}
            for op in ops:
                if isinstance(op, DecisionRequest):
                    campaign = op.decision.campaign
                    longest[campaign] = max(longest.get(campaign, 0), op.decision_interval_ms)
            for campaign in CAMPAIGNS:
                passed = now - longest.get(campaign, 0)
                horizon[campaign] = max(horizon.get(campaign, passed), passed)
            for user in USERS:
                for campaign in CAMPAIGNS:
                    for ts in probes:
                        for later in (0, MINUTE_MS - 1, MINUTE_MS, HOUR_MS):
                            for interval in (MINUTE_MS, HOUR_MS):
                                args = (user, campaign, ts + later, interval)
                                remembered = redis_ledger.rate_limited(*args)
                                known = memory.rate_limited(*args)
                                # The Redis ledger forgets a time once its campaign's interval
                                # has passed by the clock: only an earlier probe can tell.
                                if ts + later >= horizon[campaign] + interval:
                                    assert remembered == known, (where, args)
                                else:
                                    assert known or not remembered, (where, args)
            for outcome in expected.outcomes:
                if outcome is not None:
                    label(f"outcome {_outcome_name(outcome)}")
            for event in expected.events:
                label(f"event {event.kind} {event.label}")
            if _remembered_conversions(ops, expected.events):
                label("a remembered purchase converts a decision")
            for status in expected.stop_loss.values():
                if status.stopped:
                    label("a campaign is stopped")
        assert await redis_ledger.pending_count() == 0
    finally:
        # The known keys only (a SCAN per example is slow on a busy server); the fixture
        # scans the whole prefix once at the end.
        await client.delete(*ledger_keys(prefix, scenario.days))
        await client.aclose()


@pytest.fixture
async def parity_prefix(services: Services, isolation: Isolation) -> AsyncIterator[str]:
    """A prefix under which each example takes its own sub-prefix; all checked clean after."""
    yield isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        leftover = await keys_under(client, isolation.redis_prefix)
        await delete_prefix(client, isolation.redis_prefix)
        assert leftover == set()
    finally:
        await client.aclose()


def _describe(scenario: Scenario) -> None:
    ops = [op for batch, _ in scenario.batches for op in batch]
    requests = [op for op in ops if isinstance(op, DecisionRequest)]
    if any(op.offer is not None and op.offer.budget_cents is not None for op in requests):
        label("has budgets")
    if any(isinstance(op, PurchaseNotice) and op.offer_id for op in ops):
        label("redeems an offer id")
    if len(scenario.batches) > 3:
        label("several batches")
    if any(isinstance(op, PurchaseNotice) for op in ops):
        label("has purchases")
    if any(op.decision.arm for op in requests):
        label("has stop-loss samples")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_redis_ledger_matches_in_memory_ledger(
    services: Services, parity_prefix: str, scenario: Scenario
) -> None:
    _describe(scenario)
    prefix = f"{parity_prefix}l{uuid.uuid4().hex[:8]}:"
    asyncio.run(check_parity(services.redis_url, prefix, scenario))


def _request(
    decision_id: str,
    user: str,
    ts: int,
    *,
    campaign: str = "alpha",
    offer: OfferLimits | None = None,
    interval_ms: int = 0,
    arm: Arm = Arm.NONE,
) -> DecisionRequest:
    decision = PendingDecision(
        decision_id=decision_id,
        user_id=user,
        campaign=campaign,
        ts=ts,
        features={"cart_count_24h": 1.0},
        discount_pct=10.0 if offer else 0.0,
        propensity=1.0,
        model_version="lr-0",
        offer_id=f"o-{decision_id}" if offer else None,
        arm=arm,
    )
    return DecisionRequest(decision, interval_ms, offer)


async def test_a_hand_written_scenario_gives_the_expected_outcomes(
    services: Services, isolation: Isolation
) -> None:
    """A readable anchor for the property: each guardrail and label path once."""
    prefix = isolation.redis_prefix
    ops: list[LedgerOp] = [
        _request("d1", "u1", T0, offer=OfferLimits(300, cooldown_ms=HOUR_MS, budget_cents=500)),
        _request("d2", "u1", T0 + 1, interval_ms=MINUTE_MS),  # inside the interval
        _request("d3", "u1", T0 + 2, campaign="beta"),  # another campaign
        _request("d4", "u1", T0 + MINUTE_MS, offer=OfferLimits(100, cooldown_ms=HOUR_MS)),
        _request("d5", "u2", T0 + 3, offer=OfferLimits(300, budget_cents=500)),  # over budget
        _request("d6", "u2", T0 + 4, offer=OfferLimits(200, budget_cents=500, max_per_day=1)),
        _request("d7", "u2", T0 + 5, offer=OfferLimits(0, max_per_day=1)),
        PurchaseNotice("u1", T0 + 2 * MINUTE_MS, "o-d1", 2700, 3000),
    ]
    expected_outcomes = [
        DecisionOutcome(True, True),
        DecisionOutcome(False),
        DecisionOutcome(True),
        DecisionOutcome(True, False, "cooldown"),
        DecisionOutcome(True, False, "budget"),
        DecisionOutcome(True, True),
        DecisionOutcome(True, False, "max_offers_per_day"),
        None,
    ]
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        for ledger in (InMemoryLedger(PLAIN), RedisLedger(client, prefix=prefix, config=PLAIN)):
            result = await ledger.settle(ops, now_ms=T0 + 2 * MINUTE_MS)
            assert result.outcomes == expected_outcomes, type(ledger).__name__
            # The purchase converts every open decision of u1 within the window, offer or
            # not, whichever offer it redeemed: d1, d3 (beta) and d4 (its offer denied).
            converted = [(e.decision.decision_id, e.kind, e.label) for e in result.events]
            assert converted == [(d, LabelKind.CONVERTED, 1) for d in ("d1", "d3", "d4")]
            assert await ledger.budget_spent_cents("alpha", event_day(T0)) == 500
            assert await ledger.pending_count() == 6  # every decision waits for its window
            later = await ledger.settle([], now_ms=T0 + WINDOW + MINUTE_MS + 1)
            assert [(e.decision.decision_id, e.kind, e.label) for e in later.events] == [
                ("d1", LabelKind.CLOSED, 1),
                ("d3", LabelKind.CLOSED, 1),
                ("d5", LabelKind.CLOSED, 0),
                ("d6", LabelKind.CLOSED, 0),
                ("d7", LabelKind.CLOSED, 0),
                ("d4", LabelKind.CLOSED, 1),
            ]
            closed = {e.decision.decision_id: e.decision for e in later.events}
            assert closed["d4"].discount_pct == 0.0 and closed["d4"].offer_id is None
            assert closed["d4"].converted_at == T0 + 2 * MINUTE_MS
            assert closed["d6"].offer_id == "o-d6" and closed["d6"].converted_at is None
            assert await ledger.pending_count() == 0
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_purchases_read_first_convert_later_read_decisions_and_lanes_close_apart(
    services: Services, isolation: Isolation
) -> None:
    """Order independence, both ledgers: a purchase read before the (earlier) decision it
    follows converts it when it is recorded; a lane read far ahead closes only its own
    windows. (The stop-loss outcome of such a conversion is held to the in-memory ledger by
    the parity property.)"""
    prefix = isolation.redis_prefix
    memory_ms = HOUR_MS
    config = LedgerConfig(
        attribution_window_ms=WINDOW,
        purchase_memory_ms=memory_ms,
        stop_loss={"alpha": StopLossSetting(StopLoss(2 * HOUR_MS), 0.5)},
    )
    ahead = T0 + 3 * WINDOW
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        for ledger in (InMemoryLedger(config), RedisLedger(client, prefix=prefix, config=config)):
            name = type(ledger).__name__
            first = await ledger.settle(
                [
                    PurchaseNotice("u1", T0 + 10 * MINUTE_MS, None, 900, 1000),
                    PurchaseNotice("u1", T0 + 20 * MINUTE_MS, None, 400, 500),
                    PurchaseNotice("u2", T0 - 2 * HOUR_MS),  # to be forgotten below
                    PurchaseNotice("u2", T0 + MINUTE_MS),
                ],
                now_ms=T0 + 20 * MINUTE_MS,
            )
            assert first.events == [], name
            b_req = _request("b", "u3", ahead)
            ops: list[LedgerOp] = [
                DecisionRequest(b_req.decision, lane=1),  # lane 1, far ahead
                _request("a", "u1", T0, arm=Arm.TREATED),  # lane 0, read after its purchase
                _request("late", "u1", T0 + 15 * MINUTE_MS),
                _request("u2-old", "u2", T0 - 3 * HOUR_MS),  # its purchase is forgotten
            ]
            # now_ms, the stop-loss's clock, stays near T0: its epochs hold decision a
            result = await ledger.settle(ops, now_ms=T0 + HOUR_MS, lanes={1: ahead, 0: T0})
            assert [(e.decision.decision_id, e.kind, e.ts) for e in result.events] == [
                ("a", LabelKind.CONVERTED, T0 + 10 * MINUTE_MS),
                ("late", LabelKind.CONVERTED, T0 + 20 * MINUTE_MS),
            ], name
            assert (await ledger.stop_loss_status())["alpha"].decisions == 1, name
            assert await ledger.pending_count() == 4, name  # lane 0 is behind: all still open
            later = await ledger.settle([], now_ms=ahead, lanes={0: ahead})
            assert {(e.decision.decision_id, e.label) for e in later.events} == {
                ("a", 1),
                ("late", 1),
                ("u2-old", 0),
            }, name
            assert await ledger.pending_count() == 1, name  # b: lane 1 not past its window
            await delete_prefix(client, prefix)
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_a_decision_waits_for_one_label_at_a_time_and_is_labelled_as_in_memory(
    services: Services, isolation: Isolation
) -> None:
    """With elapsed events, a decision waits for its elapsed event, then for its window's end
    (its record says which; one index member per user); a
    clock that passes both its wait and its window in one call gives both events, in order,
    as the in-memory ledger does."""
    prefix = isolation.redis_prefix
    config = LedgerConfig(attribution_window_ms=WINDOW, elapsed_ms=40 * MINUTE_MS)
    ops: list[LedgerOp] = [
        _request("slow", "u1", T0),
        _request("jump", "u2", T0 + MINUTE_MS),
        _request("bought", "u3", T0 + 2 * MINUTE_MS),
        PurchaseNotice("u3", T0 + 3 * MINUTE_MS, None, 500, 500),
    ]
    steps = [
        (ops, {0: T0 + 3 * MINUTE_MS}),
        ([], {0: T0 + HOUR_MS}),  # past every wait, no window
        ([], {0: T0 + WINDOW + 90 * MINUTE_MS}),  # past every window
    ]
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        seen: dict[str, list[list[tuple[str, LabelKind, int]]]] = {}
        for ledger in (InMemoryLedger(config), RedisLedger(client, prefix=prefix, config=config)):
            name = type(ledger).__name__
            labels = seen[name] = []
            pending = []
            for step_ops, lanes in steps:
                result = await ledger.settle(step_ops, now_ms=max(lanes.values()), lanes=lanes)
                labels.append([(e.decision.decision_id, e.kind, e.ts) for e in result.events])
                pending.append(await ledger.pending_count())
            assert pending == [3, 3, 0], name
        assert seen["RedisLedger"] == seen["InMemoryLedger"]
        assert seen["RedisLedger"][1] == [
            ("slow", LabelKind.ELAPSED, T0 + 40 * MINUTE_MS),
            ("jump", LabelKind.ELAPSED, T0 + 41 * MINUTE_MS),
            ("bought", LabelKind.ELAPSED, T0 + 42 * MINUTE_MS),
        ]

        # One label event at a time: after the wait, each decision waits for its window's end,
        # and the lane's index holds each user once, by the earliest time one of theirs is due.
        ledger = RedisLedger(client, prefix=prefix, config=config)
        await delete_prefix(client, prefix)
        await ledger.settle(ops, now_ms=T0 + 3 * MINUTE_MS, lanes={0: T0 + 3 * MINUTE_MS})
        index = await client.zrange(f"{prefix}lq:0", 0, -1)
        assert {_text(user) for user in index} == {"u1", "u2", "u3"}
        # The stored record says what it waits for ('e' elapsed, 'x' closed) and its lane.
        stored = await client.hget(user_key(prefix, "u1"), "slow")
        assert stored is not None and stored.startswith(b"e0G[")
        assert await client.zscore(f"{prefix}lq:0", "u1") == T0 + 40 * MINUTE_MS
        assert await client.hkeys(user_key(prefix, "u1")) == [b"alpha|d", b"slow"]
        await ledger.settle([], now_ms=T0 + HOUR_MS, lanes={0: T0 + HOUR_MS})
        assert await client.hget(user_key(prefix, "u1"), "slow") == b"x" + stored[1:]
        assert await client.zscore(f"{prefix}lq:0", "u1") == T0 + WINDOW
        # A clock that jumps past wait and window at once: elapsed, then closed, in one call.
        await delete_prefix(client, prefix)
        jumped = await ledger.settle(ops, now_ms=T0 + 3 * MINUTE_MS, lanes={0: T0 + 2 * WINDOW})
        in_memory = await InMemoryLedger(config).settle(
            ops, now_ms=T0 + 3 * MINUTE_MS, lanes={0: T0 + 2 * WINDOW}
        )
        events = [(e.decision.decision_id, e.kind, e.ts) for e in jumped.events]
        assert events == [(e.decision.decision_id, e.kind, e.ts) for e in in_memory.events]
        assert [kind for _, kind, _ in events].count(LabelKind.CLOSED) == 3
        assert await ledger.pending_count() == 0
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_the_stop_loss_stops_a_losing_campaign_and_lets_it_recover(
    services: Services, isolation: Isolation
) -> None:
    """Treated users' purchases lose money against the holdout's: the campaign stops, in
    both ledgers at the same instant; a later window whose estimate is below zero but whose
    bound is not keeps it stopped; one where they earn more lets it resume."""
    config = LedgerConfig(
        attribution_window_ms=WINDOW,
        stop_loss={"alpha": StopLossSetting(StopLoss(WINDOW, min_decisions=6, min_users=3), 0.3)},
    )
    treated, holdout = ("t1", "t2", "t3"), ("h1", "h2", "h3")

    def round_of(start: int, treated_paid: int, tag: str, spread: int = 10) -> list[LedgerOp]:
        ops: list[LedgerOp] = []
        for k, user in enumerate(treated + holdout):
            arm = Arm.TREATED if user in treated else Arm.HOLDOUT
            ops.append(_request(f"{tag}{user}", user, start + k, arm=arm))
        for k, user in enumerate(treated + holdout):
            paid = treated_paid + spread * k if user in treated else 10_000 + 10 * k
            ops.append(PurchaseNotice(user, start + MINUTE_MS + k, None, paid, 10_000))
        return ops

    client = aioredis.Redis.from_url(services.redis_url)
    prefix = isolation.redis_prefix
    try:
        ledgers = (InMemoryLedger(config), RedisLedger(client, prefix=prefix, config=config))
        for ledger in ledgers:
            name = type(ledger).__name__
            # Treated users pay 2,000 of 10,000 (a deep discount): margin -5,000 cents each
            # against +3,000 in the holdout.
            losing = await ledger.settle(round_of(T0, 2_000, "a"), now_ms=T0 + MINUTE_MS + 10)
            status = losing.stop_loss["alpha"]
            assert status.stopped and status.since_ms == T0 + MINUTE_MS + 10, (name, status)
            assert status.decisions == 6
            assert status.incremental_margin is not None and status.incremental_margin < -70
            assert status.upper_bound is not None and status.upper_bound < 0
            # Two epochs later the old sums are out of the window. Treated users pay 6,000,
            # 9,500 and 13,000: a mean below the holdout's, a bound far above zero.
            noisy_at = T0 + 2 * WINDOW
            noisy = await ledger.settle(
                round_of(noisy_at, 6_000, "n", spread=3_500), now_ms=noisy_at + MINUTE_MS
            )
            status = noisy.stop_loss["alpha"]
            assert status.stopped and status.since_ms == T0 + MINUTE_MS + 10, (name, status)
            assert status.incremental_margin is not None and status.incremental_margin < 0
            assert status.upper_bound is not None and status.upper_bound > 0
            # Now treated users earn more: it resumes.
            later = T0 + 4 * WINDOW
            winning = await ledger.settle(round_of(later, 10_500, "b"), now_ms=later + MINUTE_MS)
            status = winning.stop_loss["alpha"]
            assert not status.stopped and status.since_ms == later + MINUTE_MS, (name, status)
            assert status.lower_bound is not None and status.lower_bound > 0
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


# -- packed ops ---------------------------------------------------------------------------------


def _packed(*ops: list[object], records: bytes) -> list[object]:
    """``commit_batch.lua``'s ledger section for a plain config (lane 0 at ``T0``): the flat
    ops JSON and the records."""
    return [T0, WINDOW, 0, 0, 1, 0, T0, 0, orjson.dumps([f for op in ops for f in op]), records]


RECORD = b"G" + _request("d1", "u1", T0).decision.compact_json()
GOOD = ["D", "u1", "alpha", T0, 0, 1, 100, 0, -1, 1000, "d1", "", -1, len(RECORD), 0]
"""A decision with an offer, packed as ``RedisLedger.settle`` packs it."""


@pytest.mark.parametrize(
    ("ops", "records", "refusal"),
    [
        (
            [GOOD, ["D", "u2", "alpha", T0, 0, 1, 1.5, 0, -1, 1000, "d2", "", -1, len(RECORD), 0]],
            RECORD * 2,
            "op 2: ts, decision_interval_ms, cost_cents",
        ),
        (
            [GOOD, ["D", None, "alpha", T0, 0, 0, 0, 0, -1, -1, "d2", "", -1, len(RECORD), 0]],
            RECORD * 2,
            "op 2: user, campaign and decision_id must be strings",
        ),
        (
            [GOOD, ["D", "u2", "alpha", None, 0, 0, 0, 0, -1, -1, "d2", "", -1, len(RECORD), 0]],
            RECORD * 2,
            "op 2: a field of the wrong type",
        ),
        (
            [GOOD, ["D", "u2", "alpha", T0, 0, 0, 0, 0, -1, -1, "d2", "X", -1, len(RECORD), 0]],
            RECORD * 2,
            'op 2: arm must be "", "T" or "H"',
        ),
        (
            [GOOD, ["D", "u2", "alpha", T0, 0, 0, 0, 0, -1, -1, "d2", "", -1, len(RECORD), -1]],
            RECORD * 2,
            "op 2: lane must be >= 0",
        ),
        ([GOOD, ["P", "u1", T0, 100]], RECORD, "op 2: a purchase needs 5 fields"),
        ([GOOD, ["Q", "u1", T0, 100, 100]], RECORD, 'op 2: kind must be "D" or "P"'),
        ([[*GOOD[:-2], len(RECORD) - 1, 0], GOOD], RECORD * 2, "op 1: its record is not"),
        ([GOOD], RECORD + b"G[]", "the records are"),
    ],
    ids=[
        "fraction",
        "null user",
        "null ts",
        "arm",
        "lane",
        "short",
        "kind",
        "misaligned",
        "extra",
    ],
)
async def test_a_malformed_packed_op_is_refused_before_anything_is_written(
    services: Services,
    isolation: Isolation,
    ops: list[list[object]],
    records: bytes,
    refusal: str,
) -> None:
    """The script checks the whole batch first: a script that fails halfway keeps its writes
    (a budget spent, no outcome returned), so a bad op after a good one writes nothing."""
    client = aioredis.Redis.from_url(services.redis_url)
    prefix = isolation.redis_prefix
    commit = BatchCommit(client, prefix=prefix)
    try:
        # the good op alone is granted: the packing above is the one the script expects
        reply = await commit(ledger=_packed(GOOD, records=RECORD))
        assert list(reply.outcomes) == [1]
        await delete_prefix(client, prefix)
        with pytest.raises(ResponseError, match=re.escape(f"ledger: {refusal}")) as refused:
            await commit(ledger=_packed(*ops, records=records))
        assert "nothing was written" in str(refused.value)
        assert await keys_under(client, prefix) == set()
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_the_reply_wait_is_open_exactly_while_a_call_waits_for_its_reply(
    services: Services, isolation: Isolation
) -> None:
    """What the worker decodes its next batch in: open once the call is sent, closed when its
    reply (or its failure) is back."""
    client = aioredis.Redis.from_url(services.redis_url)
    prefix = isolation.redis_prefix
    reply_wait = ReplyWait()
    commit = BatchCommit(client, prefix=prefix, reply_wait=reply_wait)
    try:
        call = asyncio.ensure_future(commit(ledger=_packed(GOOD, records=RECORD)))
        await asyncio.wait_for(reply_wait.opened(), 10)
        assert not call.done(), "opened while the call was waiting"
        reply = await call
        assert list(reply.outcomes) == [1]
        assert not reply_wait.is_open()
        with pytest.raises(ResponseError):
            await commit(ledger=_packed(GOOD, records=b""))  # malformed: refused
        assert not reply_wait.is_open(), "closed after a failed call too"
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


# -- forget -------------------------------------------------------------------------------------


async def test_forget_removes_the_user_key_and_its_label_index_members(
    services: Services, isolation: Isolation
) -> None:
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        ledger = RedisLedger(client, prefix=prefix, config=PLAIN)
        offer = OfferLimits(100, cooldown_ms=HOUR_MS, max_per_day=3, budget_cents=10_000)
        gone, kept = "u{gone}", "u-kept"
        ops: list[LedgerOp] = []
        for k in range(3):
            for user in (gone, kept):
                for campaign in ("alpha", "beta"):
                    request = _request(
                        f"{campaign}-{user}-{k}",
                        user,
                        T0 + k * MINUTE_MS,
                        campaign=campaign,
                        offer=offer if k == 0 else None,
                    )
                    # the gone user's decisions on two lanes (as after a repartition)
                    lane = k % 2 if user == gone else 0
                    ops.append(dataclasses.replace(request, lane=lane))
        await ledger.settle(ops, now_ms=T0)
        assert await ledger.pending_count() == 12
        gone_tag, kept_tag = hash_tag(gone), hash_tag(kept)
        before = await keys_under(client, prefix)
        assert f"{prefix}u:{{{gone_tag}}}" in before

        assert await ledger.forget(gone) == 1

        after = await keys_under(client, prefix)
        # lane 1's index held the gone user alone
        assert before - after == {f"{prefix}u:{{{gone_tag}}}", f"{prefix}lq:1"}
        members = [_text(m) for m in await client.zrange(f"{prefix}lq:0", 0, -1)]
        assert members == [kept_tag]
        counts = {_text(k): int(v) for k, v in (await client.hgetall(f"{prefix}pn")).items()}
        assert counts == {"0": 6, "1": 0}
        assert await ledger.pending_count() == 6
        # Budgets are per campaign, not personal: they stay.
        assert await ledger.budget_spent_cents("alpha", event_day(T0)) == 200
        assert await ledger.forget(gone) == 0
        # The forgotten user's decisions are never labelled; the kept user's are.
        result = await ledger.settle(
            [PurchaseNotice(gone, T0 + 5 * MINUTE_MS), PurchaseNotice(kept, T0 + 5 * MINUTE_MS)],
            now_ms=T0 + 2 * WINDOW,
        )
        converted = [e for e in result.events if e.kind is LabelKind.CONVERTED]
        assert {e.decision.user_id for e in result.events} == {kept}
        assert len(converted) == 6
        # A forgotten user starts from scratch: no cooldown, no interval, no day count.
        fresh = await ledger.settle(
            [_request("again", gone, T0 + 4 * MINUTE_MS, offer=offer, interval_ms=HOUR_MS)],
            now_ms=T0 + 2 * WINDOW,
        )
        assert fresh.outcomes == [DecisionOutcome(True, True)]
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


# -- concurrency --------------------------------------------------------------------------------

WORKERS = 8


async def _race(
    redis_url: str, prefix: str, budget: int, costs: Sequence[Sequence[int]]
) -> list[list[tuple[int, bool, str | None]]]:
    """Each worker settles its offers (one per user, in small batches) on its own client;
    returns (cost, granted, denied_by) per offer per worker."""
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(WORKERS)]
    start = asyncio.Event()

    async def worker(index: int) -> list[tuple[int, bool, str | None]]:
        ledger = RedisLedger(clients[index], prefix=prefix, config=PLAIN)
        await clients[index].ping()  # connect before the race starts
        await start.wait()
        reported: list[tuple[int, bool, str | None]] = []
        mine = costs[index]
        for batch_start in range(0, len(mine), 5):
            ops: list[LedgerOp] = [
                _request(
                    f"w{index}-{n}",
                    f"w{index}-u{n}",
                    T0 + n,
                    offer=OfferLimits(cost, budget_cents=budget),
                )
                for n, cost in enumerate(mine[batch_start : batch_start + 5], start=batch_start)
            ]
            result = await ledger.settle(ops, now_ms=T0)
            for op, outcome in zip(ops, result.outcomes, strict=True):
                assert isinstance(op, DecisionRequest) and op.offer is not None
                assert outcome is not None and outcome.decided
                reported.append((op.offer.cost_cents, outcome.granted, outcome.denied_by))
            await asyncio.sleep(0)
        return reported

    try:
        tasks = [asyncio.create_task(worker(i)) for i in range(WORKERS)]
        await asyncio.sleep(0.05)
        start.set()
        return list(await asyncio.gather(*tasks))
    finally:
        for client in clients:
            await client.aclose()


async def test_a_ledger_forgets_remembered_decision_times_when_a_user_is_forgotten(
    services: Services, isolation: Isolation
) -> None:
    """``rate_limited`` answers from the decisions this ledger settled; after ``forget`` (by
    another process: the CLI) its next call sees the new state epoch and forgets them, so the
    forgotten user's next decision is proposed and made."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        worker = RedisLedger(client, prefix=prefix, config=PLAIN)
        cli = RedisLedger(client, prefix=prefix, config=PLAIN)
        assert not worker.rate_limited("u1", "alpha", T0, HOUR_MS)
        await worker.settle([_request("first", "u1", T0, interval_ms=HOUR_MS)], now_ms=T0)
        await worker.settle([_request("other", "u2", T0, interval_ms=HOUR_MS)], now_ms=T0)
        assert worker.rate_limited("u1", "alpha", T0 + MINUTE_MS, HOUR_MS)
        assert not worker.rate_limited("u1", "alpha", T0 + HOUR_MS, HOUR_MS)
        assert not worker.rate_limited("u1", "beta", T0 + MINUTE_MS, HOUR_MS)
        assert worker.rate_limited("u2", "alpha", T0 + MINUTE_MS, HOUR_MS)

        await cli.forget("u1")
        # Without a round trip the worker cannot know yet; the script checks every decision.
        assert worker.rate_limited("u1", "alpha", T0 + MINUTE_MS, HOUR_MS)
        later = T0 + 2 * MINUTE_MS
        result = await worker.settle(
            [_request("second", "u1", later, interval_ms=HOUR_MS)], now_ms=later
        )
        assert result.outcomes == [DecisionOutcome(decided=True)]
        # What it remembered before is gone, the decision it just made is remembered.
        assert not worker.rate_limited("u2", "alpha", T0 + MINUTE_MS, HOUR_MS)
        assert worker.rate_limited("u1", "alpha", later + MINUTE_MS, HOUR_MS)
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_a_ledger_remembers_decision_times_of_its_bound_of_users_per_campaign(
    services: Services, isolation: Isolation
) -> None:
    """``remembered_users`` bounds the decision times per campaign, the oldest going first; a
    time no longer remembered only means the script refuses the proposal instead."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        ledger = RedisLedger(client, prefix=prefix, config=PLAIN, remembered_users=2)
        for n, user in enumerate(("u1", "u2", "u3")):
            request = _request(f"d{n}", user, T0, interval_ms=HOUR_MS)
            await ledger.settle([request], now_ms=T0)
        later = T0 + MINUTE_MS
        assert [ledger.rate_limited(u, "alpha", later, HOUR_MS) for u in ("u1", "u2", "u3")] == [
            False,
            True,
            True,
        ]
        again = _request("again", "u1", later, interval_ms=HOUR_MS)
        result = await ledger.settle([again], now_ms=later)
        assert result.outcomes == [DecisionOutcome(decided=False)]  # the script still knew
        with pytest.raises(ValueError, match="remembered_users"):
            RedisLedger(client, prefix=prefix, config=PLAIN, remembered_users=0)
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_a_ledger_forgets_decision_times_whose_interval_has_passed(
    services: Services, isolation: Isolation
) -> None:
    """A remembered time older than its campaign's interval before the event-time clock goes:
    only a late event could still fall inside it, and the script refuses that one itself."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        ledger = RedisLedger(client, prefix=prefix, config=PLAIN)
        first = _request("d1", "u1", T0, interval_ms=HOUR_MS)
        second = _request("d2", "u2", T0 + 30 * MINUTE_MS, interval_ms=HOUR_MS)
        await ledger.settle([first, second], now_ms=T0 + 30 * MINUTE_MS)
        assert ledger.rate_limited("u1", "alpha", T0 + 59 * MINUTE_MS, HOUR_MS)
        await ledger.settle([], now_ms=T0 + HOUR_MS + 1)  # past u1's interval, not u2's
        assert not ledger.rate_limited("u1", "alpha", T0 + 59 * MINUTE_MS, HOUR_MS)
        assert ledger.rate_limited("u2", "alpha", T0 + 61 * MINUTE_MS, HOUR_MS)
        late = _request("late", "u1", T0 + 59 * MINUTE_MS, interval_ms=HOUR_MS)
        result = await ledger.settle([late], now_ms=T0 + HOUR_MS + 1)
        assert result.outcomes == [DecisionOutcome(decided=False)]  # the script still knew
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


@pytest.mark.parametrize("seed", [1, 2])
async def test_concurrent_workers_never_overspend_a_shared_budget(
    services: Services, isolation: Isolation, seed: int
) -> None:
    prefix = isolation.redis_prefix
    rng = random.Random(seed)
    budget = 10_007  # cents, deliberately not a round multiple of anything
    costs = [[rng.randint(1, 400) for _ in range(60)] for _ in range(WORKERS)]
    assert sum(map(sum, costs)) > 5 * budget  # plenty of contention
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        results = await _race(services.redis_url, prefix, budget, costs)
        granted = [cost for worker in results for cost, ok, _ in worker if ok]
        spent = await RedisLedger(client, prefix=prefix, config=PLAIN).budget_spent_cents(
            "alpha", event_day(T0)
        )
        assert spent == sum(granted) <= budget
        assert all(len(worker) == 60 for worker in results)
        for worker in results:
            for cost, ok, denied_by in worker:
                assert ok or denied_by == "budget"
                if not ok:
                    # Spending only grows: a denied offer would not fit even now.
                    assert spent + cost > budget
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_concurrent_workers_grant_exactly_what_fits(
    services: Services, isolation: Isolation
) -> None:
    prefix = isolation.redis_prefix
    cost, budget = 7, 1000  # 142 offers fit (994 cents); the 143rd would overspend by 1 cent
    costs = [[cost] * 40 for _ in range(WORKERS)]
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        results = await _race(services.redis_url, prefix, budget, costs)
        granted = sum(ok for worker in results for _, ok, _ in worker)
        assert granted == budget // cost == 142
        assert len({i for i, worker in enumerate(results) if any(ok for _, ok, _ in worker)}) > 1
        ledger = RedisLedger(client, prefix=prefix, config=PLAIN)
        assert await ledger.budget_spent_cents("alpha", event_day(T0)) == 994
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


# -- the worker's one call per batch: a lost reply ---------------------------------------------


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "never-ran"])
async def test_a_call_whose_reply_is_lost_is_read_back_from_its_outbox_entry_or_run_once(
    services: Services, isolation: Isolation, landed: bool
) -> None:
    """The connection drops around the batch's call (features, ledger and outbox entry in
    one): if the call had landed, its reply is read back from its entry; if it never ran, it
    runs now. Either way the offer is granted once and the budget charged once."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    store = RedisFeatureStore(client, prefix=prefix, defer_writes=True)
    ledger = RedisLedger(
        client,
        prefix=prefix,
        config=PLAIN,
        features=store,
        outbox=Outbox(client, prefix=prefix),
        retry_deadline_s=10,
    )
    real = ledger._commit
    calls = 0

    async def lossy(**sections: Any) -> CommitReply:
        nonlocal calls
        calls += 1
        if calls == 1:
            if landed:
                await real(**sections)
            raise RedisConnectionError("the reply was lost (test)")
        return await real(**sections)

    ledger._commit = lossy  # type: ignore[assignment]
    try:
        update = StateUpdate("u1", "e1", T0, [], position=Position("b", 0, 41))
        await store.apply_batch([update], allowed_lateness_ms=HOUR_MS)
        offer = OfferLimits(250, budget_cents=1000)
        settled = await ledger.settle([_request("d1", "u1", T0, offer=offer)], now_ms=T0)
        assert settled.outcomes == [DecisionOutcome(decided=True, granted=True)]
        assert calls == (1 if landed else 2)
        assert await ledger.budget_spent_cents("alpha", T0 // (24 * HOUR_MS)) == 250
        assert await store.watermarks() == {("b", 0): 41}
        assert await client.hlen(f"{prefix}ob") == 1, "the batch's entry waits for its commit"
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_an_outbox_entry_goes_once_every_owner_of_its_partitions_released_it(
    services: Services, isolation: Isolation
) -> None:
    """An entry's partitions may go to several workers after a crash: each recovers the entry
    for its own users and releases its partitions; the last one deletes it."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    outbox = Outbox(client, prefix=prefix)
    try:
        write = outbox.write([None], [("b:0", 41), ("b:1", 7), ("s:1", 3)])
        assert write is not None
        await BatchCommit(client, prefix=prefix)(outbox=write)
        other = f"{write.entry_id[:-1]}9"  # another writer's id: released alike
        await client.hset(f"{prefix}ob", other, b'{"outcomes":[],"events":[]}\n[]')
        await client.hset(f"{prefix}obc", other, b'{"b:1":5}')
        await outbox.release({write.entry_id: {"b:1", "s:1"}, other: {"b:1"}})
        assert await outbox.coverage() == {write.entry_id: {"b:0": 41}}
        assert [e.entry_id for e in await outbox.read(await outbox.coverage())] == [write.entry_id]
        await outbox.release({write.entry_id: {"b:0"}, "gone:1": {"b:0"}})
        assert await outbox.coverage() == {}
        assert await client.hlen(f"{prefix}ob") == 0
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_a_call_no_replica_acknowledged_is_never_returned(
    services: Services, isolation: Isolation
) -> None:
    """``WAIT 1`` on a Redis without replicas (the shared one): the call runs once, every
    retry finds its entry and waits again, and at the deadline the worker's batch fails with
    ``replication``: nothing of it was handed back to be published or committed."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    shortfalls = 0

    def counted() -> None:
        nonlocal shortfalls
        shortfalls += 1

    wait = ReplicaWait(client, prefix=prefix, replicas=1, timeout_ms=20, on_shortfall=counted)
    store = RedisFeatureStore(client, prefix=prefix, defer_writes=True)
    ledger = RedisLedger(
        client,
        prefix=prefix,
        config=PLAIN,
        features=store,
        outbox=Outbox(client, prefix=prefix, replication=wait),
        retry_deadline_s=1.2,
        replication=wait,
    )
    try:
        update = StateUpdate("u1", "e1", T0, [], position=Position("b", 0, 41))
        await store.apply_batch([update], allowed_lateness_ms=HOUR_MS)
        offer = OfferLimits(250, budget_cents=1000)
        with pytest.raises(RedisBatchFailed) as failed:
            await ledger.settle([_request("d1", "u1", T0, offer=offer)], now_ms=T0)
        assert failed.value.failure.code == "replication"
        assert shortfalls >= 2  # the call's own WAIT, then each read of its entry
        # It ran once: charged once, its entry there for the restart to publish.
        assert await ledger.budget_spent_cents("alpha", T0 // (24 * HOUR_MS)) == 250
        assert await client.hlen(f"{prefix}ob") == 1
        assert int(await client.get(wait.barrier_key)) >= 1
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


async def test_a_batch_of_dead_letters_alone_still_stores_the_offers_granted_before_it(
    services: Services, isolation: Isolation
) -> None:
    """The engine runs a batch that released no event (its records were all dead-lettered):
    the offers the batch before granted must still reach their users' state with its call,
    not be staged and dropped (found by the chaos suite: offers missing from users' state)."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    store = RedisFeatureStore(client, prefix=prefix, defer_writes=True)
    campaigns = parse_campaigns(
        tomllib.loads(
            '[[campaign]]\nname = "everyone"\npolicy = "threshold"\nthreshold = 0.0\n'
            "discount_pct = 10\ndecision_interval_s = 0\n"
        )
    )
    config = EngineConfig(learn_inline=False)
    engine = DiscountEngine(
        store,
        ledger=RedisLedger(
            client,
            prefix=prefix,
            config=config.ledger_config(campaigns),
            features=store,
            outbox=Outbox(client, prefix=prefix),
        ),
        campaigns=campaigns,
        config=config,
    )

    def cart(user: str, offset: int) -> Incoming:
        event = BrowseEvent(f"e{offset}", user, T0 + offset, "i1", "c1", 20.0, action="cart")
        return Incoming(event, Position("b", 0, offset))

    try:
        first = await engine.process([cart("u1", 0)])
        assert len(first.offers) == 1
        await engine.process([])  # the next batch: dead letters only
        state = (await store.read_states(["u1"]))["u1"]
        assert compute_features(state)["offer_count_30d"] == 1
        await engine.process([cart("u2", 1)])
        state = (await store.read_states(["u1"]))["u1"]
        assert compute_features(state)["offer_count_30d"] == 1
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()
