"""The engine's batch step (engine/pipeline.py) over the in-memory store
(engine/features/store.py)."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import orjson
import pytest
from dealstream_native import stable_id
from jsonschema import Draft202012Validator

from engine.analysis.simulation.world import open_loop
from engine.campaigns import Campaign
from engine.decisions import Decision, Offer
from engine.events import BrowseEvent, Event, PurchaseEvent, PurchaseItem, SearchEvent, parse_event
from engine.features.state import event_ops
from engine.features.store import InMemoryFeatureStore, Position, StateUpdate, UpdateStatus
from engine.ledger import InMemoryLedger, LedgerOp, LedgerResult
from engine.model.feedback import Feedback, FeedbackMethod, TrainingExample
from engine.model.purchase_model import PurchaseModel
from engine.pipeline import DiscountEngine, EngineConfig, Incoming
from engine.policies.threshold import ThresholdPolicy

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
T0 = 1_767_225_600_000
SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE


@cache
def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / name).read_text(encoding="utf-8")))


def schema_errors(name: str, doc: object) -> list[str]:
    return [error.message for error in validator(name).iter_errors(doc)]


@cache
def sim_events(users: int = 30, events: int = 1000, seed: int = 7) -> tuple[Event, ...]:
    """Simulated traffic over ~35 minutes of event time, parsed like the worker parses it."""
    stream = open_loop(users=users, events=events, seed=seed, mean_gap_ms=2 * SECOND)
    return tuple(parse_event(orjson.loads(orjson.dumps(doc))) for doc in stream)


def spring(**changes: object) -> Campaign:
    """A campaign that makes offers with a fresh model (which predicts 0.5 for everyone)."""
    options: dict[str, object] = {
        "name": "spring",
        "policy": ThresholdPolicy(threshold=0.3, discount_pct=10.0),
        "offer_ttl_ms": HOUR,
        "decision_interval_ms": MINUTE,
    }
    options.update(changes)
    return Campaign(**options)  # type: ignore[arg-type]


def new_engine(*campaigns: Campaign, config: EngineConfig | None = None) -> DiscountEngine:
    return DiscountEngine(InMemoryFeatureStore(), campaigns=campaigns or (spring(),), config=config)


@dataclass
class Outputs:
    statuses: list[UpdateStatus] = field(default_factory=list)
    offers: list[Offer] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    training: list[TrainingExample] = field(default_factory=list)

    def dump(self) -> bytes:
        return orjson.dumps(
            {
                "statuses": [int(s) for s in self.statuses],
                "offers": [offer.to_message() for offer in self.offers],
                "decisions": [decision.to_message() for decision in self.decisions],
                "training": [example.to_message() for example in self.training],
            }
        )


async def run(
    engine: DiscountEngine,
    events: Sequence[Event],
    *,
    batch_size: int = 100,
    source: str = "events.browse",
    first_offset: int = 0,
) -> Outputs:
    """Feed events in micro-batches, one partition, consecutive offsets."""
    out = Outputs()
    for start in range(0, len(events), batch_size):
        batch = [
            Incoming(event, Position(source, 0, first_offset + start + index))
            for index, event in enumerate(events[start : start + batch_size])
        ]
        result = await engine.process(batch)
        assert len(result.statuses) == len(batch)
        out.statuses.extend(result.statuses)
        out.offers.extend(result.offers)
        out.decisions.extend(result.decisions)
        out.training.extend(result.training)
    return out


_REFERENCE: list[Outputs] = []


async def reference_run() -> Outputs:
    """The outputs of a fresh default engine over ``sim_events()`` in batches of 100 (cached;
    read only)."""
    if not _REFERENCE:
        _REFERENCE.append(await run(new_engine(), sim_events()))
    return _REFERENCE[0]


def browse(event_id: str, ts: int, user_id: str = "u1", action: str = "view") -> BrowseEvent:
    return BrowseEvent(
        event_id=event_id,
        user_id=user_id,
        ts=ts,
        item_id="i1",
        category="books",
        price=20.0,
        action=action,  # type: ignore[arg-type]
    )


def purchase(
    event_id: str, ts: int, user_id: str = "u1", offer_id: str | None = None
) -> PurchaseEvent:
    item = PurchaseItem(item_id="i1", category="books", price=20.0, quantity=1)
    return PurchaseEvent(
        event_id=event_id,
        user_id=user_id,
        ts=ts,
        order_id=f"o-{event_id}",
        items=(item,),
        amount=20.0,
        offer_id=offer_id,
    )


# -- contracts ----------------------------------------------------------------------------------


async def test_offers_and_decisions_match_their_schemas() -> None:
    out = await reference_run()
    assert out.offers and out.decisions and out.training
    for offer in out.offers:
        assert schema_errors("offer.v1.json", offer.to_message()) == []
        assert isinstance(offer.issued_at, int) and isinstance(offer.expires_at, int)
        assert offer.expires_at == offer.issued_at + HOUR
    for decision in out.decisions:
        assert schema_errors("decision.v1.json", decision.to_message()) == []
    for example in out.training:
        assert schema_errors("training.v1.json", example.to_message()) == []


async def test_offer_and_decision_ids_are_stable_ids_of_campaign_and_trigger() -> None:
    out = await reference_run()
    for offer in out.offers:
        trigger = offer.trigger_event_id
        assert offer.offer_id == stable_id("o-", "spring", trigger)
    for decision in out.decisions:
        trigger = decision.trigger_event_id
        assert decision.decision_id == stable_id("d-", "spring", trigger)
    decision_ids = [d.decision_id for d in out.decisions]
    assert len(decision_ids) == len(set(decision_ids))


def test_stable_id_is_deterministic_and_separates_parts() -> None:
    assert stable_id("o-", "spring", "e1") == stable_id("o-", "spring", "e1")
    assert stable_id("o-", "spring", "e1").startswith("o-")
    assert stable_id("o-", "spring", "e1") != stable_id("o-", "spring", "e2")
    assert stable_id("o-", "spring", "e1") != stable_id("o-", "summer", "e1")
    assert stable_id("o-", "ab", "c") != stable_id("o-", "a", "bc")
    assert len(stable_id("o-", "x" * 500, "y" * 500)) <= 128


async def test_two_engines_over_the_same_events_give_identical_outputs() -> None:
    first = await run(new_engine(), sim_events())
    second = await run(new_engine(), sim_events())
    assert first.offers
    assert first.dump() == second.dump()
    assert first.dump() == (await reference_run()).dump()


@pytest.mark.parametrize("batch_size", [1, 37, 1000])
async def test_outputs_do_not_depend_on_the_batch_size(batch_size: int) -> None:
    reference = await reference_run()
    other = await run(new_engine(), sim_events(), batch_size=batch_size)
    assert other.dump() == reference.dump()


async def test_every_offer_has_a_matching_decision() -> None:
    out = await reference_run()
    decisions_by_offer = {d.offer_id: d for d in out.decisions if d.offer_id is not None}
    assert len(decisions_by_offer) == len(out.offers) > 0
    for offer in out.offers:
        decision = decisions_by_offer[offer.offer_id]
        for key in ("user_id", "campaign", "trigger_event_id", "discount_pct", "propensity"):
            assert getattr(decision, key) == getattr(offer, key), key
        assert decision.ts == offer.issued_at
        assert decision.holdout is False
    for decision in out.decisions:
        if decision.offer_id is None:
            assert decision.discount_pct == 0.0


async def test_threshold_one_gives_decisions_but_no_offers() -> None:
    engine = new_engine(spring(policy=ThresholdPolicy(threshold=1.0)))
    out = await run(engine, sim_events())
    assert out.decisions
    assert out.offers == []
    assert all(d.offer_id is None and d.discount_pct == 0.0 for d in out.decisions)


async def test_purchases_never_trigger_decisions_and_triggers_are_honoured() -> None:
    engine = new_engine(spring(triggers=("cart",), decision_interval_ms=0))
    events = sim_events()
    out = await run(engine, events)
    by_id = {e.event_id: e for e in events}
    triggers = [by_id[d.trigger_event_id] for d in out.decisions]
    assert triggers
    assert all(isinstance(e, BrowseEvent) and e.action == "cart" for e in triggers)
    carts = [e for e in events if isinstance(e, BrowseEvent) and e.action == "cart"]
    assert len(triggers) == len(carts)
    assert not any(isinstance(e, SearchEvent | PurchaseEvent) for e in triggers)


# -- rate limit ---------------------------------------------------------------------------------


async def test_decision_interval_rate_limits_per_user_and_campaign() -> None:
    engine = new_engine(
        spring(decision_interval_ms=MINUTE), spring(name="always", decision_interval_ms=0)
    )
    events = [
        browse("e1", T0),
        browse("e2", T0 + SECOND),
        browse("e3", T0 + SECOND, user_id="u2"),
        browse("e4", T0 + MINUTE - 1),
        browse("e5", T0 + MINUTE),
        browse("e6", T0 + MINUTE + 1),
    ]
    out = await run(engine, events)
    decided = defaultdict(list)
    for decision in out.decisions:
        decided[decision.campaign].append((decision.user_id, decision.trigger_event_id))
    assert decided["spring"] == [("u1", "e1"), ("u2", "e3"), ("u1", "e5")]
    assert [event_id for _, event_id in decided["always"]] == ["e1", "e2", "e3", "e4", "e5", "e6"]


async def test_decisions_of_simulated_traffic_respect_the_interval() -> None:
    out = await run(new_engine(spring(decision_interval_ms=5 * MINUTE)), sim_events())
    times: dict[tuple[str, str], list[int]] = defaultdict(list)
    for decision in out.decisions:
        times[decision.user_id, decision.campaign].append(decision.ts)
    assert len(times) > 5
    for stamps in times.values():
        assert all(b - a >= 5 * MINUTE for a, b in itertools.pairwise(stamps))


# -- redelivery ---------------------------------------------------------------------------------


async def test_redelivered_positions_are_skipped_without_a_second_decision() -> None:
    engine = new_engine()
    events = list(sim_events())[:300]
    first = await run(engine, events)
    assert first.decisions
    version = engine.model.version
    again = await run(engine, events)
    assert again.statuses == [UpdateStatus.REDELIVERED] * len(events)
    assert again.offers == again.decisions == again.training == []
    assert engine.model.version == version


class SeeingLedger(InMemoryLedger):
    """An in-memory ledger that, like the Redis one, wants every batch (``settle_due``), and
    records the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[int, int] | None] = []

    def settle_due(self, lane: int, now_ms: int) -> bool:
        return True

    async def settle(
        self, ops: Sequence[LedgerOp], *, now_ms: int, lanes: Mapping[int, int] | None = None
    ) -> LedgerResult:
        self.calls.append(None if lanes is None else dict(lanes))
        return await super().settle(ops, now_ms=now_ms, lanes=lanes)


