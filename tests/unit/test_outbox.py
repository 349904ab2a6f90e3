"""The outbox's pure parts: drafts encoded and decoded exactly, a batch's outputs rebuilt from
its drafts and ledger reply exactly as the batch published them, and the acknowledgements.

The Redis side (the entry written in the batch's one call, published again after a kill) is
tested against real services in tests/reliability/test_kill9.py and
tests/reliability/test_batch_faults.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import orjson
import pytest
import redis.asyncio as aioredis

from engine.decisions import DecisionDraft
from engine.features.catalogue import stored_features
from engine.features.store import InMemoryFeatureStore
from engine.ledger import DecisionRequest, InMemoryLedger, LedgerOp, LedgerResult
from engine.pipeline import BatchResult, DiscountEngine, EngineConfig, Incoming
from engine.stop_loss import StopLossStatus
from streams.adapters.outbox import Outbox, decode_drafts, encode_drafts, entry_order, parse_entry
from streams.adapters.pseudonyms import Pseudonyms
from streams.adapters.redis_ledger import _packed_features
from streams.errors import StreamsError
from tests.unit.test_engine_golden import campaigns, golden_input


@dataclass
class Settled:
    drafts: list[DecisionDraft | None]
    result: LedgerResult
    ops: list[LedgerOp]


class RecordingLedger:
    """The in-memory ledger, keeping what each call was given and answered: what an outbox
    entry holds."""

    def __init__(self) -> None:
        self.inner = InMemoryLedger()
        self.calls: list[Settled] = []

    async def settle(
        self, ops: Sequence[LedgerOp], *, now_ms: int, lanes: Mapping[int, int] | None = None
    ) -> LedgerResult:
        result = await self.inner.settle(ops, now_ms=now_ms, lanes=lanes)
        drafts = [op.draft if isinstance(op, DecisionRequest) else None for op in ops]
        self.calls.append(Settled(drafts, result, list(ops)))
        return result

    def settle_due(self, lane: int, now_ms: int) -> bool:
        return self.inner.settle_due(lane, now_ms)

    def rate_limited(self, user_id: str, campaign: str, ts: int, interval_ms: int) -> bool:
        return self.inner.rate_limited(user_id, campaign, ts, interval_ms)

    async def stop_loss_status(self) -> dict[str, StopLossStatus]:
        return await self.inner.stop_loss_status()

    async def budget_spent_cents(self, campaign: str, day: int) -> int:
        return await self.inner.budget_spent_cents(campaign, day)

    async def pending_count(self) -> int:
        return await self.inner.pending_count()


def live_engine() -> tuple[DiscountEngine, RecordingLedger]:
    """A live engine (labels to the learner) under campaigns with every guardrail, holdouts
    and exploration, recording its ledger calls."""
    ledger = RecordingLedger()
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        ledger=ledger,
        campaigns=campaigns("extra"),
        config=EngineConfig(learn_inline=False),
    )
    return engine, ledger


def _published(result: BatchResult) -> tuple[object, ...]:
    return (
        [offer.to_message() for offer in result.offers],
        [decision.to_message() for decision in result.decisions],
        [(d.order_value, d.cost_cents, d.denied_by) for d in result.decisions],
        [example.to_message() for example in result.training],
        result.denied,
        result.spend_cents,
    )


async def test_a_batch_rebuilt_from_its_outbox_entry_publishes_what_the_batch_did() -> None:
    """Live engine (labels to the learner), campaigns with every guardrail, holdouts and
    exploration: each batch's outputs equal those rebuilt by a fresh engine from the drafts
    (through their encoding) and the ledger's reply."""
    engine, ledger = live_engine()
    restarted = DiscountEngine(
        InMemoryFeatureStore(), campaigns=campaigns("extra"), config=EngineConfig()
    )
    stream = golden_input()
    compared = denied = offers = 0
    for start in range(0, len(stream), 400):
        ledger.calls.clear()
        result = await engine.process([Incoming(e, p) for e, p in stream[start : start + 400]])
        assert len(ledger.calls) == 1, "a live engine settles once per batch"
        (call,) = ledger.calls
        settled = LedgerResult(outcomes=call.result.outcomes, events=call.result.events)
        rebuilt = restarted.settled_outputs(
            decode_drafts(encode_drafts(call.drafts)), settled, owns=lambda user: True
        )
        assert _published(rebuilt) == _published(result)
        compared += len(result.decisions)
        denied += sum(result.denied.values())
        offers += len(result.offers)
    assert compared > 200 and denied > 20 and offers > 50, (compared, denied, offers)


