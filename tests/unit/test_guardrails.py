"""Campaign guardrails through the engine (engine/pipeline.py) and the ledger (engine/ledger.py).

Eligibility (categories, new vs returning customers, triggers), holdout, decision interval,
cooldown, offers per day, daily budget, denial records, the max-discount cap, offer contents,
output schemas and delayed labels. A fresh model predicts 0.5 for everyone, so a threshold of
0.3 makes an offer on every eligible trigger unless a guardrail says no.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from dealstream_native import stable_id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from engine.campaigns import Campaign
from engine.decisions import Decision, Offer, in_holdout, offer_cost_cents
from engine.events import BrowseEvent, Event, PurchaseEvent, PurchaseItem, SearchEvent
from engine.features.state import DAY_MS, HOUR_MS, MINUTE_MS
from engine.features.store import InMemoryFeatureStore
from engine.labels import LabelEvent, LabelKind, PendingDecision
from engine.ledger import DecisionRequest, InMemoryLedger, OfferLimits, event_day
from engine.model.feedback import TrainingExample
from engine.model.purchase_model import PurchaseModel
from engine.pipeline import DiscountEngine, EngineConfig, Incoming
from engine.policies.linear import LinearPolicy
from engine.policies.profit import ProfitPolicy
from engine.policies.threshold import ThresholdPolicy

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
T0 = 1_767_225_600_000
"""2026-01-01T00:00:00Z: a UTC midnight."""
SECOND = 1000


@cache
def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def assert_valid(name: str, doc: object) -> None:
    errors = [error.message for error in validator(name).iter_errors(doc)]
    assert errors == [], (name, errors, doc)


# -- builders -----------------------------------------------------------------------------------


def campaign(name: str = "spring", **changes: Any) -> Campaign:
    options: dict[str, Any] = {
        "name": name,
        "policy": ThresholdPolicy(threshold=0.3, discount_pct=10.0),
        "offer_ttl_ms": HOUR_MS,
        "decision_interval_ms": 0,
    }
    options.update(changes)
    return Campaign(**options)


def view(
    event_id: str,
    ts: int,
    user_id: str = "u1",
    *,
    action: str = "view",
    category: str = "books",
    price: float = 20.0,
) -> BrowseEvent:
    return BrowseEvent(event_id, user_id, ts, "i1", category, price, action)  # type: ignore[arg-type]


def cart(event_id: str, ts: int, user_id: str = "u1", **kwargs: Any) -> BrowseEvent:
    return view(event_id, ts, user_id, action="cart", **kwargs)


def search(event_id: str, ts: int, user_id: str = "u1", category: str | None = None) -> SearchEvent:
    return SearchEvent(event_id, user_id, ts, "novel", category)


def purchase(
    event_id: str, ts: int, user_id: str = "u1", offer_id: str | None = None
) -> PurchaseEvent:
    item = PurchaseItem(item_id="i1", category="books", price=20.0, quantity=1)
    return PurchaseEvent(event_id, user_id, ts, f"o-{event_id}", (item,), 20.0, offer_id)


@dataclass
class Outputs:
    offers: list[Offer] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    training: list[TrainingExample] = field(default_factory=list)
    labels: list[LabelEvent] = field(default_factory=list)
    denied: Counter[str] = field(default_factory=Counter)

    def labelled(self, kind: LabelKind) -> list[tuple[str, int, int]]:
        """(decision id, label, event time) of the label events of one kind, in order."""
        return [(e.decision.decision_id, e.label, e.ts) for e in self.labels if e.kind is kind]

    def decided(self, campaign_name: str | None = None) -> list[str]:
        """Trigger event ids of the decisions (of one campaign), in order."""
        return [
            d.trigger_event_id
            for d in self.decisions
            if campaign_name is None or d.campaign == campaign_name
        ]

    def offered(self) -> list[str]:
        return [o.trigger_event_id for o in self.offers]

    def decision_for(self, event_id: str, campaign_name: str = "spring") -> Decision:
        (found,) = [
            d
            for d in self.decisions
            if d.trigger_event_id == event_id and d.campaign == campaign_name
        ]
        return found


def engine_with(
    *campaigns: Campaign, model: PurchaseModel | None = None, window_ms: int = DAY_MS
) -> DiscountEngine:
    return DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=campaigns or (campaign(),),
        model=model,
        config=EngineConfig(attribution_window_ms=window_ms),
    )


async def run(engine: DiscountEngine, events: Sequence[Event], batch_size: int = 50) -> Outputs:
    """Feed events in micro-batches; every output is checked against its JSON Schema."""
    out = Outputs()
    for start in range(0, len(events), batch_size):
        result = await engine.process([Incoming(e) for e in events[start : start + batch_size]])
        out.offers.extend(result.offers)
        out.decisions.extend(result.decisions)
        out.training.extend(result.training)
        out.labels.extend(result.labels)
        out.denied.update(result.denied)
    for offer in out.offers:
        assert_valid("offer.v1.json", offer.to_message())
    for decision in out.decisions:
        assert_valid("decision.v1.json", decision.to_message())
    for example in out.training:
        assert_valid("training.v1.json", example.to_message())
    return out


def trained_model() -> PurchaseModel:
    """A model with non-zero weights, so reasons carry non-zero contributions."""
    model = PurchaseModel()
    busy = {"cart_count_24h": 3.0, "view_count_1h": 5.0, "session_events": 6.0}
    idle = {"view_count_1h": 1.0, "session_events": 1.0}
    for _ in range(30):
        model.learn_one(busy, 10.0, 1)
        model.learn_one(idle, 0.0, 0)
    return model


# -- eligibility --------------------------------------------------------------------------------


async def test_categories_restrict_eligible_triggers() -> None:
    engine = engine_with(campaign(categories=("books", "toys")))
    out = await run(
        engine,
        [
            view("b", T0, category="books"),
            view("t", T0 + 1, category="toys"),
            view("h", T0 + 2, category="home"),
            search("s-books", T0 + 3, category="books"),
            search("s-none", T0 + 4, category=None),
            search("s-home", T0 + 5, category="home"),
        ],
    )
    assert out.decided() == ["b", "t", "s-books"]
    assert out.offered() == ["b", "t", "s-books"]


async def test_empty_categories_mean_every_category() -> None:
    out = await run(engine_with(campaign()), [view("h", T0, category="home"), search("s", T0 + 1)])
    assert out.decided() == ["h", "s"]


async def test_triggers_restrict_event_kinds_and_purchases_never_trigger() -> None:
    engine = engine_with(campaign(triggers=("cart", "search")))
    out = await run(
        engine,
        [
            view("v", T0),
            view("f", T0 + 1, action="favorite"),
            cart("c", T0 + 2),
            search("s", T0 + 3),
            purchase("p", T0 + 4),
        ],
    )
    assert out.decided() == ["c", "s"]


async def test_new_and_returning_customers() -> None:
    """New = no purchase in the last 30 days (of event time); returning = at least one."""
    engine = engine_with(
        campaign("for-all", customers="all"),
        campaign("for-new", customers="new"),
        campaign("for-returning", customers="returning"),
    )
    now = T0 + 40 * DAY_MS
    events: list[Event] = [
        # "recent" bought yesterday; "lapsed" bought 35 days ago; "fresh" never bought.
        purchase("p-recent", now - DAY_MS, user_id="recent"),
        purchase("p-lapsed", now - 35 * DAY_MS, user_id="lapsed"),
        view("x-recent", now, user_id="recent"),
        view("x-lapsed", now + 1, user_id="lapsed"),
        view("x-fresh", now + 2, user_id="fresh"),
    ]
    # The lapsed purchase is far older than the allowed lateness: give it its own batch first.
    out = await run(engine, events[1:2])
    out2 = await run(engine, events[:1] + events[2:])
    assert out.decisions == []
    assert out2.decided("for-all") == ["x-recent", "x-lapsed", "x-fresh"]
    assert out2.decided("for-new") == ["x-lapsed", "x-fresh"]
    assert out2.decided("for-returning") == ["x-recent"]


async def test_a_purchase_in_the_same_batch_makes_a_customer_returning() -> None:
    engine = engine_with(
        campaign("for-new", customers="new"), campaign("ret", customers="returning")
    )
    out = await run(engine, [view("before", T0), purchase("p", T0 + 1), view("after", T0 + 2)])
    assert out.decided("for-new") == ["before"]
    assert out.decided("ret") == ["after"]


# -- holdout ------------------------------------------------------------------------------------


def test_holdout_is_deterministic_per_user_and_campaign() -> None:
    a, b = campaign("a", holdout=0.5), campaign("b", holdout=0.5)
    users = [f"user-{i}" for i in range(2000)]
    first = [in_holdout(a, u) for u in users]
    assert first == [in_holdout(a, u) for u in users]
    assert first == [in_holdout(campaign("a", holdout=0.5, seed=9), u) for u in users]
    # Another campaign draws another split (independent hashes, so they differ often).
    other = [in_holdout(b, u) for u in users]
    disagreements = sum(x != y for x, y in zip(first, other, strict=True))
    assert 0.4 < disagreements / len(users) < 0.6


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.9])
def test_holdout_fraction_over_20000_users(fraction: float) -> None:
    users = [f"u{i:07d}" for i in range(20_000)]
    held = sum(in_holdout(campaign("summer", holdout=fraction), u) for u in users)
    assert abs(held / len(users) - fraction) <= 0.015


def test_holdout_zero_and_one() -> None:
    users = [f"u{i}" for i in range(1000)]
    assert not any(in_holdout(campaign(holdout=0.0), u) for u in users)
    assert all(in_holdout(campaign(holdout=1.0), u) for u in users)


def test_holdout_grows_monotonically_with_the_fraction() -> None:
    """A user held out at 10 % stays held out at 20 %: raising the fraction only adds users."""
    users = [f"u{i}" for i in range(3000)]
    small = {u for u in users if in_holdout(campaign(holdout=0.1), u)}
    large = {u for u in users if in_holdout(campaign(holdout=0.2), u)}
    assert small < large


@pytest.mark.parametrize("policy", [ThresholdPolicy(threshold=0.0), ProfitPolicy(epsilon=1.0)])
async def test_holdout_users_never_get_offers_but_their_decisions_are_logged(policy: Any) -> None:
    c = campaign(holdout=0.3, policy=policy)
    users = [f"u{i:04d}" for i in range(300)]
    events: list[Event] = [cart(f"e-{u}", T0 + i, user_id=u) for i, u in enumerate(users)]
    events += [purchase(f"p-{u}", T0 + HOUR_MS + i, user_id=u) for i, u in enumerate(users)]
    out = await run(engine_with(c), events)
    held = {u for u in users if in_holdout(c, u)}
    assert 60 < len(held) < 120
    assert len(out.decisions) == len(users)
    assert not any(o.user_id in held for o in out.offers)
    for decision in out.decisions:
        is_held = decision.user_id in held
        assert decision.holdout is is_held
        if is_held:
            assert decision.discount_pct == 0.0
            assert decision.offer_id is None
            assert decision.propensity == 1.0
            assert "holdout" in decision.rules
    if isinstance(policy, ThresholdPolicy):
        assert {o.user_id for o in out.offers} == set(users) - held
    # Holdout decisions are labelled like any other (the control group's conversions).
    labelled = {e.decision_id for e in out.training}
    assert labelled == {d.decision_id for d in out.decisions}


# -- decision interval --------------------------------------------------------------------------


async def test_decision_interval_rate_limits_decisions() -> None:
    interval = 10 * MINUTE_MS
    engine = engine_with(campaign(decision_interval_ms=interval))
    events = [
        view("e0", T0),
        view("e1", T0 + 5 * MINUTE_MS),
        view("e2", T0 + interval - 1),
        view("e3", T0 + interval),
        view("e4", T0 + interval + 1),
        view("other", T0 + 1, user_id="u2"),
        view("e5", T0 + 3 * interval),
    ]
    out = await run(engine, events, batch_size=3)
    assert out.decided() == ["e0", "e3", "other", "e5"]
    # Rate-limited triggers leave no pending decision behind: only decided ones are labelled.
    engine2 = engine_with(campaign(decision_interval_ms=interval))
    out2 = await run(engine2, [*events, purchase("p", T0 + 3 * interval + 1)])
    converted = [d for d, _, _ in out2.labelled(LabelKind.CONVERTED)]
    assert converted == [stable_id("d-", "spring", e) for e in ("e0", "e3", "e5")]


async def test_out_of_order_events_do_not_break_the_decision_interval() -> None:
    interval = 10 * MINUTE_MS
    engine = engine_with(campaign(decision_interval_ms=interval, cooldown_ms=interval))
    # e2 and e3 arrive late (within the 1 h allowed lateness), 5 minutes apart.
    events = [view("e1", T0 + HOUR_MS), view("e2", T0), view("e3", T0 + 5 * MINUTE_MS)]
    out = await run(engine, events, batch_size=1)
    stamps = sorted(d.ts for d in out.decisions)
    assert all(b - a >= interval for a, b in itertools.pairwise(stamps)), stamps


# -- cooldown -----------------------------------------------------------------------------------


def assert_denied(decision: Decision, rule: str) -> None:
    assert decision.discount_pct == 0.0
    assert decision.offer_id is None
    assert f"denied:{rule}" in decision.rules
    assert decision.denied_by == rule
    assert decision.cost_cents == 0
    assert decision.holdout is False


async def test_cooldown_denies_offers_too_soon_after_the_last_one() -> None:
    engine = engine_with(campaign(cooldown_ms=HOUR_MS))
    out = await run(
        engine,
        [
            view("e0", T0),
            view("e1", T0 + 30 * MINUTE_MS),
            view("e2", T0 + HOUR_MS - 1),
            view("u2", T0 + 1, user_id="u2"),  # cooldown is per user
            view("e3", T0 + HOUR_MS),
            view("e4", T0 + HOUR_MS + 1),
        ],
    )
    assert out.decided() == ["e0", "e1", "e2", "u2", "e3", "e4"]
    assert out.offered() == ["e0", "u2", "e3"]
    for denied in ("e1", "e2", "e4"):
        assert_denied(out.decision_for(denied), "cooldown")
    assert out.denied == Counter(cooldown=3)
    # A denied decision's p_purchase is the prediction without a discount.
    model = PurchaseModel()
    features = out.decision_for("e1").features
    assert out.decision_for("e1").p_purchase == round(model.predict_one(features, 0.0), 6)


# -- max offers per day -------------------------------------------------------------------------


async def test_max_offers_per_day_resets_at_the_utc_day_rollover() -> None:
    engine = engine_with(campaign(max_offers_per_day=2))
    day1 = T0 + 5 * DAY_MS
    day2 = day1 + DAY_MS
    out = await run(
        engine,
        [
            view("a", day1 + 22 * HOUR_MS),
            view("b", day1 + 23 * HOUR_MS),
            view("c", day2 - 1),  # 23:59:59.999 -> third offer of the day: denied
            view("other", day2 - 1, user_id="u2"),  # the limit is per user
            view("d", day2),  # 00:00:00.000 of the next UTC day: allowed again
            view("e", day2 + 1),
            view("f", day2 + 2),  # third of day 2: denied
        ],
    )
    assert event_day(day2) == event_day(day1) + 1
    assert out.offered() == ["a", "b", "other", "d", "e"]
    assert_denied(out.decision_for("c"), "max_offers_per_day")
    assert_denied(out.decision_for("f"), "max_offers_per_day")
    assert out.denied == Counter(max_offers_per_day=2)


async def test_max_offers_per_day_zero_denies_everything() -> None:
    out = await run(engine_with(campaign(max_offers_per_day=0)), [view("a", T0), view("b", T0 + 1)])
    assert out.offered() == []
    assert out.decided() == ["a", "b"]
    assert out.denied == Counter(max_offers_per_day=2)


async def test_guardrails_are_checked_in_order_cooldown_first() -> None:
    engine = engine_with(campaign(cooldown_ms=HOUR_MS, max_offers_per_day=1, daily_budget_cents=1))
    out = await run(engine, [view("a", T0, price=0.01), view("b", T0 + 1)])
    # The first offer costs 10 % of 0.01 rounded up = 1 cent and just fits the 1-cent budget;
    # the second breaks all three guardrails and the cooldown is checked first.
    assert await engine.ledger.budget_spent_cents("spring", event_day(T0)) == 1
    assert out.offered() == ["a"]
    assert_denied(out.decision_for("b"), "cooldown")


# -- daily budget -------------------------------------------------------------------------------


async def test_daily_budget_in_cents_and_its_reset_on_the_next_day() -> None:
    # 10 % of 20.00 = 200 cents per offer; budget 5.00 = 500 cents per event-time day.
    engine = engine_with(campaign(daily_budget_cents=500))
    day2 = T0 + DAY_MS
    out = await run(
        engine,
        [
            view("a", T0, user_id="u1"),
            view("b", T0 + 1, user_id="u2"),
            view("c", T0 + 2, user_id="u3"),  # 400 + 200 > 500: denied
            view("d", T0 + 3, user_id="u4", price=10.0),  # 400 + 100 = 500: fits exactly
            view("e", T0 + 4, user_id="u5", price=0.1),  # 10 % of 0.10 = 1 cent: over
            view("f", day2, user_id="u6"),  # a new day, a new budget
            view("g", day2 + 1, user_id="u7"),
            view("h", day2 + 2, user_id="u8"),
        ],
    )
    assert out.offered() == ["a", "b", "d", "f", "g"]
    for denied in ("c", "e", "h"):
        assert_denied(out.decision_for(denied), "budget")
    ledger = engine.ledger
    assert await ledger.budget_spent_cents("spring", event_day(T0)) == 500
    assert await ledger.budget_spent_cents("spring", event_day(day2)) == 400


async def test_live_budgets_count_by_the_wall_clock_day_whatever_the_events_times() -> None:
    """A replay of a week of history into a live worker spends today's budget: it cannot open
    a fresh budget for every day of the past (``budget_clock="wall"``)."""
    today = T0 + 30 * DAY_MS + 9 * HOUR_MS
    history = [view(f"v{day}", T0 + day * DAY_MS, user_id=f"u{day}") for day in range(5)]
    live = DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=(campaign(daily_budget_cents=500),),
        config=EngineConfig(budget_clock="wall"),
    )
    granted = []
    for minute, event in enumerate(history):  # one batch per event, all on one wall-clock day
        result = await live.process([Incoming(event)], wall_clock_ms=today + minute * 60_000)
        granted.extend(offer.trigger_event_id for offer in result.offers)
    # 200 cents per offer, 500 a day: two offers today, whatever day the events are from
    assert granted == ["v0", "v1"]
    assert await live.ledger.budget_spent_cents("spring", event_day(today)) == 400
    assert await live.ledger.budget_spent_cents("spring", event_day(T0)) == 0

    backtest = engine_with(campaign(daily_budget_cents=500))
    out = await run(backtest, history, batch_size=1)
    assert out.offered() == [f"v{day}" for day in range(5)], "each event-time day its own"


async def test_a_wall_clock_budget_needs_the_batch_wall_clock() -> None:
    live = DiscountEngine(InMemoryFeatureStore(), config=EngineConfig(budget_clock="wall"))
    with pytest.raises(ValueError, match="wall_clock_ms"):
        await live.process([Incoming(view("a", T0))])


async def test_budgets_are_per_campaign() -> None:
    engine = engine_with(
        campaign("a", daily_budget_cents=200), campaign("b", daily_budget_cents=400)
    )
    out = await run(engine, [view(f"e{i}", T0 + i, user_id=f"u{i}") for i in range(4)])
    offers = Counter(o.campaign for o in out.offers)
    assert offers == Counter(a=1, b=2)
    assert await engine.ledger.budget_spent_cents("a", event_day(T0)) == 200
    assert await engine.ledger.budget_spent_cents("b", event_day(T0)) == 400


def _budget_request(index: int, user: int, ts: int, cost: int, budget: int) -> DecisionRequest:
    decision = PendingDecision(
        decision_id=f"d{index:05d}",
        user_id=f"u{user}",
        campaign="c",
        ts=ts,
        features={},
        discount_pct=10.0,
        propensity=1.0,
        model_version="lr-0",
        offer_id=f"o{index:05d}",
    )
    return DecisionRequest(decision, 0, OfferLimits(cost_cents=cost, budget_cents=budget))


@settings(max_examples=150, deadline=None)
@given(
    budget=st.integers(min_value=0, max_value=2000),
    requests=st.lists(
        st.tuples(
            st.integers(0, 5),  # user
            st.integers(0, 3),  # day
            st.integers(0, DAY_MS - 1),  # time of day
            st.integers(0, 600),  # cost in cents
        ),
        max_size=60,
    ),
    batch=st.integers(1, 10),
)
def test_budget_is_never_exceeded_and_a_request_that_fits_is_granted(
    budget: int, requests: list[tuple[int, int, int, int]], batch: int
) -> None:
    ledger = InMemoryLedger()
    spent: dict[int, int] = defaultdict(int)
    ops = [
        _budget_request(i, user, T0 + day * DAY_MS + tod, cost, budget)
        for i, (user, day, tod, cost) in enumerate(requests)
    ]
    for start in range(0, len(ops), batch):
        chunk = ops[start : start + batch]
        result = asyncio.run(ledger.settle(chunk, now_ms=T0))
        for op, outcome in zip(chunk, result.outcomes, strict=True):
            assert op.offer is not None and outcome is not None and outcome.decided
            day = event_day(op.decision.ts)
            fits = spent[day] + op.offer.cost_cents <= budget
            assert outcome.granted is fits
            assert outcome.denied_by == (None if fits else "budget")
            if fits:
                spent[day] += op.offer.cost_cents
            assert spent[day] <= budget
    for day in range(4):
        spent_day = asyncio.run(ledger.budget_spent_cents("c", event_day(T0) + day))
        assert spent_day == spent[event_day(T0) + day] <= budget


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget_cents=st.integers(min_value=0, max_value=5000),
    prices=st.lists(
        # A price of 0 falls back to the default order value: keep prices positive here.
        st.decimals(min_value="0.01", max_value=300, places=2).map(float),
        min_size=1,
        max_size=25,
    ),
    discount=st.sampled_from([5.0, 10.0, 12.5, 20.0]),
)
def test_engine_budget_property(budget_cents: int, prices: list[float], discount: float) -> None:
    """Through the engine: granted costs (discount % of the item price, in cents) never exceed
    the budget, and an offer is denied only when it would not fit."""
    c = campaign(
        policy=ThresholdPolicy(threshold=0.0, discount_pct=discount),
        daily_budget_cents=budget_cents,
    )
    engine = engine_with(c)
    events = [view(f"e{i}", T0 + i, user_id=f"u{i}", price=p) for i, p in enumerate(prices)]
    out = asyncio.run(run(engine, events, batch_size=7))
    assert len(out.decisions) == len(prices)
    spent = 0
    for decision, price in zip(out.decisions, prices, strict=True):
        cost = offer_cost_cents(discount, price)
        assert decision.order_value == price
        if decision.offer_id is not None:
            spent += cost
            assert decision.discount_pct == discount
            assert decision.cost_cents == cost and decision.denied_by is None
        else:
            assert spent + cost > budget_cents  # it did not fit
            assert "denied:budget" in decision.rules
            assert decision.denied_by == "budget" and decision.cost_cents == 0
    assert spent <= budget_cents
    assert asyncio.run(engine.ledger.budget_spent_cents("spring", event_day(T0))) == spent


# -- the max-discount cap -----------------------------------------------------------------------


async def test_max_discount_caps_a_linear_policy() -> None:
    # The fresh model predicts 0.5: 60 * 0.5 = 30 %, under the policy's own 50 % clip.
    c = campaign(policy=LinearPolicy(a=60.0, b=0.0, max_discount_pct=50.0), max_discount_pct=15.0)
    engine = engine_with(c)
    out = await run(engine, [view("e1", T0, price=40.0)])
    (offer,) = out.offers
    (decision,) = out.decisions
    assert offer.discount_pct == decision.discount_pct == 15.0
    assert offer.rules == ("linear:60*p+0", "cap:max_discount_pct=15")
    assert offer.p_purchase == round(PurchaseModel().predict_one(decision.features, 15.0), 6)
    # The budget is charged for the capped discount: 15 % of 40.00 = 600 cents.
    assert await engine.ledger.budget_spent_cents("spring", event_day(T0)) == 600


async def test_discount_under_the_cap_is_untouched() -> None:
    c = campaign(policy=LinearPolicy(a=20.0), max_discount_pct=15.0)
    out = await run(engine_with(c), [view("e1", T0)])
    (offer,) = out.offers
    assert offer.discount_pct == 10.0
    assert not any(rule.startswith("cap:") for rule in offer.rules)


# -- offer contents -----------------------------------------------------------------------------


async def test_offers_carry_deterministic_ids_reasons_and_rules() -> None:
    model = trained_model()
    always = campaign(policy=ThresholdPolicy(threshold=0.0, discount_pct=10.0))
    events = [cart("e1", T0), view("e2", T0 + SECOND, user_id="u2")]
    out = await run(engine_with(always, model=model), events)
    again = await run(engine_with(always, model=trained_model()), events)
    assert out.offers == again.offers
    assert len(out.offers) == 2
    for offer in out.offers:
        trigger = offer.trigger_event_id
        assert offer.offer_id == stable_id("o-", "spring", trigger)
        decision = out.decision_for(trigger)
        assert decision.offer_id == offer.offer_id
        assert decision.decision_id == stable_id("d-", "spring", trigger)
        assert offer.issued_at == decision.ts
        assert offer.expires_at == offer.issued_at + HOUR_MS
        assert offer.rules == ("p_purchase>0",)
        assert offer.policy == "threshold"
        assert offer.propensity == 1.0 and offer.explore is False
        reasons = offer.reasons
        expected = model.contributions(decision.features, offer.discount_pct)
        assert [(r.feature, r.contribution) for r in reasons] == expected
        assert len(reasons) == 3
        magnitudes = [abs(r.contribution) for r in reasons]
        assert magnitudes == sorted(magnitudes, reverse=True)
        assert magnitudes[0] > 0


async def test_every_output_of_a_busy_run_matches_its_schema() -> None:
    campaigns = (
        campaign("thr", cooldown_ms=10 * MINUTE_MS, holdout=0.2, daily_budget_cents=3000),
        campaign(
            "prof",
            policy=ProfitPolicy(epsilon=0.3),
            max_discount_pct=20.0,
            max_offers_per_day=2,
            decision_interval_ms=MINUTE_MS,
            holdout=0.1,
        ),
        campaign("lin", policy=LinearPolicy(a=80.0), max_discount_pct=25.0, customers="new"),
    )
    events: list[Event] = []
    for i in range(300):
        user = f"u{i % 17}"
        ts = T0 + i * 20 * SECOND
        if i % 11 == 5:
            events.append(purchase(f"p{i}", ts, user_id=user))
        elif i % 7 == 3:
            events.append(search(f"s{i}", ts, user_id=user, category="books" if i % 2 else None))
        else:
            events.append(cart(f"c{i}", ts, user_id=user, price=float(5 + i % 40)))
    out = await run(engine_with(*campaigns, window_ms=HOUR_MS), events)  # validates everything
    assert out.offers and out.training
    assert {d.campaign for d in out.decisions} == {"thr", "prof", "lin"}
    assert any(d.holdout for d in out.decisions)
    assert out.denied  # at least one guardrail fired
    assert {e.label for e in out.training} == {0, 1}


# -- labels -------------------------------------------------------------------------------------


async def test_a_purchase_converts_every_open_decision_of_each_campaign() -> None:
    engine = engine_with(campaign("a"), campaign("b", triggers=("cart",)))
    out = await run(
        engine,
        [
            view("v1", T0),  # a only
            cart("c1", T0 + MINUTE_MS),  # a and b
            view("v2", T0 + 2 * MINUTE_MS),  # a only
            purchase("p1", T0 + 3 * MINUTE_MS),
        ],
    )
    assert sorted(out.labelled(LabelKind.CONVERTED)) == sorted(
        (stable_id("d-", name, event), 1, T0 + 3 * MINUTE_MS)
        for name, event in (("a", "v1"), ("a", "c1"), ("a", "v2"), ("b", "c1"))
    )
    assert {e.kind for e in out.training} == {"converted"}


async def test_labels_do_not_depend_on_the_offer_a_purchase_redeems() -> None:
    engine = engine_with(campaign())
    first = await run(engine, [view("e1", T0), view("e2", T0 + MINUTE_MS)])
    offer_e1 = stable_id("o-", "spring", "e1")
    assert first.offered() == ["e1", "e2"]
    out = await run(engine, [purchase("p1", T0 + 2 * MINUTE_MS, offer_id=offer_e1)])
    assert out.labelled(LabelKind.CONVERTED) == [
        (stable_id("d-", "spring", event), 1, T0 + 2 * MINUTE_MS) for event in ("e1", "e2")
    ]
    # A decision converts once: the next purchase changes nothing.
    out2 = await run(engine, [purchase("p2", T0 + 3 * MINUTE_MS)])
    assert out2.labels == []


async def test_windows_that_pass_close_in_event_time() -> None:
    window = HOUR_MS
    engine = engine_with(campaign(), window_ms=window)
    out = await run(
        engine,
        [
            view("e1", T0),
            view("e2", T0 + 10 * MINUTE_MS, user_id="u2"),
            view("tick", T0 + window, user_id="u3"),  # deadline T0 + window is not yet past
        ],
    )
    assert out.labelled(LabelKind.CLOSED) == []
    out2 = await run(engine, [view("tock", T0 + window + 1, user_id="u3")])
    assert out2.labelled(LabelKind.CLOSED) == [(stable_id("d-", "spring", "e1"), 0, T0 + window)]
    # A purchase after the window converts nothing it no longer covers.
    out3 = await run(
        engine,
        [purchase("late", T0 + window + 2), view("far", T0 + 3 * window, user_id="u4")],
    )
    assert stable_id("d-", "spring", "e1") not in [
        d for d, _, _ in out3.labelled(LabelKind.CONVERTED)
    ]
    closed = {d: (label, ts) for d, label, ts in out3.labelled(LabelKind.CLOSED)}
    assert closed[stable_id("d-", "spring", "e2")] == (0, T0 + 10 * MINUTE_MS + window)


async def test_denied_decisions_are_labelled_with_discount_zero() -> None:
    engine = engine_with(campaign(cooldown_ms=HOUR_MS))
    out = await run(engine, [view("e1", T0), view("e2", T0 + MINUTE_MS), purchase("p", T0 + 2)])
    # The purchase at T0 + 2 converts e1 (e2 is not yet decided at that time: it is later).
    assert [d for d, _, _ in out.labelled(LabelKind.CONVERTED)] == [stable_id("d-", "spring", "e1")]
    out2 = await run(engine, [purchase("p2", T0 + 2 * MINUTE_MS)])
    (event,) = out2.labels
    assert event.decision.decision_id == stable_id("d-", "spring", "e2")
    assert event.decision.discount_pct == 0.0  # the denied offer is recorded as no discount
    (example,) = out2.training
    assert example.discount_pct == 0.0


async def test_a_denied_decision_logs_the_propensity_of_the_logged_action() -> None:
    policy = ProfitPolicy(epsilon=1.0)  # uniform over 5 levels: each has propensity 0.2
    engine = engine_with(campaign(policy=policy, cooldown_ms=DAY_MS))
    out = await run(engine, [view(f"e{i}", T0 + i * MINUTE_MS) for i in range(12)])
    denied = [d for d in out.decisions if "denied:cooldown" in d.rules]
    assert denied
    for decision in denied:
        assert decision.discount_pct == 0.0
        assert decision.propensity == 1.0