async def test_a_live_batch_settles_even_when_every_event_was_redelivered() -> None:
    """The Redis ledger's call carries the batch's feature writes (the previous batch's offers
    among them): a batch that applied nothing must still make it."""
    ledger = SeeingLedger()
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        ledger=ledger,
        campaigns=(spring(),),
        config=EngineConfig(learn_inline=False),
    )
    events = [browse("e1", T0, "u1"), browse("e2", T0 + MINUTE, "u2")]
    first = [Incoming(e, Position("events.browse", 1, n)) for n, e in enumerate(events)]
    await engine.process(first)
    assert ledger.calls == [{1: T0 + MINUTE}]  # the lane of the batch, at its clock
    again = await engine.process(first)
    assert again.statuses == [UpdateStatus.REDELIVERED] * 2
    assert ledger.calls[1:] == [{}]  # a call, though it moves no lane


async def test_redelivery_within_one_batch_is_skipped() -> None:
    engine = new_engine()
    position = Position("events.browse", 3, 41)
    result = await engine.process(
        [Incoming(browse("e1", T0), position), Incoming(browse("e1", T0), position)]
    )
    assert result.statuses == [UpdateStatus.APPLIED, UpdateStatus.REDELIVERED]
    assert len(result.decisions) == 1


async def test_same_event_id_at_a_new_offset_is_a_duplicate_without_a_decision() -> None:
    engine = new_engine(spring(decision_interval_ms=0))
    first = await run(engine, [browse("e1", T0)])
    assert len(first.decisions) == 1
    second = await run(engine, [browse("e1", T0)], first_offset=10)
    assert second.statuses == [UpdateStatus.DUPLICATE]
    assert second.decisions == []


