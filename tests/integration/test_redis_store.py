"""The Redis feature store against a real Redis: parity with the in-memory store, keys, memory.

Every test uses its own key prefix (the ``isolation`` fixture) and deletes its keys at the end
with ``SCAN MATCH prefix*``; the Redis server is shared, so nothing here flushes a database.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import event as label
from hypothesis import strategies as st
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ResponseError

from engine.analysis.simulation.world import DEFAULT_START_MS, open_loop
from engine.events import BrowseEvent, Event, PurchaseEvent, PurchaseItem, SearchEvent, parse_event
from engine.features.catalogue import compute_features
from engine.features.record import UserRecord, seen_key, seen_second
from engine.features.state import (
    CATALOGUE_VERSION,
    DAY_MS,
    HOUR_MS,
    LONGEST_WINDOW_MS,
    MINUTE_MS,
    State,
    apply_ops,
    event_ops,
    offer_ops,
)
from engine.features.store import (
    BatchOutcome,
    InMemoryFeatureStore,
    Position,
    StateUpdate,
    UpdateStatus,
)
from streams.adapters.batch_commit import PartitionFenced
from streams.adapters.pseudonyms import Pseudonyms
from streams.adapters.redis_store import (
    _READ_RECORDS,
    GENERATION_S,
    RECORD_FIELD,
    RedisFeatureStore,
    hash_tag,
)
from tests.conftest import Isolation, Services
from tests.feature_reference import trim
from tests.integration.conftest import RedisEnv, delete_prefix, keys_under

pytestmark = pytest.mark.integration

T0 = DEFAULT_START_MS
"""2026-01-01T00:00:00Z, a whole day, hour and minute."""
KINDS = ("view", "cart", "favorite", "search", "purchase")
CATEGORIES = (None, "home", "books", "books:used", "jouets é", "7")
"""Categories become parts of field names: include a colon, non-ASCII and a digit-only one."""
BUCKET_FIELD = re.compile(r"^.[mhd]\d+$")
EXPECTED_TTL_S = 32 * 24 * 3600
"""``LONGEST_WINDOW_MS`` (30 days) plus a day of margin."""

APPLIED = UpdateStatus.APPLIED
REDELIVERED = UpdateStatus.REDELIVERED
DUPLICATE = UpdateStatus.DUPLICATE
LATE = UpdateStatus.LATE


# -- helpers ------------------------------------------------------------------------------------


def make_event(
    kind: str,
    event_id: str,
    user_id: str,
    ts: int,
    cents: int = 1999,
    *,
    category: str | None = "home",
    other_category: str | None = None,
    offer_id: str | None = None,
) -> Event:
    """A browse (view, cart, favorite), search or purchase event; a purchase of two items when
    ``other_category`` is given, redeeming ``offer_id`` when given."""
    if kind == "search":
        return SearchEvent(
            event_id=event_id, user_id=user_id, ts=ts, query="desk lamp", category=category
        )
    if kind == "purchase":
        amount = cents / 100
        items = [PurchaseItem(item_id="i1", category=category or "home", price=amount, quantity=1)]
        if other_category is not None:
            items.append(PurchaseItem(item_id="i2", category=other_category, price=0, quantity=2))
        return PurchaseEvent(
            event_id=event_id,
            user_id=user_id,
            ts=ts,
            order_id=f"o-{event_id}",
            items=tuple(items),
            amount=amount,
            offer_id=offer_id,
        )
    return BrowseEvent(
        event_id=event_id,
        user_id=user_id,
        ts=ts,
        item_id="i1",
        category=category or "home",
        price=19.99,
        action=kind,  # type: ignore[arg-type]
    )


def to_update(event: Event, position: Position | None = None) -> StateUpdate:
    return StateUpdate(event.user_id, event.event_id, event.ts, event_ops(event), position)


def reference_state(events: Sequence[Event]) -> State:
    """The state of applying each event once, in event-time order, trimmed at the end."""
    state: State = {}
    for event in sorted(events, key=lambda e: e.ts):
        apply_ops(state, event_ops(event))
    trim(state)
    return state


def replay_vectors(updates: Sequence[StateUpdate], outcome: BatchOutcome) -> list[dict[str, float]]:
    """Each applied update's feature vector, replayed from ``before`` as the pipeline does."""
    states = {user: dict(state) for user, state in outcome.before.items()}
    vectors = []
    for update, status in zip(updates, outcome.statuses, strict=True):
        if status is APPLIED:
            apply_ops(states[update.user_id], update.ops)
            vectors.append(compute_features(states[update.user_id]))
    return vectors


# -- 1. parity with the in-memory store and with the in-order reference --------------------------


@dataclass(eq=False)
class Slot:
    """One delivery: an original event, a duplicate (same id, new offset), an event beyond the
    allowed lateness, or a redelivery of an earlier slot (same event, same position)."""

    kind: str
    index: int = 0
    ref: Slot | None = None
    late_by: int = 0
    pick: int = 0
    late_kind: str = "view"


@dataclass
class Scenario:
    lateness_ms: int
    originals: list[Event]
    slots: list[Slot]
    batch_sizes: list[int]
    deliveries: list[tuple[StateUpdate, UpdateStatus]] = field(default_factory=list)
    watermarks: dict[tuple[str, int], int] = field(default_factory=dict)

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        lines = [f"Scenario(lateness_ms={self.lateness_ms}, batch_sizes={self.batch_sizes})"]
        for update, status in self.deliveries:
            lines.append(
                f"  {update.user_id} {update.event_id} ts={update.ts} "
                f"pos={update.position} -> {status.name}"
            )
        return "\n".join(lines)


