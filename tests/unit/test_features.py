from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.events import BrowseEvent, Event, PurchaseEvent, PurchaseItem, SearchEvent
from engine.features.catalogue import CATALOGUE, FEATURE_NAMES, compute_features
from engine.features.state import HOUR_MS, MINUTE_MS, RECENCY_DEFAULT_S, apply_ops, event_ops
from engine.features.store import InMemoryFeatureStore, StateUpdate, UpdateStatus

T0 = 1_767_225_600_000


def browse(eid: str, ts: int, action: str = "view", user: str = "u1") -> BrowseEvent:
    return BrowseEvent(
        event_id=eid,
        user_id=user,
        ts=ts,
        item_id="i1",
        category="books",
        price=10.0,
        action=action,  # type: ignore[arg-type]
    )


def purchase(eid: str, ts: int, amount: float, user: str = "u1") -> PurchaseEvent:
    item = PurchaseItem(item_id="i1", category="books", price=amount, quantity=1)
    return PurchaseEvent(
        event_id=eid,
        user_id=user,
        ts=ts,
        order_id=f"o{eid}",
        items=(item,),
        amount=amount,
        offer_id=None,
    )


def search(eid: str, ts: int, user: str = "u1") -> SearchEvent:
    return SearchEvent(event_id=eid, user_id=user, ts=ts, query="lamp", category=None)


def state_of(events: list[Event]) -> dict[str, float]:
    state: dict[str, float] = {}
    for event in events:
        apply_ops(state, event_ops(event))
    return state


def test_catalogue_names_are_unique_and_cover_the_guide() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == len(CATALOGUE)
    for kind in ("view", "cart", "favorite", "search", "purchase"):
        for window in ("1h", "24h", "7d", "30d"):
            assert f"{kind}_count_{window}" in FEATURE_NAMES
        assert f"recency_{kind}_s" in FEATURE_NAMES
    for window in ("1h", "24h", "7d", "30d"):
        assert f"spend_{window}" in FEATURE_NAMES


def test_empty_history_gives_defaults_not_nan() -> None:
    vector = compute_features({}, now=T0)
    assert list(vector) == list(FEATURE_NAMES)
    assert vector["view_count_1h"] == 0.0
    assert vector["recency_purchase_s"] == RECENCY_DEFAULT_S
    assert all(value == value for value in vector.values())


def test_windows_count_only_recent_events() -> None:
    events: list[Event] = [
        browse("a", T0),
        browse("b", T0 + 30 * MINUTE_MS),
        browse("c", T0 + 2 * HOUR_MS, action="cart"),
        purchase("d", T0 + 3 * HOUR_MS, 25.5),
        search("e", T0 + 3 * HOUR_MS + MINUTE_MS),
    ]
    vector = compute_features(state_of(events))
    assert vector["view_count_1h"] == 0
    assert vector["view_count_24h"] == 2
    assert vector["cart_count_1h"] == 0
    assert vector["cart_count_24h"] == 1
    assert vector["purchase_count_1h"] == 1
    assert vector["spend_1h"] == 25.5
    assert vector["spend_30d"] == 25.5
    assert vector["search_count_1h"] == 1
    assert vector["recency_purchase_s"] == 60.0
    assert vector["session_events"] == 2
    assert vector["days_since_first_seen"] == pytest.approx((3 * 60 + 1) / (24 * 60))


def test_session_resets_after_thirty_quiet_minutes() -> None:
    events: list[Event] = [browse(str(i), T0 + i * 5 * MINUTE_MS) for i in range(4)]
    events.append(browse("late", T0 + 15 * MINUTE_MS + 31 * MINUTE_MS))
    assert compute_features(state_of(events))["session_events"] == 1


def _random_events(seed: int, count: int) -> list[Event]:
    rng = random.Random(seed)
    events: list[Event] = []
    ts = T0
    for index in range(count):
        ts += rng.randrange(0, 20 * MINUTE_MS)
        user = f"u{rng.randrange(3)}"
        roll = rng.random()
        if roll < 0.6:
            action = rng.choice(["view", "cart", "favorite"])
            events.append(browse(f"e{index}", ts, action=action, user=user))
        elif roll < 0.8:
            events.append(search(f"e{index}", ts, user=user))
        else:
            events.append(purchase(f"e{index}", ts, round(rng.uniform(1, 200), 2), user=user))
    return events


def _updates(events: list[Event]) -> list[StateUpdate]:
    return [StateUpdate(e.user_id, e.event_id, e.ts, event_ops(e)) for e in events]


LATENESS_MS = HOUR_MS