# -- labels through the engine ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "learned"),
    [(FeedbackMethod.NAIVE, 1), (FeedbackMethod.CLOSED, 0), (FeedbackMethod.FNW, 2)],
)
async def test_purchase_after_a_decision_produces_a_converted_training_example(
    method: FeedbackMethod, learned: int
) -> None:
    engine = new_engine(config=EngineConfig(feedback=Feedback(method)))
    out = await run(engine, [browse("e1", T0, action="cart"), purchase("p1", T0 + MINUTE)])
    (decision,) = out.decisions
    example = out.training[-1]
    assert example.decision_id == decision.decision_id
    assert (example.kind, example.label) == ("converted", 1)
    assert example.labeled_at == T0 + MINUTE and example.decided_at == T0
    assert example.features == decision.features
    # naive learns the positive at once, closed waits for the window, fnw learned the
    # decision as a fake negative first.
    assert engine.model.version == f"lr-{learned}"
    assert decision.model_version == "lr-0"


async def test_purchase_without_open_decisions_gives_no_training_example() -> None:
    engine = new_engine()
    out = await run(engine, [purchase("p1", T0), browse("e1", T0 + SECOND, user_id="u2")])
    assert out.training == []
    assert engine.model.version == "lr-0"


async def test_a_purchase_converts_every_open_decision_whatever_offer_it_redeems() -> None:
    engine = new_engine(spring(decision_interval_ms=0))
    first = await run(engine, [browse("e1", T0), browse("e2", T0 + SECOND)])
    offer_ids = [o.offer_id for o in first.offers]
    assert len(offer_ids) == 2
    redeemed = str(offer_ids[0])
    out = await run(engine, [purchase("p1", T0 + MINUTE, offer_id=redeemed)], first_offset=2)
    assert [(e.decision_id, e.kind) for e in out.training] == [
        (stable_id("d-", "spring", "e1"), "converted"),
        (stable_id("d-", "spring", "e2"), "converted"),
    ]