def build_deliveries(scenario: Scenario) -> None:
    """Walk the slots in delivery order: give every fresh message the next offset of its
    partition and work out the status the store contract prescribes for it."""
    lateness = scenario.lateness_ms
    latest: dict[str, int] = {}
    applied: set[tuple[str, str]] = set()
    next_offset: dict[tuple[str, int], int] = {}
    built: dict[int, StateUpdate] = {}
    late_count = 0
    for slot in scenario.slots:
        if slot.kind == "redeliver":
            assert slot.ref is not None
            previous = built.get(id(slot.ref))
            if previous is None:  # its late event had no user to be late for
                continue
            built[id(slot)] = previous
            scenario.deliveries.append((previous, REDELIVERED))
            continue
        if slot.kind == "late":
            if not latest:
                continue
            user = sorted(latest)[slot.pick % len(latest)]
            late_count += 1
            event = make_event(
                slot.late_kind, f"late{late_count}", user, latest[user] - lateness - slot.late_by
            )
        else:
            event = scenario.originals[slot.index]
        source = f"events.{event.type}"
        partition = int(event.user_id[1:]) % 2  # Kafka key = user id
        offset = next_offset.get((source, partition), 0)
        next_offset[(source, partition)] = offset + 1
        scenario.watermarks[(source, partition)] = offset
        update = to_update(event, Position(source, partition, offset))
        last = latest.get(event.user_id)
        if last is not None and event.ts < last - lateness:
            status = LATE
        elif (event.user_id, event.event_id) in applied:
            status = DUPLICATE
        else:
            status = APPLIED
            applied.add((event.user_id, event.event_id))
            latest[event.user_id] = event.ts if last is None else max(last, event.ts)
        # By construction: originals arrive within the allowed lateness, before their copies.
        assert status is APPLIED or slot.kind != "orig", "scenario shuffled beyond lateness"
        assert status is LATE or slot.kind != "late"
        built[id(slot)] = update
        scenario.deliveries.append((update, status))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    lateness = draw(st.sampled_from([0, 30_000, 10 * MINUTE_MS, HOUR_MS]))
    n_users = draw(st.integers(1, 4))
    n_events = draw(st.integers(1, 40))
    ts = T0
    originals: list[Event] = []
    for index in range(n_events):
        size = draw(st.integers(0, 19))
        if size < 14:
            ts += draw(st.integers(0, 3 * MINUTE_MS))
        elif size < 18:
            ts += draw(st.integers(0, 40 * MINUTE_MS))
        else:  # quiet spells, some exactly at a retention limit: old buckets get trimmed
            ts += draw(
                st.sampled_from(
                    [119 * MINUTE_MS, 120 * MINUTE_MS, 26 * HOUR_MS, 31 * DAY_MS, 9 * DAY_MS]
                )
            )
        kind = draw(st.sampled_from(KINDS))
        user = f"u{draw(st.integers(0, n_users - 1))}"
        cents = draw(st.integers(0, 10_000_000)) if kind == "purchase" else 0
        category = draw(st.sampled_from(CATEGORIES))
        if category is None and kind != "search":
            category = "home"
        originals.append(
            make_event(
                kind,
                f"e{index}",
                user,
                ts,
                cents,
                category=category,
                other_category=draw(st.sampled_from(CATEGORIES)),
                offer_id=draw(st.sampled_from([None, "offer-1"])),
            )
        )

    # Shuffle within the allowed lateness: deliver in order of ts + a delay <= lateness.
    delays = draw(st.lists(st.integers(0, lateness), min_size=n_events, max_size=n_events))
    order = sorted(range(n_events), key=lambda i: (originals[i].ts + delays[i], i))
    slots = [Slot("orig", index=i) for i in order]

    for _ in range(draw(st.integers(0, 10))):  # duplicates: same event id, a new offset
        index = draw(st.integers(0, n_events - 1))
        first = next(k for k, s in enumerate(slots) if s.kind == "orig" and s.index == index)
        slots.insert(draw(st.integers(first + 1, len(slots))), Slot("dup", index=index))
    for _ in range(draw(st.integers(0, 3))):  # new events beyond the allowed lateness
        late = Slot(
            "late",
            late_by=draw(st.integers(1, 2 * HOUR_MS)),
            pick=draw(st.integers(0, 3)),
            late_kind=draw(st.sampled_from(KINDS)),
        )
        slots.insert(draw(st.integers(0, len(slots))), late)
    for _ in range(draw(st.integers(0, 10))):  # redeliveries: same event, same position
        source = draw(st.integers(0, len(slots) - 1))
        ref = slots[source]
        slots.insert(draw(st.integers(source + 1, len(slots))), Slot("redeliver", ref=ref))

    batch_sizes = draw(st.lists(st.integers(1, 30), min_size=1, max_size=6))
    scenario = Scenario(lateness, originals, slots, batch_sizes)
    build_deliveries(scenario)
    return scenario


async def check_parity(redis_url: str, prefix: str, scenario: Scenario) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        redis_store = RedisFeatureStore(client, prefix=prefix, max_cached_users=2)
        memory = InMemoryFeatureStore()
        lateness = scenario.lateness_ms
        deliveries = scenario.deliveries
        start = 0
        batch = 0
        while start < len(deliveries):
            size = scenario.batch_sizes[batch % len(scenario.batch_sizes)]
            chunk = deliveries[start : start + size]
            start += size
            batch += 1
            if batch % 3 == 0:
                # A restart (or a rebalance): a new store holds nothing and reads Redis.
                redis_store = RedisFeatureStore(client, prefix=prefix)
            updates = [update for update, _ in chunk]
            expected = [status for _, status in chunk]
            from_memory = await memory.apply_batch(updates, allowed_lateness_ms=lateness)
            from_redis = await redis_store.apply_batch(updates, allowed_lateness_ms=lateness)
            assert from_redis.statuses == from_memory.statuses == expected, f"batch {batch}"
            assert from_redis.before == from_memory.before, f"batch {batch}"
            assert replay_vectors(updates, from_redis) == replay_vectors(updates, from_memory)

        users = sorted({event.user_id for event in scenario.originals})
        final_redis = await redis_store.read_states(users)
        final_memory = await memory.read_states(users)
        reference = {
            user: reference_state([e for e in scenario.originals if e.user_id == user])
            for user in users
        }
        assert final_redis == final_memory == reference
        for user in users:
            vector = compute_features(reference[user])
            assert compute_features(final_redis[user]) == vector
            assert compute_features(final_memory[user]) == vector
        marks = scenario.watermarks
        assert await redis_store.watermarks() == await memory.watermarks() == marks
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_redis_store_matches_in_memory_store_and_in_order_reference(
    services: Services, isolation: Isolation, scenario: Scenario
) -> None:
    for status in sorted({status for _, status in scenario.deliveries}):
        label(f"has {status.name}")
    for user in {e.user_id for e in scenario.originals}:
        mine = [e for e in scenario.originals if e.user_id == user]
        untrimmed: State = {}
        for original in mine:
            apply_ops(untrimmed, event_ops(original))
        if len(untrimmed) > len(reference_state(mine)):
            label("old buckets trimmed")
            break
    # A fresh prefix per example: watermarks and dedup sets never leak between examples.
    prefix = f"{isolation.redis_prefix}h{uuid.uuid4().hex[:8]}:"
    asyncio.run(check_parity(services.redis_url, prefix, scenario))