def shuffled_within_lateness(events: list[Event], rng: random.Random) -> list[Event]:
    """Each event moves by a random delay of at most half the allowed lateness."""
    keyed = [(e.ts + rng.randrange(0, LATENESS_MS // 2), i, e) for i, e in enumerate(events)]
    return [e for _, _, e in sorted(keyed)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 80), dup_rate=st.floats(0, 0.5))
def test_duplicates_and_reordering_give_the_in_order_features(
    seed: int, count: int, dup_rate: float
) -> None:
    rng = random.Random(seed)
    events = _random_events(seed, count)
    reference = InMemoryFeatureStore()
    asyncio.run(reference.apply_batch(_updates(events), allowed_lateness_ms=LATENESS_MS))

    messy = shuffled_within_lateness(events, rng)
    messy += [e for e in events if rng.random() < dup_rate]
    messy = shuffled_within_lateness(messy, rng)
    store = InMemoryFeatureStore()
    for start in range(0, len(messy), 7):
        outcome = asyncio.run(
            store.apply_batch(_updates(messy[start : start + 7]), allowed_lateness_ms=LATENESS_MS)
        )
        assert UpdateStatus.LATE not in outcome.statuses

    users = {e.user_id for e in events}
    states = asyncio.run(store.read_states(users))
    expected = asyncio.run(reference.read_states(users))
    for user in users:
        assert states[user] == expected[user]
        assert compute_features(states[user]) == compute_features(expected[user])


@settings(max_examples=80, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 3 * HOUR_MS), min_size=1, max_size=60),
    repeats=st.lists(st.integers(0, 59), max_size=40),
    batch=st.integers(1, 9),
)
def test_the_dedup_set_kept_by_the_second_changes_no_status(
    offsets: list[int], repeats: list[int], batch: int
) -> None:
    """The dedup set keeps each event id by its second, rounded up, and drops it after the
    lateness: every update gets the status it gets from a set that never forgets."""
    events = [browse(f"e{i}", T0 + offset) for i, offset in enumerate(offsets)]
    events += [events[i % len(events)] for i in repeats]  # redelivered: same id, same time
    random.Random(len(offsets)).shuffle(events)
    store = InMemoryFeatureStore()
    statuses: list[UpdateStatus] = []
    for start in range(0, len(events), batch):
        outcome = asyncio.run(
            store.apply_batch(
                _updates(events[start : start + batch]), allowed_lateness_ms=LATENESS_MS
            )
        )
        statuses += outcome.statuses
    latest, applied, expected = None, set(), []
    for event in events:
        if latest is not None and event.ts < latest - LATENESS_MS:
            expected.append(UpdateStatus.LATE)
        elif event.event_id in applied:
            expected.append(UpdateStatus.DUPLICATE)
        else:
            expected.append(UpdateStatus.APPLIED)
            applied.add(event.event_id)
            latest = event.ts if latest is None else max(latest, event.ts)
    assert statuses == expected


def test_category_and_purchase_features() -> None:
    redeemed = PurchaseEvent(
        event_id="r1",
        user_id="u1",
        ts=T0 + 26 * HOUR_MS,
        order_id="or1",
        items=(PurchaseItem(item_id="i2", category="toys", price=30.0, quantity=1),),
        amount=30.0,
        offer_id="o-1",
    )
    events: list[Event] = [
        browse("a", T0),  # books
        browse("b", T0 + MINUTE_MS),  # books
        purchase("c", T0 + 2 * MINUTE_MS, 10.0),  # books, day 0
        redeemed,  # toys, day 1
        search("s", T0 + 26 * HOUR_MS + MINUTE_MS),  # no category
    ]
    state = state_of(events)
    vector = compute_features(state, category="books")
    assert vector["purchase_frequency_30d"] == 2  # two distinct purchase days
    assert vector["avg_order_value_30d"] == pytest.approx(20.0)
    assert vector["discount_sensitivity"] == pytest.approx(0.5)
    assert vector["distinct_categories_7d"] == 2
    assert vector["category_affinity"] == pytest.approx(3 / 4)
    assert compute_features(state, category="toys")["category_affinity"] == pytest.approx(1 / 4)
    assert compute_features(state, category="garden")["category_affinity"] == 0.0
    assert compute_features(state)["category_affinity"] == 0.0


async def test_old_buckets_and_categories_are_trimmed_but_recent_ones_kept() -> None:
    from engine.features.state import DAY_MS

    store = InMemoryFeatureStore()
    old = browse("old", T0)
    new = browse("new", T0 + 40 * DAY_MS)
    for event in (old, new):
        update = StateUpdate(event.user_id, event.event_id, event.ts, event_ops(event))
        await store.apply_batch([update], allowed_lateness_ms=HOUR_MS)
    state = (await store.read_states(["u1"]))["u1"]
    old_day = T0 // DAY_MS
    assert f"k{old_day}:books" not in state
    assert f"vd{old_day}" not in state
    assert f"vm{T0 // MINUTE_MS}" not in state
    assert f"vd{old_day + 40}" in state and f"k{old_day + 40}:books" in state
    assert compute_features(state)["view_count_30d"] == 1


def test_docs_list_every_feature() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "features.md").read_text()
    missing = [name for name in FEATURE_NAMES if f"`{name}`" not in doc]
    assert not missing, f"docs/features.md does not describe {missing}"