async def test_decisions_close_as_negative_examples_as_event_time_passes() -> None:
    config = EngineConfig(attribution_window_ms=HOUR, feedback=Feedback(FeedbackMethod.ESDFM))
    assert config.feedback.elapsed_ms == HOUR // 2, "a wait longer than the window is halved"
    engine = new_engine(config=config)
    out = await run(engine, [browse("e1", T0), browse("e2", T0 + HOUR + 1, user_id="u2")])
    e1 = stable_id("d-", "spring", "e1")
    assert [(e.decision_id, e.kind, e.label, e.labeled_at) for e in out.training] == [
        (e1, "elapsed", 0, T0 + HOUR // 2),
        (e1, "closed", 0, T0 + HOUR),
    ]
    assert engine.clock_ms == T0 + HOUR + 1


async def test_simulated_purchases_produce_training_examples_of_earlier_decisions() -> None:
    out = await reference_run()
    decision_ids = {d.decision_id for d in out.decisions}
    assert out.training
    converted = [e.decision_id for e in out.training if e.kind == "converted"]
    assert converted and set(converted) <= decision_ids
    assert len(converted) == len(set(converted))
    assert {e.label for e in out.training if e.kind == "converted"} == {1}


async def test_p_purchase_is_the_prediction_at_the_chosen_discount() -> None:
    model = PurchaseModel()
    trained = {"cart_count_24h": 2.0, "view_count_1h": 3.0, "session_events": 4.0}
    for _ in range(40):
        model.learn_one(trained, 10.0, 1)
        model.learn_one(trained, 0.0, 0)
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        model=model,
        campaigns=[spring(policy=ThresholdPolicy(threshold=0.0, discount_pct=10.0))],
    )
    out = await run(engine, [browse("e1", T0, action="cart")])
    (offer,) = out.offers
    (decision,) = out.decisions
    features = decision.features
    at_discount = round(model.predict_one(features, 10.0), 6)
    assert at_discount != round(model.predict_one(features, 0.0), 6)  # the discount matters here
    assert offer.p_purchase == at_discount
    assert decision.p_purchase == at_discount


# -- the store's skip rules ---------------------------------------------------------------------