# -- 2. watermarks and redelivery ---------------------------------------------------------------


async def test_watermarks_report_last_offset_and_a_resent_batch_changes_nothing(
    redis_env: RedisEnv,
) -> None:
    store, client = redis_env.store, redis_env.client
    batch = [
        to_update(make_event("view", "a", "u1", T0), Position("events.browse", 0, 0)),
        to_update(make_event("search", "b", "u2", T0 + 1000), Position("events.search", 1, 7)),
        to_update(make_event("cart", "c", "u1", T0 + 2000), Position("events.browse", 0, 1)),
        to_update(make_event("purchase", "d", "u2", T0 + 3000), Position("events.purchase", 1, 0)),
        to_update(make_event("view", "e", "u3", T0 + 4000), Position("events.browse", 1, 41)),
        to_update(make_event("view", "f", "u1", T0 + 5000), Position("events.browse", 0, 2)),
    ]
    outcome = await store.apply_batch(batch, allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [APPLIED] * 6
    assert outcome.before == {"u1": {}, "u2": {}, "u3": {}}
    marks = {
        ("events.browse", 0): 2,
        ("events.browse", 1): 41,
        ("events.search", 1): 7,
        ("events.purchase", 1): 0,
    }
    assert await store.watermarks() == marks
    raw = await client.hgetall(store.watermark_key)
    assert {k.decode(): int(v) for k, v in raw.items()} == {
        "events.browse:0": 2,
        "events.browse:1": 41,
        "events.search:1": 7,
        "events.purchase:1": 0,
    }

    users = ["u1", "u2", "u3"]
    states = await store.read_states(users)
    seen = {u: r.seen for u, r in (await store.read_records(users)).items()}
    ttls = {u: await client.pttl(store.user_key(u)) for u in users}
    again = await store.apply_batch(batch, allowed_lateness_ms=HOUR_MS)
    assert again.statuses == [REDELIVERED] * 6
    assert again.before == states
    assert await store.read_states(users) == states
    assert {u: r.seen for u, r in (await store.read_records(users)).items()} == seen
    assert await store.watermarks() == marks
    # Nothing was touched, so nothing was re-expired either.
    assert all([await client.pttl(store.user_key(u)) <= ttls[u] for u in users])

    # A replay that overlaps the watermark: the old part is skipped, the new part applied.
    overlap = [batch[5], to_update(make_event("view", "g", "u1", T0 + 6000))]
    overlap.append(
        to_update(make_event("view", "h", "u1", T0 + 7000), Position("events.browse", 0, 3))
    )
    outcome = await store.apply_batch(overlap, allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [REDELIVERED, APPLIED, APPLIED]
    assert await store.watermarks() == {**marks, ("events.browse", 0): 3}

    memory = InMemoryFeatureStore()
    for updates in (batch, batch, overlap):
        await memory.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
    assert await memory.watermarks() == await store.watermarks()
    assert await memory.read_states(users) == await store.read_states(users)


# -- 3. lateness --------------------------------------------------------------------------------


async def test_late_events_change_nothing_and_events_within_lateness_land_in_their_bucket(
    redis_env: RedisEnv,
) -> None:
    store = redis_env.store
    lateness = 10 * MINUTE_MS
    now = T0 + 3 * HOUR_MS
    memory = InMemoryFeatureStore()

    async def both(updates: list[StateUpdate]) -> BatchOutcome:
        expected = await memory.apply_batch(updates, allowed_lateness_ms=lateness)
        outcome = await store.apply_batch(updates, allowed_lateness_ms=lateness)
        assert outcome.statuses == expected.statuses
        assert outcome.before == expected.before
        return outcome

    first = [make_event("view", "now", "u1", now)]
    await both([to_update(e) for e in first])
    before = (await store.read_states(["u1"]))["u1"]

    too_late = [
        make_event("view", "late-1", "u1", now - lateness - 1),
        make_event("purchase", "late-2", "u1", now - 5 * HOUR_MS),
        make_event("view", "now", "u1", now - lateness - 1),  # an old copy: late before dup
    ]
    outcome = await both([to_update(e) for e in too_late])
    assert outcome.statuses == [LATE, LATE, LATE]
    assert (await store.read_states(["u1"]))["u1"] == before
    assert (await store.read_records(["u1"]))["u1"].seen.keys() == {seen_key("now")}

    within = [
        make_event("view", "edge", "u1", now - lateness),  # exactly at the limit: accepted
        make_event("cart", "w1", "u1", now - 5 * MINUTE_MS + 17_000),
        make_event("view", "other-user", "u2", now - 5 * HOUR_MS),  # lateness is per user
    ]
    outcome = await both([to_update(e) for e in within])
    assert outcome.statuses == [APPLIED, APPLIED, APPLIED]
    state = (await store.read_states(["u1"]))["u1"]
    edge_minute = (now - lateness) // MINUTE_MS
    assert state[f"vm{edge_minute}"] == 1
    assert f"vm{edge_minute - 1}" not in state  # where late-1 would have landed
    assert state[f"vm{now // MINUTE_MS}"] == 1
    assert state[f"cm{(now - 5 * MINUTE_MS + 17_000) // MINUTE_MS}"] == 1
    assert state[f"vh{(now - lateness) // HOUR_MS}"] == 1  # 02:50 is in hour 2, not hour 3
    assert state[f"vh{now // HOUR_MS}"] == 1
    assert state[f"vd{now // DAY_MS}"] == 2
    assert state["lt"] == now and state["fs"] == now - lateness and state["nv"] == 2
    assert "np" not in state and "lp" not in state  # the late purchase left no trace
    assert state == reference_state([*first, *within[:2]])
    assert await memory.read_states(["u1", "u2"]) == await store.read_states(["u1", "u2"])
    features = compute_features(state)
    assert features["view_count_1h"] == 2 and features["cart_count_1h"] == 1
    assert features["purchase_count_30d"] == 0


async def test_offers_recorded_by_the_engine_are_never_late_and_apply_alike(
    redis_env: RedisEnv,
) -> None:
    """An offer granted a batch ago trails the user's later events by any amount of event
    time: it is recorded all the same, in both stores, and read back as the response history."""
    store = redis_env.store
    lateness = 10 * MINUTE_MS
    memory = InMemoryFeatureStore()
    now = T0 + 3 * HOUR_MS
    events = [make_event("view", "v1", "u1", now), make_event("cart", "c1", "u1", now + 1)]
    old_offer = StateUpdate(
        "u1", "offer:o-1", now - 2 * HOUR_MS, offer_ops(now - 2 * HOUR_MS, 12.5), on_time=True
    )
    stale_copy = StateUpdate(
        "u1", "offer:o-2", now - 2 * HOUR_MS, offer_ops(now - 2 * HOUR_MS, 20.0)
    )
    updates = [*(to_update(e) for e in events), old_offer, stale_copy]
    expected = await memory.apply_batch(updates, allowed_lateness_ms=lateness)
    outcome = await store.apply_batch(updates, allowed_lateness_ms=lateness)
    assert outcome.statuses == expected.statuses == [APPLIED, APPLIED, APPLIED, LATE]
    assert await memory.read_states(["u1"]) == await store.read_states(["u1"])
    features = compute_features((await store.read_states(["u1"]))["u1"])
    assert features["offer_count_30d"] == 1 and features["last_offer_discount_pct"] == 12.5
    assert features["recency_offer_s"] == 7200.001
    assert features["cart_value_1h"] > 0


# -- 4. keys, TTL and trimming ------------------------------------------------------------------


async def test_keys_carry_version_and_hash_tag_expire_in_32_days_and_old_buckets_are_trimmed(
    redis_env: RedisEnv,
) -> None:
    store, client, prefix = redis_env.store, redis_env.client, redis_env.prefix
    lateness = 5 * MINUTE_MS
    minute = T0 // MINUTE_MS
    first = [
        make_event("view", "e0", "u1", T0),
        make_event("view", "e1", "u1", T0 + MINUTE_MS),
        make_event("search", "e2", "u1", T0 + 2 * MINUTE_MS),
        make_event("purchase", "e3", "u1", T0 + 60 * MINUTE_MS),
    ]
    positions = [Position("events.browse", 0, k) for k in range(len(first))]
    await store.apply_batch(
        [to_update(e, p) for e, p in zip(first, positions, strict=True)],
        allowed_lateness_ms=lateness,
    )

    user_key = f"{prefix}u:{{u1}}"
    assert store.user_key("u1") == user_key and store.user_keys("u1") == [user_key]
    assert await keys_under(client, prefix) == {
        user_key,
        f"{prefix}wm",
        f"{prefix}own",
    }
    assert await client.type(user_key) == b"hash"
    assert await client.hkeys(user_key) == [f"|s{CATALOGUE_VERSION}".encode()]
    assert key_slot(user_key.encode()) == key_slot(b"u1")

    # The longest window, a day of margin and a day between refreshes.
    assert store.ttl_seconds == EXPECTED_TTL_S == LONGEST_WINDOW_MS // 1000 + 2 * 24 * 3600
    assert EXPECTED_TTL_S - 5 <= await client.ttl(user_key) <= EXPECTED_TTL_S
    assert await client.ttl(f"{prefix}wm") == -1  # watermarks outlive any user

    async def stored() -> UserRecord:
        return (await store.read_records(["u1"]))["u1"]

    # A write on the same day as the user's latest event leaves the time to live alone ...
    await client.expire(user_key, 1000)
    same_day = make_event("view", "e3b", "u1", T0 + 61 * MINUTE_MS)
    assert same_day.ts // DAY_MS == first[-1].ts // DAY_MS
    await store.apply_batch([to_update(same_day)], allowed_lateness_ms=lateness)
    assert 990 <= await client.ttl(user_key) <= 1000
    # ... a store that reads the record from Redis sets it ...
    fresh = RedisFeatureStore(client, prefix=prefix)
    again = make_event("view", "e3c", "u1", T0 + 62 * MINUTE_MS)
    await fresh.apply_batch([to_update(again)], allowed_lateness_ms=lateness)
    assert EXPECTED_TTL_S - 5 <= await client.ttl(user_key) <= EXPECTED_TTL_S
    # ... and so does the first write on a later day (below).
    store = fresh
    later = make_event("view", "e4", "u1", T0 + 121 * MINUTE_MS)
    await store.apply_batch([to_update(later)], allowed_lateness_ms=lateness)

    # latest minute = T0 + 121: buckets at or before minute 1 are 120 minutes old, gone.
    fields = set((await stored()).state)
    assert f"vm{minute}" not in fields
    assert f"vm{minute + 1}" not in fields
    assert {f"sm{minute + 2}", f"pm{minute + 60}", f"$m{minute + 60}", f"vm{minute + 121}"} <= (
        fields
    )
    assert {f"vh{T0 // HOUR_MS}", f"vh{T0 // HOUR_MS + 2}", f"vd{T0 // DAY_MS}"} <= fields
    # The dedup set keeps only ids within the allowed lateness of the latest event.
    assert (await stored()).seen == {seen_key("e4"): seen_second(later.ts)}

    # A month and two days later: every old bucket of every grain is gone.
    far = make_event("cart", "e5", "u1", T0 + 32 * DAY_MS)
    await client.expire(user_key, 1000)
    await store.apply_batch([to_update(far)], allowed_lateness_ms=lateness)
    assert EXPECTED_TTL_S - 5 <= await client.ttl(user_key) <= EXPECTED_TTL_S
    fields = set((await stored()).state)
    far_buckets = {
        f"cm{far.ts // MINUTE_MS}",
        f"ch{far.ts // HOUR_MS}",
        f"cd{far.ts // DAY_MS}",
        f"wm{far.ts // MINUTE_MS}",  # the cart's value (cart_value_1h)
    }
    assert {f for f in fields if BUCKET_FIELD.match(f)} == far_buckets
    # No other field (per-day category counts, say) still refers to the first day either.
    assert not [f for f in fields if str(T0 // DAY_MS) in f]
    assert {"nv", "ns", "np", "nc", "lv", "ls", "lp", "lc", "lt", "fs"} <= fields
    state = (await store.read_states(["u1"]))["u1"]
    assert state == reference_state([*first, same_day, again, later, far])
    assert (await stored()).seen == {seen_key("e5"): seen_second(far.ts)}


@pytest.mark.parametrize(
    "user_id",
    [
        "u1",
        "a}b",
        "{x}",
        "user:with:colons",
        "}u1",
    ],
)
async def test_a_users_record_key_is_tagged_with_the_whole_user_id(
    redis_env: RedisEnv, user_id: str
) -> None:
    store, client, prefix = redis_env.store, redis_env.client, redis_env.prefix
    await store.apply_batch(
        [to_update(make_event("view", "e1", user_id, T0))], allowed_lateness_ms=MINUTE_MS
    )
    assert await keys_under(client, prefix) == {store.user_key(user_id)}
    # The hash tag is the whole (escaped) user id, never empty or cut short at a brace.
    tag = hash_tag(user_id)
    assert "{" not in tag and "}" not in tag
    assert key_slot(store.user_key(user_id).encode()) == key_slot(tag.encode())


# -- 5. forget ----------------------------------------------------------------------------------


async def test_forget_removes_every_key_of_the_user_and_nothing_else(redis_env: RedisEnv) -> None:
    store, client, prefix = redis_env.store, redis_env.client, redis_env.prefix
    users = ["u1", "u10", "u2"]
    updates = [
        to_update(make_event(kind, f"{user}-{kind}", user, T0 + k * 1000), Position("t", 0, n))
        for n, (k, kind, user) in enumerate(
            (k, kind, user) for k, kind in enumerate(KINDS) for user in users
        )
    ]
    await store.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
    states = await store.read_states(users)
    assert all(states.values())
    others = {u: r.seen for u, r in (await store.read_records(["u10", "u2"])).items()}
    keys = await keys_under(client, prefix)
    assert set(store.user_keys("u1")) <= keys

    assert await store.forget("u1") == 1
    assert await client.exists(*store.user_keys("u1")) == 0
    # The state epoch moved (every store drops what it holds); nothing else changed.
    assert await keys_under(client, prefix) == keys - set(store.user_keys("u1")) | {f"{prefix}se"}
    assert await store.read_states(users) == {**states, "u1": {}}
    assert {u: r.seen for u, r in (await store.read_records(["u10", "u2"])).items()} == others
    assert all([await client.ttl(store.user_key(u)) > 0 for u in ("u10", "u2")])
    assert await store.watermarks() == {("t", 0): len(updates) - 1}
    assert await store.forget("u1") == 0
    assert await store.forget("nobody") == 0

    # Forgotten means forgotten: the same event id, newly delivered, is applied afresh.
    again = to_update(make_event("view", "u1-view", "u1", T0), Position("t", 0, len(updates)))
    outcome = await store.apply_batch([again], allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [APPLIED] and outcome.before == {"u1": {}}


# -- 6. one script call per batch ---------------------------------------------------------------


def script_calls(stats: dict[str, dict[str, int]]) -> int:
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_one_script_call_per_batch(services: Services, redis_env: RedisEnv) -> None:
    name = f"ds-one-call-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(services.redis_url, client_name=name)
    watcher = redis_env.client
    try:
        store = RedisFeatureStore(client, prefix=redis_env.prefix)
        offset = 0

        def batch(size: int) -> list[StateUpdate]:
            nonlocal offset
            updates = []
            for _ in range(size):
                event = make_event(KINDS[offset % 5], f"e{offset}", f"u{offset % 37}", T0 + offset)
                updates.append(to_update(event, Position("events.any", 0, offset)))
                offset += 1
            return updates

        # Loads the scripts and every user (a user the store does not hold is read first, by
        # a script call of its own): from then on a batch is one call.
        await store.apply_batch(batch(37), allowed_lateness_ms=HOUR_MS)
        for size in (1, 50, 500):
            # Other clients share this Redis and may run scripts too: retry until a clean
            # measurement; our own batch can never count for less than one call.
            deltas = []
            for _ in range(8):
                updates = batch(size)
                before = script_calls(await watcher.info("commandstats"))
                outcome = await store.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
                after = script_calls(await watcher.info("commandstats"))
                assert outcome.statuses == [APPLIED] * size
                deltas.append(after - before)
                if deltas[-1] == 1:
                    break
            assert min(deltas) == 1, f"script calls per batch of {size}: {deltas}"
            # Its connections' last commands: the batch's script call, and the tombstone MGET
            # sent beside the read of users it did not hold (on a second connection).
            mine = [c for c in await watcher.client_list() if c["name"] == name]
            assert {c["cmd"] for c in mine} <= {"evalsha", "eval", "mget"}
            assert any(c["cmd"] in ("evalsha", "eval") for c in mine)
        assert await store.apply_batch([], allowed_lateness_ms=HOUR_MS) == BatchOutcome([], {})
    finally:
        await client.aclose()


class CountingReads:
    """A Redis client that remembers the user keys whose record the store read (its read
    script, the store's only read of records): which users a store held shows in which it
    had to read."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self.read_keys: list[str] = []
        self._read_sha = AsyncScript(client, _READ_RECORDS).sha

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def register_script(self, script: str) -> AsyncScript:
        return AsyncScript(self, script)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha == self._read_sha:
            self.read_keys.extend(str(key) for key in keys_and_args[:numkeys])
        return await self._client.evalsha(sha, numkeys, *keys_and_args)


def held_bytes(store: RedisFeatureStore) -> int:
    """The held records' size by a scan (the store keeps it without one)."""
    return sum(len(blob) for held in (store._records, store._aged) for blob in held.values())


async def test_a_full_store_drops_the_least_recently_written_and_reads_them_again(
    redis_env: RedisEnv,
) -> None:
    now = [1.0]
    reads = CountingReads(redis_env.client)
    store = RedisFeatureStore(
        reads, prefix=redis_env.prefix, max_cached_users=10, clock=lambda: now[0]
    )
    offset = 0

    def views(users: Sequence[str]) -> list[StateUpdate]:
        nonlocal offset
        updates = []
        for user in users:
            event = make_event("view", f"e{offset}", user, T0 + offset)
            updates.append(to_update(event, Position("events.browse", 0, offset)))
            offset += 1
        return updates

    old = [f"u{i}" for i in range(10)]
    recent = [*old[:5], "n0"]
    await store.apply_batch(views(old), allowed_lateness_ms=HOUR_MS)
    assert store.held_users() == 10
    now[0] = 2.0
    # 11 users: the least recently written one goes, and a tenth of the bound more
    await store.apply_batch(views(recent), allowed_lateness_ms=HOUR_MS)
    assert store.held_users() == 9
    reads.read_keys.clear()
    now[0] = 3.0
    await store.apply_batch(views(recent), allowed_lateness_ms=HOUR_MS)
    assert reads.read_keys == []  # every recently written user is held
    await store.apply_batch(views(old[5:]), allowed_lateness_ms=HOUR_MS)
    record_keys = {store.user_key(user): user for user in [*old, "n0"]}
    dropped = [record_keys[key] for key in reads.read_keys if key in record_keys]
    assert len(dropped) == 2 and set(dropped) <= set(old[5:])  # two of those written first
    states = await store.read_states([*old, "n0"])
    assert {user: state["nv"] for user, state in states.items()} == {
        **{user: 3.0 for user in old[:5]},
        **{user: 2.0 for user in old[5:]},
        "n0": 2.0,
    }
    # the held size is kept as records come, change and go (the gauge never scans)
    assert store.held_record_bytes() == held_bytes(store) > 0
    await store.forget("n0")
    assert store.held_record_bytes() == held_bytes(store) > 0
    store.on_revoked([("events.browse", 0)])
    assert store.held_record_bytes() == 0


async def test_a_held_record_is_read_again_once_two_generations_passed_without_a_write(
    redis_env: RedisEnv,
) -> None:
    """A held record not written for a generation ages, and goes at the next turn: it is read
    from Redis again (its key's time to live may have run out there). A store idle for two
    generations reads every user again."""
    now = [0.0]
    reads = CountingReads(redis_env.client)
    store = RedisFeatureStore(reads, prefix=redis_env.prefix, clock=lambda: now[0])
    offsets = iter(range(1_000))

    async def view(*users: str) -> None:
        updates = []
        for user in users:
            offset = next(offsets)
            event = make_event("view", f"e{offset}", user, T0 + offset)
            updates.append(to_update(event, Position("events.browse", 0, offset)))
        reads.read_keys.clear()
        await store.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
        assert store.held_record_bytes() == held_bytes(store)

    def read() -> set[str]:
        keys = {store.user_key(user): user for user in ("a", "b", "c")}
        return {keys[key] for key in reads.read_keys if key in keys}

    await view("a", "b")
    now[0] = GENERATION_S + 1.0  # a and b age; b is written again, c is new
    await view("b", "c")
    assert read() == {"c"} and store.held_users() == 3
    now[0] = 2 * GENERATION_S + 2.0  # a goes: not written for a whole generation
    await view("c")
    assert read() == set() and store.held_users() == 2
    await view("a")
    assert read() == {"a"}
    states = await store.read_states(["a", "b", "c"])
    assert {user: state["nv"] for user, state in states.items()} == {"a": 2.0, "b": 2.0, "c": 2.0}
    now[0] += 2 * GENERATION_S  # idle for two generations: everything is read again
    await view("b", "c")
    assert read() == {"b", "c"} and store.held_users() == 2


async def test_the_store_holds_each_record_as_the_bytes_redis_has(redis_env: RedisEnv) -> None:
    """Held records are kept encoded between batches: after each batch, what the store holds
    is as large as what Redis has, and a user touched again is decoded, changed and re-encoded
    (the states, read back, are the in-memory store's)."""
    reads = CountingReads(redis_env.client)
    store = RedisFeatureStore(reads, prefix=redis_env.prefix)
    reference = InMemoryFeatureStore()
    events = [parse_event(raw) for raw in open_loop(users=40, events=1_200, seed=23)]
    users = sorted({event.user_id for event in events})
    keys = [store.user_key(user) for user in users]
    for start in range(0, len(events), 300):
        updates = [
            to_update(event, Position("events.browse", 0, start + i))
            for i, event in enumerate(events[start : start + 300])
        ]
        outcome = await store.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
        expected = await reference.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
        assert outcome.statuses == expected.statuses
        async with redis_env.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hstrlen(key, RECORD_FIELD)
            stored = sum(await pipe.execute())
        assert store.held_record_bytes() == stored > 0
    # each record was read once, when its user first came: after that the held bytes served
    assert sorted(key for key in reads.read_keys if key in keys) == sorted(keys)
    assert await store.read_states(users) == await reference.read_states(users)


# -- 7. memory per active user (a figure for the report, not an assertion) ----------------------


async def test_memory_per_active_user(redis_env: RedisEnv) -> None:
    store, client = redis_env.store, redis_env.client
    lateness = HOUR_MS  # the engine's default (engine.pipeline.EngineConfig)
    events = [parse_event(raw) for raw in open_loop(users=5000, events=50_000, seed=11)]
    offsets: Counter[tuple[str, int]] = Counter()
    updates = []
    for event in events:
        source = f"events.{event.type}"
        partition = zlib.crc32(event.user_id.encode()) % 6
        position = Position(source, partition, offsets[(source, partition)])
        offsets[(source, partition)] += 1
        updates.append(to_update(event, position))

    used_before = (await client.info("memory"))["used_memory"]
    started = time.perf_counter()
    for start in range(0, len(updates), 500):
        outcome = await store.apply_batch(
            updates[start : start + 500], allowed_lateness_ms=lateness
        )
        assert set(outcome.statuses) == {APPLIED}
    elapsed = time.perf_counter() - started
    used_after = (await client.info("memory"))["used_memory"]

    users = sorted({event.user_id for event in events})
    async with client.pipeline(transaction=False) as pipe:
        for user in users:
            pipe.memory_usage(store.user_key(user), samples=0)
        record_bytes = sum(await pipe.execute())
    records = await store.read_records(users)
    fields = sum(len(r.state) for r in records.values())
    ids = sum(len(r.seen) for r in records.values())
    async with client.pipeline(transaction=False) as pipe:
        for user in users:
            pipe.hstrlen(store.user_key(user), RECORD_FIELD)
        sizes = await pipe.execute()

    n = len(users)
    print(
        f"\n[redis memory] {len(events)} events, {n} active users, lateness {lateness // 1000}s, "
        f"applied in {elapsed:.2f}s ({len(events) / elapsed:,.0f} events/s)\n"
        f"[redis memory] MEMORY USAGE per active user: {record_bytes / n:,.0f} B "
        f"(record of {sum(sizes) / n:,.0f} B: {fields / n:.1f} fields, {ids / n:.1f} event ids)\n"
        f"[redis memory] INFO used_memory delta per active user: "
        f"{(used_after - used_before) / n:,.0f} B (shared server: indicative only)"
    )
    assert len(await store.read_states(users[:3])) == 3


# -- bugs ---------------------------------------------------------------------------------------


def poison_batch() -> list[StateUpdate]:
    """A browse, then a purchase with a huge amount (1e17, built directly: the event contract
    caps money at 1e12) whose spend in cents would overflow 64-bit integers."""
    huge = PurchaseEvent(
        event_id="p1",
        user_id="u1",
        ts=T0 + 1000,
        order_id="o1",
        items=(PurchaseItem(item_id="i1", category="home", price=1e17, quantity=1),),
        amount=1e17,
    )
    ok = make_event("view", "v1", "u1", T0)
    return [
        to_update(ok, Position("events.browse", 0, 0)),
        to_update(huge, Position("events.purchase", 0, 0)),
    ]


async def test_a_schema_valid_huge_amount_is_applied_as_in_memory(redis_env: RedisEnv) -> None:
    updates = poison_batch()
    memory = InMemoryFeatureStore()
    expected = await memory.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
    outcome = await redis_env.store.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == expected.statuses == [APPLIED, APPLIED]
    # Past 2**53 cents the record keeps the value as a double: read back exactly.
    assert await redis_env.store.read_states(["u1"]) == await memory.read_states(["u1"])


async def test_a_failed_write_changes_nothing_and_drops_what_the_store_held(
    redis_env: RedisEnv,
) -> None:
    """A Redis error in the write (here: the watermark key holds the wrong type) leaves Redis as
    it was, and the store, whose records ran ahead of Redis, reads everything again."""
    store, client = redis_env.store, redis_env.client
    first = [to_update(make_event("view", "v1", "u1", T0), Position("events.browse", 0, 0))]
    await store.apply_batch(first, allowed_lateness_ms=HOUR_MS)
    before = await store.read_records(["u1"])
    await client.delete(store.watermark_key)
    await client.set(store.watermark_key, "not a hash")
    second = [to_update(make_event("view", "v2", "u1", T0 + 1000), Position("events.browse", 0, 1))]
    with pytest.raises(ResponseError):
        await store.apply_batch(second, allowed_lateness_ms=HOUR_MS)
    assert await store.read_records(["u1"]) == before
    assert store.held_users() == 0

    await client.delete(store.watermark_key)  # repaired; the retry applies the batch once
    outcome = await store.apply_batch(second, allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [APPLIED]
    assert outcome.before == {"u1": before["u1"].state}
    assert (await store.read_states(["u1"]))["u1"]["nv"] == 2


async def test_a_store_that_lost_its_partition_is_fenced_and_writes_nothing(
    redis_env: RedisEnv,
) -> None:
    """Two stores writing one partition (a worker that lost it without noticing, and its new
    owner): the one that claimed it last writes; the other is refused before any write."""
    client, prefix = redis_env.client, redis_env.prefix
    old = RedisFeatureStore(client, prefix=prefix)
    new = RedisFeatureStore(client, prefix=prefix)

    def view(event_id: str, offset: int, partition: int = 0) -> StateUpdate:
        event = make_event("view", event_id, "u1", T0 + offset)
        return to_update(event, Position("events.browse", partition, offset))

    await old.apply_batch([view("a", 0)], allowed_lateness_ms=HOUR_MS)
    state_a = (await old.read_states(["u1"]))["u1"]
    outcome = await new.apply_batch([view("b", 1)], allowed_lateness_ms=HOUR_MS)
    assert outcome.before == {"u1": state_a}  # read from Redis: the new store held nothing
    written = await new.read_records(["u1"])
    with pytest.raises(PartitionFenced, match=r"events\.browse:0"):
        await old.apply_batch([view("c", 2)], allowed_lateness_ms=HOUR_MS)
    assert await new.read_records(["u1"]) == written
    assert await new.watermarks() == {("events.browse", 0): 1}
    # A partition the old store still owns is not affected.
    outcome = await old.apply_batch([view("d", 0, partition=1)], allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [APPLIED]

    # A rebalance gives the partition back: the old store drops what it held and claims anew.
    old.on_revoked([("events.browse", 0), ("events.browse", 1)])
    old.on_assigned([("events.browse", 0)])
    outcome = await old.apply_batch([view("c", 2)], allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [APPLIED]
    assert (await old.read_states(["u1"]))["u1"]["nv"] == 4
    with pytest.raises(PartitionFenced):
        await new.apply_batch([view("e", 3)], allowed_lateness_ms=HOUR_MS)


async def test_granted_offers_stored_at_a_revoke_never_overwrite_the_next_owners_records(
    redis_env: RedisEnv,
) -> None:
    """An offer granted by a worker's last batch before a revoke joins the user's state with
    the worker's next batch, which would be of other partitions: written then, the user's
    record read before the new owner's writes would go over them (the chaos suite lost four
    views of a user that way). ``store_now`` stores it while the partition is still the
    worker's, fenced by its claims: after the new owner claimed the partition it is refused."""
    client, prefix = redis_env.client, redis_env.prefix
    old = RedisFeatureStore(client, prefix=prefix, defer_writes=False)
    new = RedisFeatureStore(client, prefix=prefix)

    def view(event_id: str, user: str, offset: int, partition: int = 0) -> StateUpdate:
        event = make_event("view", event_id, user, T0 + offset)
        return to_update(event, Position("events.browse", partition, offset))

    def offer(offer_id: str, user: str, at: int) -> StateUpdate:
        return StateUpdate(user, f"offer:{offer_id}", at, offer_ops(at, 10.0), on_time=True)

    await old.apply_batch([view("a", "u1", 0), view("z", "u9", 0, 1)], allowed_lateness_ms=HOUR_MS)
    # the revoke: the offer granted by that batch is stored now, then the store lets go
    await old.store_now([offer("o1", "u1", T0)], allowed_lateness_ms=HOUR_MS)
    old.on_revoked([("events.browse", 0), ("events.browse", 1)])
    await new.claim([("events.browse", 0)])
    await new.apply_batch([view("b", "u1", 1)], allowed_lateness_ms=HOUR_MS)
    # the old worker's next batch, of the partition it kept, carries nothing of u1
    old.on_assigned([("events.browse", 1)])
    await old.apply_batch([view("y", "u9", 1, 1)], allowed_lateness_ms=HOUR_MS)
    state = (await new.read_states(["u1"]))["u1"]
    assert state["nv"] == 2, "a view of the new owner's was overwritten"
    assert compute_features(state)["offer_count_30d"] == 1

    # A store that missed the revoke (its session expired) is fenced out of storing offers of
    # the partition's users; a store that owns the partition stores an offer once.
    stale = RedisFeatureStore(client, prefix=prefix)
    await stale.claim([("events.browse", 0)])
    await stale.apply_batch([view("c", "u1", 2)], allowed_lateness_ms=HOUR_MS)
    await redis_env.store.claim([("events.browse", 0)])  # the partition moves on again
    with pytest.raises(PartitionFenced):
        await stale.store_now([offer("o2", "u1", T0 + 2)], allowed_lateness_ms=HOUR_MS)
    owner = redis_env.store
    await owner.store_now([offer("o2", "u1", T0 + 2)], allowed_lateness_ms=HOUR_MS)
    await owner.store_now([offer("o2", "u1", T0 + 2)], allowed_lateness_ms=HOUR_MS)
    state = (await owner.read_states(["u1"]))["u1"]
    assert state["nv"] == 3 and compute_features(state)["offer_count_30d"] == 2


async def test_forget_makes_every_store_drop_what_it_holds(redis_env: RedisEnv) -> None:
    """A worker holds u1's record; `dealstream forget` (another store) deletes it: the worker's
    next batch starts u1 afresh instead of writing the forgotten history back."""
    client, prefix = redis_env.client, redis_env.prefix
    worker = RedisFeatureStore(client, prefix=prefix)
    updates = [
        to_update(make_event("view", f"e{k}", user, T0 + k), Position("events.browse", 0, k))
        for k, user in enumerate(["u1", "u2", "u1"])
    ]
    await worker.apply_batch(updates, allowed_lateness_ms=HOUR_MS)
    assert worker.held_users() == 2
    u2 = await worker.read_records(["u2"])

    assert await RedisFeatureStore(client, prefix=prefix).forget("u1") == 1
    later = [
        to_update(make_event("cart", "e3", "u1", T0 + 3), Position("events.browse", 0, 3)),
        to_update(make_event("cart", "e4", "u2", T0 + 4), Position("events.browse", 0, 4)),
    ]
    outcome = await worker.apply_batch(later, allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [APPLIED, APPLIED]
    assert outcome.before == {"u1": {}, "u2": u2["u2"].state}
    states = await worker.read_states(["u1", "u2"])
    assert states["u1"] == reference_state([make_event("cart", "e3", "u1", T0 + 3)])
    assert states["u2"]["nv"] == 1 and states["u2"]["nc"] == 1


async def test_a_tombstone_stops_a_held_user_being_rebuilt_until_it_expires(
    redis_env: RedisEnv,
) -> None:
    """A worker holds u1 under a pseudonym; `forget` with a tombstone: the worker's next batch
    reads the tombstone with the record (one MGET) and skips u1's events as FORGOTTEN, the
    watermark moving past them; once the tombstone expired, u1 starts afresh."""
    client, prefix = redis_env.client, redis_env.prefix
    now_ms = [1_000_000.0]
    pseudonyms = Pseudonyms(b"integration-pseudonym-key-0123")
    worker = RedisFeatureStore(
        client, prefix=prefix, pseudonyms=pseudonyms, wall_clock_ms=lambda: now_ms[0]
    )
    first = [
        to_update(make_event("view", f"e{k}", user, T0 + k), Position("events.browse", 0, k))
        for k, user in enumerate(["u1", "u2"])
    ]
    await worker.apply_batch(first, allowed_lateness_ms=HOUR_MS)
    assert not [k for k in await keys_under(client, prefix) if "{u1}" in k or "{u2}" in k]

    cli = RedisFeatureStore(
        client, prefix=prefix, pseudonyms=pseudonyms, wall_clock_ms=lambda: now_ms[0]
    )
    assert await cli.forget("u1", tombstone_ttl_s=60) == 1
    assert await cli.forgotten_until("u1") == now_ms[0] + 60_000
    assert 0 < await client.pttl(cli.tombstone_key("u1")) <= 60_000

    later = [
        to_update(make_event("cart", "e2", "u1", T0 + 2), Position("events.browse", 0, 2)),
        to_update(make_event("cart", "e3", "u2", T0 + 3), Position("events.browse", 0, 3)),
    ]
    outcome = await worker.apply_batch(later, allowed_lateness_ms=HOUR_MS)
    assert outcome.statuses == [UpdateStatus.FORGOTTEN, APPLIED]
    assert await client.exists(worker.user_key("u1")) == 0
    assert await worker.watermarks() == {("events.browse", 0): 3}
    # Held as forgotten: a later batch needs no read to skip u1 again.
    again = [to_update(make_event("view", "e4", "u1", T0 + 4), Position("events.browse", 0, 4))]
    assert (await worker.apply_batch(again, allowed_lateness_ms=HOUR_MS)).statuses == [
        UpdateStatus.FORGOTTEN
    ]
    # Redelivered stays redelivered, forgotten or not.
    assert (await worker.apply_batch(again, allowed_lateness_ms=HOUR_MS)).statuses == [REDELIVERED]

    now_ms[0] += 61_000  # the tombstone's time is up (Redis expires the key on its own)
    await client.delete(cli.tombstone_key("u1"))
    fresh = [to_update(make_event("view", "e5", "u1", T0 + 5), Position("events.browse", 0, 5))]
    assert (await worker.apply_batch(fresh, allowed_lateness_ms=HOUR_MS)).statuses == [APPLIED]
    assert (await worker.read_states(["u1"]))["u1"]["nv"] == 1