async def test_rebuilt_offers_join_only_the_owned_users_state() -> None:
    engine, ledger = live_engine()
    stream = golden_input()
    result = await engine.process([Incoming(e, p) for e, p in stream[:2000]])
    granted = {offer.user_id for offer in result.offers}
    assert len(granted) > 2
    kept = sorted(granted)[0]
    restarted = DiscountEngine(InMemoryFeatureStore(), campaigns=campaigns("extra"))
    (call,) = ledger.calls
    restarted.settled_outputs(
        call.drafts,
        LedgerResult(outcomes=call.result.outcomes, events=call.result.events),
        owns=lambda user: user == kept,
    )
    queued = restarted._offer_updates
    assert queued and {update.user_id for update in queued} == {kept}
    assert all(update.event_id.startswith("offer:o-") for update in queued)


async def test_drafts_round_trip_exactly() -> None:
    engine, ledger = live_engine()
    stream = golden_input()
    await engine.process([Incoming(e, p) for e, p in stream[:3000]])
    drafts = [d for call in ledger.calls for d in call.drafts]
    assert any(d is None for d in drafts) and any(d and d.offer for d in drafts)
    assert decode_drafts(encode_drafts(drafts)) == drafts
    # features the ledger packed already are taken as they are
    packed = [stored_features(d.decision.features) if d else None for d in drafts]
    assert encode_drafts(drafts, packed=packed) == encode_drafts(drafts)
    first = [next(d for d in drafts if d)]
    assert encode_drafts(first, packed=["taken as given"]) != encode_drafts(first)
    # the compact form (features packed by catalogue position, the offer as its expiry and
    # reasons) keeps a feature vector that is not the catalogue's whole
    draft = next(d for d in drafts if d and d.offer)
    assert draft.offer is not None
    odd = DecisionDraft(
        replace(draft.decision, features={"only_this": 1.5}), None, draft.p_no_offer
    )
    assert decode_drafts(encode_drafts([odd])) == [odd]
    whole = orjson.dumps([draft.decision.to_message(), draft.offer.to_message()])
    assert len(encode_drafts([draft])) < len(whole) / 2


async def test_the_redis_ledger_packs_each_feature_vector_once() -> None:
    """A decision's pending record and its draft get the features ``stored_features`` gives,
    packed once: the record and the draft share one packing, and so do the campaigns of one
    event; a draft with a vector of its own gets its own."""
    engine, ledger = live_engine()
    stream = golden_input()
    await engine.process([Incoming(e, p) for e, p in stream[:3000]])
    ops = [op for call in ledger.calls for op in call.ops]
    records, drafts = _packed_features(ops)
    requests = 0
    for op, record, draft in zip(ops, records, drafts, strict=True):
        if not isinstance(op, DecisionRequest):
            assert record is None and draft is None
            continue
        requests += 1
        assert record == stored_features(op.decision.features)
        assert draft is record
    assert requests > 100
    by_vector: dict[int, list[object]] = {}
    for op, record in zip(ops, records, strict=True):
        if isinstance(op, DecisionRequest):
            by_vector.setdefault(id(op.decision.features), []).append(record)
    shared = [packed for packed in by_vector.values() if len(packed) > 1]
    assert shared and all(all(p is packed[0] for p in packed) for packed in shared)
    request = next(op for op in ops if isinstance(op, DecisionRequest) and op.draft is not None)
    assert request.draft is not None
    own = {"only_this": 1.5}
    apart = replace(
        request,
        draft=replace(request.draft, decision=replace(request.draft.decision, features=own)),
    )
    (record,), (draft,) = _packed_features([apart])
    assert record == stored_features(request.decision.features)
    assert draft == stored_features(own)