def update(
    event_id: str, ts: int, *, offset: int | None = None, user_id: str = "u1", partition: int = 0
) -> StateUpdate:
    event = browse(event_id, ts, user_id=user_id)
    position = None if offset is None else Position("events.browse", partition, offset)
    return StateUpdate(user_id, event_id, ts, event_ops(event), position)


LATENESS = HOUR


async def apply(store: InMemoryFeatureStore, *updates: StateUpdate) -> list[UpdateStatus]:
    return (await store.apply_batch(list(updates), allowed_lateness_ms=LATENESS)).statuses


async def test_store_skips_redelivered_positions() -> None:
    store = InMemoryFeatureStore()
    assert await apply(store, update("e1", T0, offset=5)) == [UpdateStatus.APPLIED]
    assert await apply(store, update("e1", T0, offset=5)) == [UpdateStatus.REDELIVERED]
    assert await apply(store, update("e0", T0, offset=4)) == [UpdateStatus.REDELIVERED]
    # Another partition has its own watermark; no position means no watermark at all.
    assert await apply(store, update("e2", T0, offset=5, partition=1)) == [UpdateStatus.APPLIED]
    assert await apply(store, update("e3", T0)) == [UpdateStatus.APPLIED]
    assert await apply(store, update("e4", T0, offset=6)) == [UpdateStatus.APPLIED]


async def test_store_watermarks_follow_the_applied_offsets() -> None:
    store = InMemoryFeatureStore()
    await apply(store, update("e1", T0, offset=5), update("e2", T0, offset=9, partition=2))
    assert await store.watermarks() == {("events.browse", 0): 5, ("events.browse", 2): 9}


async def test_store_skips_duplicate_event_ids_at_other_offsets() -> None:
    store = InMemoryFeatureStore()
    statuses = await apply(store, update("e1", T0, offset=1), update("e1", T0, offset=2))
    assert statuses == [UpdateStatus.APPLIED, UpdateStatus.DUPLICATE]
    assert await apply(store, update("e1", T0 + 10, offset=3)) == [UpdateStatus.DUPLICATE]
    assert await apply(store, update("e1", T0, user_id="u2")) == [UpdateStatus.APPLIED]


async def test_duplicate_does_not_change_the_state() -> None:
    store = InMemoryFeatureStore()
    await apply(store, update("e1", T0, offset=1))
    before = await store.read_states(["u1"])
    await apply(store, update("e1", T0, offset=2))
    assert await store.read_states(["u1"]) == before
    assert before["u1"]["nv"] == 1.0


async def test_store_skips_late_events() -> None:
    store = InMemoryFeatureStore()
    assert await apply(store, update("e1", T0 + 2 * HOUR)) == [UpdateStatus.APPLIED]
    assert await apply(store, update("late", T0 + HOUR - 1)) == [UpdateStatus.LATE]
    assert await apply(store, update("edge", T0 + HOUR)) == [UpdateStatus.APPLIED]
    # Lateness is per user.
    assert await apply(store, update("other", T0, user_id="u2")) == [UpdateStatus.APPLIED]


async def test_store_reports_the_state_before_the_batch() -> None:
    store = InMemoryFeatureStore()
    first = await store.apply_batch([update("e1", T0)], allowed_lateness_ms=LATENESS)
    assert first.before == {"u1": {}}
    second = await store.apply_batch(
        [update("e2", T0 + 1), update("e3", T0 + 2, user_id="u2")], allowed_lateness_ms=LATENESS
    )
    assert second.before["u2"] == {}
    assert second.before["u1"]["nv"] == 1.0
    assert second.before["u1"]["lt"] == float(T0)


async def test_forget_removes_the_user_and_their_seen_event_ids() -> None:
    store = InMemoryFeatureStore()
    await apply(store, update("e1", T0, offset=1), update("e2", T0, offset=2, user_id="u2"))
    assert store.user_count() == 2
    assert await store.forget("u1") == 1
    assert await store.forget("u1") == 0
    states = await store.read_states(["u1", "u2"])
    assert states["u1"] == {}
    assert states["u2"]["nv"] == 1.0
    assert store.user_count() == 1
    # The event id is forgotten with the user: a fresh delivery applies again.
    assert await apply(store, update("e1", T0, offset=3)) == [UpdateStatus.APPLIED]
