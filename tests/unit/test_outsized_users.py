"""Outsized users at the store level (issue 13), no services: what the worker tests
(``tests/integration/test_big_users.py``) rest on.

- One user's 5,000 events in one batch give the record that one event per batch gives, survive
  the record codec whole, and come back as redelivered (same offsets) or duplicates (new ones).
- A user with 9,000 category fields that went stale: the first batch that moves the user's
  latest event past their retention drops them all, starting from the record as decoded from
  its bytes (what the Redis store reads after a restart).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.events import BrowseAction, BrowseEvent
from engine.features.catalogue import compute_features
from engine.features.record import decode_record, encode_record
from engine.features.state import CATEGORY_SLOT, DAY_MS, State, event_ops, parsed_field
from engine.features.store import Position, StateUpdate, UpdateStatus, apply_updates

T0 = 1_767_225_600_000
LATENESS_MS = 3_600_000
USER = "u"


def updates(
    events: Sequence[tuple[str, int, str, BrowseAction]], first_offset: int = 0
) -> list[StateUpdate]:
    """(event id, ts, category, action) browse events of ``USER`` at consecutive offsets."""
    out = []
    for n, (event_id, ts, category, action) in enumerate(events):
        event = BrowseEvent(event_id, USER, ts, "i1", category, 12.5, action)
        position = Position("b", 0, first_offset + n)
        out.append(StateUpdate(USER, event_id, ts, event_ops(event), position))
    return out


def apply(
    records: dict[str, bytes], marks: dict[tuple[str, int], int], batch: list[StateUpdate]
) -> list[UpdateStatus]:
    return apply_updates(records, marks, batch, allowed_lateness_ms=LATENESS_MS).outcome.statuses


def category_fields(state: State) -> int:
    return sum(1 for name in state if parsed_field(name)[0] == CATEGORY_SLOT)


def test_a_5000_event_batch_of_one_user_is_applied_once_whole() -> None:
    actions: tuple[BrowseAction, ...] = ("view", "view", "cart", "favorite")
    events = [(f"b{i}", T0 + 500 * i, f"c{i % 7}", actions[i % 4]) for i in range(5_000)]
    batch = updates(events)

    one: dict[str, bytes] = {}
    marks: dict[tuple[str, int], int] = {}
    assert set(apply(one, marks, batch)) == {UpdateStatus.APPLIED}
    each: dict[str, bytes] = {}
    each_marks: dict[tuple[str, int], int] = {}
    for update in batch:
        apply(each, each_marks, [update])
    whole, one_by_one = decode_record(one[USER]), decode_record(each[USER])
    assert whole.state == one_by_one.state
    assert whole.seen == one_by_one.seen and len(whole.seen) == 5_000
    assert one[USER] == each[USER]
    assert marks == each_marks == {("b", 0): 4_999}
    assert encode_record(whole) == one[USER]

    blob = one[USER]
    stored = {USER: blob}
    # The same batch again (a crash before the commit): recognised, nothing changes.
    assert set(apply(stored, marks, batch)) == {UpdateStatus.REDELIVERED}
    assert stored[USER] == blob
    # The same events at new offsets (a producer that wrote them twice): duplicates.
    assert set(apply(stored, marks, updates(events, 5_000))) == {UpdateStatus.DUPLICATE}
    state = decode_record(stored[USER]).state
    assert state == whole.state
    assert state["nv"] == 2_500.0 and state["nc"] == 1_250.0


def test_9000_stale_category_fields_go_with_the_first_fresh_batch() -> None:
    old = T0 - 40 * DAY_MS
    history = updates([(f"h{i}", old + i, f"cat-{i:05d}", "view") for i in range(9_000)])
    fresh = updates([(f"f{i}", T0 + i, "books", "view") for i in range(5)], 9_000)
    records: dict[str, bytes] = {}
    marks: dict[tuple[str, int], int] = {}
    apply(records, marks, history)
    blob = records[USER]
    stored = decode_record(blob)  # 9,000 categories: two-byte category numbers in the record
    assert encode_record(stored) == blob
    assert category_fields(stored.state) == 9_000

    held = {USER: blob}
    assert set(apply(held, marks, fresh)) == {UpdateStatus.APPLIED}
    stored = decode_record(held[USER])
    reference: dict[str, bytes] = {}
    apply(reference, {}, history + fresh)
    assert stored.state == decode_record(reference[USER]).state
    assert category_fields(stored.state) == 1 and stored.state["nv"] == 9_005.0
    assert len(stored.seen) == 5, "the old event ids left the dedup set with the lateness"
    assert compute_features(stored.state) == compute_features(decode_record(reference[USER]).state)
    small = encode_record(stored)
    assert len(small) < 200, len(small)
    assert decode_record(small).state == stored.state
    print(f"\n9,000 stale categories: record {len(blob):,} B; after the fresh batch {len(small)} B")
