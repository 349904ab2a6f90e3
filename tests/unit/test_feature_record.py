"""The compact feature record: every record round-trips exactly; anything else is refused."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.analysis.simulation.world import open_loop
from engine.events import parse_event
from engine.features.record import (
    SEEN_KEY_BYTES,
    FeatureRecordError,
    UserRecord,
    decode_record,
    decode_state,
    encode_record,
    latest_time,
    seen_key,
)
from engine.features.state import event_ops, offer_ops, parsed_field
from engine.features.store import InMemoryFeatureStore, Position, StateUpdate, apply_updates

T0 = 1_767_225_600_000


def round_trip(record: UserRecord) -> UserRecord:
    return decode_record(encode_record(record))


def assert_same(back: UserRecord, record: UserRecord) -> None:
    assert list(back.state.items()) == list(record.state.items())  # field order too
    assert back.seen == record.seen
    for value, original in zip(back.state.values(), record.state.values(), strict=True):
        assert type(value) is float and (value == original or value != value)


def test_records_of_simulated_shoppers_round_trip_and_stay_small() -> None:
    store = InMemoryFeatureStore()
    updates = []
    for raw in open_loop(users=300, events=6_000, seed=5, start_ms=T0):
        event = parse_event(raw)
        updates.append(StateUpdate(event.user_id, event.event_id, event.ts, event_ops(event)))
        if len(updates) % 7 == 0:  # the engine records offers in the same state
            updates.append(
                StateUpdate(
                    event.user_id, f"offer:{event.event_id}", event.ts, offer_ops(event.ts, 12.5)
                )
            )
    for start in range(0, len(updates), 250):
        asyncio.run(store.apply_batch(updates[start : start + 250], allowed_lateness_ms=3_600_000))
    blobs = list(store._users.values())
    assert len(blobs) > 200
    sizes = []
    records = []
    for blob in blobs:
        record = decode_record(blob)
        records.append(record)
        sizes.append(len(blob))
        assert encode_record(record) == blob
        assert_same(round_trip(record), record)
        assert (record.next_expiry, record.oldest_seen) == (
            min((parsed_field(name)[3] for name in record.state), default=float("inf")),
            min(record.seen.values(), default=float("inf")),
        )
    # Names and times relative to the latest event, small numbers in varints: less than half
    # of the names and 8-byte values alone (what a hash of the state would hold, at least).
    naive = sum(len(name) + 8 for r in records for name in r.state)
    naive += sum(SEEN_KEY_BYTES + 8 for r in records for _ in r.seen)
    assert sum(sizes) < naive / 2


finite = st.floats(allow_nan=False, allow_infinity=False)
names = st.one_of(
    st.sampled_from(["lt", "fs", "lv", "nv", "od", "np", "lp", "x", ""]),
    st.builds(
        lambda code, grain, index: f"{code}{grain}{index}",
        st.sampled_from("vcfsp$rowq"),
        st.sampled_from("mhdy"),
        st.one_of(st.integers(0, 10**8).map(str), st.just("007"), st.just("-3")),
    ),
    st.builds(lambda day, cat: f"k{day}:{cat}", st.sampled_from(["20454", "007", "x"]), st.text()),
    st.text(),
)
values = st.one_of(
    st.integers(-(2**60), 2**60).map(float),
    st.integers(0, 2**41).map(float),
    finite,
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(-0.0),
)


@given(
    state=st.dictionaries(names, values, max_size=40),
    seen=st.dictionaries(
        st.binary(min_size=SEEN_KEY_BYTES, max_size=SEEN_KEY_BYTES),
        st.one_of(st.integers(-(2**50), 2**50), st.integers(T0 - 2**33, T0)),
        max_size=20,
    ),
    lt=st.one_of(st.none(), st.integers(-5, 2**45).map(float), finite),
)
def test_any_record_round_trips_exactly(
    state: dict[str, float], seen: dict[bytes, int], lt: float | None
) -> None:
    if lt is not None:
        state = {"lt": lt, **state} if "lt" not in state else state
    record = UserRecord(state=state, seen=seen)
    back = round_trip(record)
    assert list(back.state) == list(state)
    for name, value in state.items():
        got = back.state[name]
        assert got == value or (got != got and value != value)
        assert str(got) == str(value)  # -0.0 stays -0.0
    assert back.seen == seen


def test_an_empty_record_round_trips() -> None:
    assert_same(round_trip(UserRecord()), UserRecord())
    record = UserRecord(seen={seen_key("e1"): T0})
    assert round_trip(record).seen == record.seen


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x02", b"\x01", b"\x01\x80", b"\x01\x00\x00\x01\x07", b"\x01\x00\x00\x00\x00\x00"],
)
def test_bytes_that_are_not_a_record_are_refused_clearly(blob: bytes) -> None:
    with pytest.raises(FeatureRecordError):
        decode_record(blob)


def test_a_truncated_record_is_refused() -> None:
    state = {"lt": float(T0), "vm1": 3.0, "k20454:home": 1.0, "fs": float(T0 - 5)}
    blob = encode_record(UserRecord(state=state, seen={seen_key("e"): T0}))
    for end in range(len(blob)):
        with pytest.raises(FeatureRecordError):
            decode_record(blob[:end])


def test_the_layout_is_the_one_records_in_redis_were_written_in() -> None:
    """FORMAT 2's bytes, pinned: records already stored must read back, and new ones must read
    the same way. (The fields are as FORMAT 1's first encoder wrote them; FORMAT 2 changed
    the dedup section: times in seconds, newest first, each after the one before it.)"""
    state = {
        "lt": float(T0),
        "vm29453760": 3.0,
        "ch490896": 1.0,
        "k20454:home": 2.0,
        "k20453:toys": 1.0,
        "fs": float(T0 - 86_400_000),
        "lv": float(T0),
        "nv": 7.0,
        "od": float((T0 - 5000) * 1000 + 150),
        "session_x": 0.25,
        "vd20454": -0.0,
    }
    fields = (
        "0280d0eab6b7330204686f6d6504746f79730b3d01000605000228000004280102022980f0b2522a00320e"
        "3cd4aae204ff0973657373696f6e5f783fd0000000000000ff07766432303435348000000000000000"
    )
    second = T0 // 1000
    # e2 first: newest first, whatever order the set is in
    two = UserRecord(state=state, seen={seen_key("e1"): second - 1, seen_key("e2"): second})
    assert encode_record(two).hex() == fields + "02f58b108d61be920eda9b0001"
    ahead = UserRecord(state=state, seen={seen_key("e3"): second + 5})
    assert encode_record(ahead).hex() == fields + "0140f86f811809"
    assert_same(round_trip(two), two)


@pytest.mark.parametrize("value", ["3", None, [1.0]])
def test_a_value_that_is_not_a_number_is_refused(value: object) -> None:
    with pytest.raises(TypeError):
        encode_record(UserRecord(state={"vm1": value}))  # type: ignore[dict-item]


def test_a_store_step_refuses_a_held_record_it_cannot_read_and_changes_nothing() -> None:
    state = {"lt": float(T0), "vm1": 3.0, "fs": float(T0 - 5)}
    good = encode_record(UserRecord(state=state, seen={seen_key("e"): T0 // 1000}))
    update = StateUpdate("u1", "e2", T0 + 1, [("i", "vm1", 1.0)], Position("b", 0, 7))
    for bad in (b"\x01" + good[1:], good[:-1], good + b"\x00"):
        records, marks = {"u1": bad}, {("b", 0): 3}
        with pytest.raises(FeatureRecordError):
            apply_updates(records, marks, [update], allowed_lateness_ms=3_600_000)
        assert records == {"u1": bad} and marks == {("b", 0): 3}


def test_states_before_are_decoded_only_when_read() -> None:
    minute = f"vm{T0 // 60_000}"
    state = {"lt": float(T0), minute: 3.0, "fs": float(T0 - 5)}
    held = encode_record(UserRecord(state=state, seen={}))
    records = {"old": held}
    updates = [
        StateUpdate("old", "e1", T0 + 1, [("i", minute, 1.0), ("x", "lt", float(T0 + 1))]),
        StateUpdate("new", "e2", T0 + 2, [("i", minute, 1.0), ("x", "lt", float(T0 + 2))]),
    ]
    outcome, touched, bytes_added = apply_updates(
        records, {}, updates, allowed_lateness_ms=3_600_000
    )
    assert touched == ["old", "new"]
    assert bytes_added == len(records["old"]) - len(held) + len(records["new"])
    before = outcome.before
    assert before.record("old") is held and before.record("new") is None
    assert before["old"] == state and before["new"] == {}
    assert before["old"] is before["old"]  # decoded once; the engine replays on that dict
    assert decode_record(records["old"]).state == {
        "lt": float(T0 + 1),
        minute: 4.0,
        "fs": T0 - 5,
    }
    assert latest_time(records["old"]) == T0 + 1 and latest_time(held) == T0


def test_a_record_of_another_format_says_which_byte_it_found() -> None:
    blob = b"\x01" + encode_record(UserRecord(state={"lt": float(T0)}))[1:]
    for read in (decode_record, decode_state, latest_time):
        with pytest.raises(FeatureRecordError, match=r"format 2 \(first byte 0x01\)"):
            read(blob)
    with pytest.raises(FeatureRecordError, match=r"first byte none: empty"):
        decode_record(b"")