async def test_a_denied_draft_publishes_no_offer_and_says_which_guardrail() -> None:
    engine, ledger = live_engine()
    await engine.process([Incoming(e, p) for e, p in golden_input()[:3000]])
    draft = next(d for call in ledger.calls for d in call.drafts if d and d.offer)
    assert draft.offer is not None
    offer, decision = draft.settled(True, None)
    assert offer is draft.offer and decision is draft.decision
    assert decision.offer_id == offer.offer_id and decision.discount_pct > 0

    none, denied = draft.settled(False, "budget")
    assert none is None
    assert denied.offer_id is None and denied.discount_pct == 0.0 and denied.cost_cents == 0
    assert denied.propensity == 1.0 and denied.denied_by == "budget"
    assert denied.rules == (*draft.decision.rules, "denied:budget")
    assert denied.p_purchase == round(draft.p_no_offer, 6)
    # what the policy proposed stays on the record
    assert denied.proposed_discount_pct == draft.decision.proposed_discount_pct
    assert denied.uplift_score == draft.decision.uplift_score


def test_entries_are_acknowledged_once_kafka_committed_every_partition_they_cover() -> None:
    outbox = Outbox(aioredis.Redis(), prefix="t:")  # no connection is made: pure bookkeeping
    first = outbox.write([], [("b:0", 10), ("p:0", 4)])
    second = outbox.write([], [("b:0", 20)])
    assert first is not None and second is not None and first.acked == []
    assert entry_order(first.entry_id) < entry_order(second.entry_id)
    assert outbox.write([], []) is None, "an entry no commit can match is never written"

    outbox.committed({("b", 0): 11})  # p:0 not yet
    assert outbox.outstanding() == 2
    outbox.committed({("p", 0): 5})
    assert outbox.outstanding() == 1
    third = outbox.write([], [("b:0", 30)])
    assert third is not None and third.acked == [first.entry_id]

    outbox.failed(third)  # the call never ran: its acknowledgements wait for the next
    outbox.committed({("b", 0): 21})
    fourth = outbox.write([], [("b:0", 40)])
    assert fourth is not None and fourth.acked == [first.entry_id, second.entry_id]


def test_an_entry_whose_sealed_drafts_hold_newlines_parses_and_a_decoded_reply_is_refused() -> None:
    pseudonyms = Pseudonyms(b"outbox-test-key-0123456789abcdef")
    drafts: list[DecisionDraft | None] = [None] * 400
    blob = encode_drafts(drafts, pseudonyms)
    while b"\n" not in blob:  # sealed bytes: a newline is all but certain in 2 KB
        blob = encode_drafts(drafts, pseudonyms)
    raw = b'{"outcomes":[-1],"events":[]}\n' + blob  # as commit_batch.lua stores an entry
    entry = parse_entry("t:1", {"browse:0": 5}, raw, pseudonyms)
    assert entry.drafts == drafts and entry.outcomes == [-1] and entry.events == []
    with pytest.raises(StreamsError, match="decode_responses"):
        parse_entry("t:1", {}, raw.decode("latin-1"), pseudonyms)


async def test_drafts_of_the_earlier_layout_are_refused_not_misread() -> None:
    engine, ledger = live_engine()
    await engine.process([Incoming(e, p) for e, p in golden_input()[:3000]])
    draft = next(d for call in ledger.calls for d in call.drafts if d)
    item = orjson.loads(encode_drafts([draft]))
    user_at = item[0].index(draft.decision.user_id)
    item[0][user_at] = ["k1", "c2VhbGVkLWlk"]  # a user id sealed on its own, as before
    with pytest.raises(StreamsError, match="earlier layout"):
        decode_drafts(orjson.dumps(item))
