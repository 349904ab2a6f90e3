"""The event-time aligner (``engine/alignment.py``) and the worker's batch step around it.

A lane (partition n of browse, search and purchase) releases an event only once no lagging
topic-partition of the lane can still deliver an earlier one; caught-up (or unknown)
topic-partitions never hold anything back; each topic-partition's releases are a prefix in
offset order; the consumer's commit limit is the first offset held.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.alignment import EventTimeAligner, SourcePartition
from engine.campaigns import Campaign
from engine.events import BrowseEvent, PurchaseEvent, PurchaseItem, SearchEvent
from engine.features.store import InMemoryFeatureStore, Position
from engine.pipeline import DiscountEngine, Incoming
from engine.policies.threshold import ThresholdPolicy
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.settings import Topics
from streams.worker.batch_worker import BatchWorker
from tests.sinks import ListSink

T0 = 1_767_225_600_000
B, S, P = "events.browse", "events.search", "events.purchase"
SOURCES = (B, S, P)


def event(source: str, ts: int, user: str = "u") -> BrowseEvent | SearchEvent | PurchaseEvent:
    name = f"{source}-{user}-{ts}"
    if source == B:
        return BrowseEvent(name, user, ts, "i", "c", 1.0)
    if source == S:
        return SearchEvent(name, user, ts, "q")
    item = PurchaseItem(item_id="i", category="c", price=1.0, quantity=1)
    return PurchaseEvent(name, user, ts, f"o-{name}", (item,), 1.0)


def at(source: str, partition: int, offset: int, ts: int) -> Incoming:
    return Incoming(event(source, T0 + ts), Position(source, partition, offset))


def where(items: Sequence[Incoming]) -> list[tuple[str, int, int]]:
    """(source, partition, offset) of each item, in order."""
    return [
        (i.position.source, i.position.partition, i.position.offset) for i in items if i.position
    ]


def times(items: Sequence[Incoming]) -> list[int]:
    return [item.event.ts - T0 for item in items]


def test_caught_up_topics_release_at_once_merged_by_event_time() -> None:
    aligner = EventTimeAligner(SOURCES)
    aligner.push([at(P, 0, 0, 5), at(P, 0, 1, 20)])
    aligner.push([at(B, 0, 0, 5), at(B, 0, 1, 10), at(S, 0, 0, 10)])
    released = aligner.release()
    # Ties: browse, search, purchase (the order the sources were given).
    assert where(released) == [(B, 0, 0), (P, 0, 0), (B, 0, 1), (S, 0, 0), (P, 0, 1)]
    assert aligner.held() == 0 and aligner.first_held() == {}


def test_a_lagging_topic_with_nothing_fetched_holds_its_whole_lane() -> None:
    aligner = EventTimeAligner(SOURCES)
    aligner.push([at(P, 0, 0, 60)], lagging={(B, 0)})
    assert aligner.release() == [] and aligner.ready() == 0
    assert aligner.first_held() == {(P, 0): 0}
    assert aligner.held_per_partition() == {(P, 0): 1}


def test_a_lagging_topic_holds_its_lane_at_the_largest_event_time_fetched_from_it() -> None:
    aligner = EventTimeAligner(SOURCES)
    purchases = [at(P, 0, offset, ts) for offset, ts in enumerate((15, 30, 45))]
    aligner.push(purchases, lagging={(B, 0), (P, 0)})
    aligner.push([at(B, 0, 0, 10), at(B, 0, 1, 30)], lagging={(B, 0), (P, 0)})
    assert times(aligner.release()) == [10, 15, 30, 30]  # browse first on the tie
    assert aligner.first_held() == {(P, 0): 2}
    aligner.push([at(B, 0, 2, 44)], lagging={(B, 0), (P, 0)})
    assert times(aligner.release()) == [44]
    # Browse read to its end: nothing holds the lane back any more.
    aligner.push([], lagging={(P, 0)})
    assert times(aligner.release()) == [45]
    assert aligner.held() == 0


def test_the_slowest_lagging_topic_sets_the_watermark() -> None:
    aligner = EventTimeAligner(SOURCES)
    lagging = {(B, 0), (S, 0), (P, 0)}
    aligner.push([at(B, 0, 0, 50), at(S, 0, 0, 20), at(P, 0, 0, 35)], lagging=lagging)
    assert times(aligner.release()) == [20]
    aligner.push([at(S, 0, 1, 40)], lagging=lagging)
    assert times(aligner.release()) == [35]  # purchase at 35 is now the slowest
    aligner.push([], lagging={(B, 0)})  # search and purchase caught up
    assert times(aligner.release()) == [40, 50]


def test_a_late_event_is_released_in_its_place_never_ahead_of_its_partition() -> None:
    aligner = EventTimeAligner(SOURCES)
    # Purchase offset 1 is late (earlier than offset 0): it waits behind offset 0.
    aligner.push([at(P, 0, 0, 30), at(P, 0, 1, 5)], lagging={(B, 0)})
    aligner.push([at(B, 0, 0, 10)], lagging={(B, 0)})
    released = aligner.release()
    assert where(released) == [(B, 0, 0)]
    assert aligner.first_held() == {(P, 0): 0}
    aligner.push([at(B, 0, 1, 30)], lagging={(B, 0)})
    assert where(aligner.release()) == [(B, 0, 1), (P, 0, 0), (P, 0, 1)]


def test_a_late_event_of_the_lagging_topic_goes_at_once() -> None:
    aligner = EventTimeAligner(SOURCES)
    aligner.push([at(P, 0, 0, 20)], lagging={(B, 0)})
    aligner.push([at(B, 0, 0, 30), at(B, 0, 1, 10)], lagging={(B, 0)})
    # The lane is at 30; browse's late event stays behind its offset 0 in the merge.
    assert where(aligner.release()) == [(P, 0, 0), (B, 0, 0), (B, 0, 1)]


def test_lanes_are_independent() -> None:
    aligner = EventTimeAligner(SOURCES)
    lagging = {(B, 1)}  # partition 1 of browse is behind; partition 0 is caught up
    aligner.push([at(P, 0, 0, 50), at(P, 1, 0, 50)], lagging=lagging)
    aligner.push([at(B, 0, 0, 10), at(B, 1, 0, 10)], lagging=lagging)
    assert where(aligner.release()) == [(B, 0, 0), (B, 1, 0), (P, 0, 0)]
    assert aligner.first_held() == {(P, 1): 0}


def test_release_with_a_limit_takes_the_earliest_and_leaves_the_rest_ready() -> None:
    aligner = EventTimeAligner(SOURCES)
    aligner.push([at(B, 0, i, 10 * i) for i in range(5)] + [at(P, 0, 0, 15), at(P, 0, 1, 35)])
    assert aligner.ready() == 7
    first = aligner.release(3)
    assert where(first) == [(B, 0, 0), (B, 0, 1), (P, 0, 0)]
    assert aligner.first_held() == {(B, 0): 2, (P, 0): 1}
    assert aligner.ready() == 4
    assert times(aligner.release(10)) == [20, 30, 35, 40]


def test_the_commit_limit_is_the_first_offset_held_per_topic_partition() -> None:
    aligner = EventTimeAligner(SOURCES)
    lagging = {(B, 0), (B, 1)}
    aligner.push([at(B, 0, 7, 10), at(B, 1, 3, 100)], lagging=lagging)
    aligner.push([at(P, 0, 40, 5), at(P, 0, 41, 12), at(S, 1, 9, 200)], lagging=lagging)
    assert times(aligner.release()) == [5, 10, 100]
    assert aligner.first_held() == {(P, 0): 41, (S, 1): 9}
    assert aligner.held() == 2


def test_a_revoke_drops_what_the_partitions_held_and_how_far_they_were_read() -> None:
    aligner = EventTimeAligner(SOURCES)
    lagging = {(B, 0), (B, 1)}
    aligner.push([at(B, 0, 0, 10), at(B, 1, 0, 10)], lagging=lagging)
    aligner.push([at(P, 0, 0, 30), at(P, 0, 1, 40), at(P, 1, 0, 30)], lagging=lagging)
    assert times(aligner.release()) == [10, 10]
    assert aligner.drop([(B, 0), (P, 0), (S, 0)]) == 2
    assert aligner.held_per_partition() == {(P, 1): 1}
    # Read again from the committed offsets: browse 0 starts over, nothing fetched yet.
    aligner.push([at(P, 0, 0, 30)], lagging=lagging)
    assert aligner.release() == []
    aligner.push([at(B, 0, 0, 10), at(B, 0, 1, 35)], lagging=lagging)
    assert where(aligner.release()) == [(B, 0, 0), (P, 0, 0), (B, 0, 1)]


def test_items_without_a_position_and_records_read_twice_go_at_once() -> None:
    aligner = EventTimeAligner(SOURCES)
    aligner.push([at(P, 0, 5, 50)], lagging={(B, 0)})
    loose = Incoming(event(B, T0 + 99))
    aligner.push([loose, at(P, 0, 5, 50)], lagging={(B, 0)})  # offset 5 again
    released = aligner.release()
    assert released[0] is loose and where(released) == [(P, 0, 5)]
    assert aligner.first_held() == {(P, 0): 5}  # the first copy still waits for browse


@st.composite
def lanes(draw: st.DrawFn) -> tuple[dict[SourcePartition, list[int]], list[SourcePartition]]:
    """Per topic-partition (two lanes), increasing event times; and a read schedule: the
    topic-partition each fetch reads the next chunk of."""
    streams = {
        (source, partition): sorted(draw(st.lists(st.integers(0, 60), max_size=12)))
        for source in SOURCES
        for partition in (0, 1)
    }
    keys = sorted(streams)
    schedule = draw(st.lists(st.sampled_from(keys), max_size=60))
    return streams, schedule


@settings(max_examples=200, deadline=None)
@given(lanes(), st.integers(1, 4), st.integers(1, 5))
def test_each_lane_comes_out_in_event_time_order_whatever_the_read_order(
    case: tuple[dict[SourcePartition, list[int]], list[SourcePartition]], chunk: int, limit: int
) -> None:
    """Topic-partitions read at random paces, in chunks, released in pieces of ``limit``: each
    lane comes out in event-time order, each topic-partition whole and in offset order."""
    streams, schedule = case
    read = {key: 0 for key in streams}
    aligner = EventTimeAligner(SOURCES)
    out: list[Incoming] = []

    def lagging() -> set[SourcePartition]:
        return {key for key, n in read.items() if n < len(streams[key])}

    def drain() -> None:
        while piece := aligner.release(limit):
            assert len(piece) <= limit
            out.extend(piece)

    def fetch(key: SourcePartition) -> None:
        start, read[key] = read[key], min(len(streams[key]), read[key] + chunk)
        items = [at(key[0], key[1], n, streams[key][n]) for n in range(start, read[key])]
        aligner.push(items, lagging=lagging())
        drain()
        for tp, first in aligner.first_held().items():  # never released past what is held
            assert all(i.position.offset < first for i in out if i.position and tp == _tp(i))

    for key in schedule:
        if read[key] < len(streams[key]):
            fetch(key)
    for key in streams:  # then every topic-partition to its end
        while read[key] < len(streams[key]):
            fetch(key)
    aligner.push([], lagging=lagging())
    drain()

    assert aligner.held() == 0
    for partition in (0, 1):
        lane = [i for i in out if i.position and i.position.partition == partition]
        ts = [i.event.ts for i in lane]
        assert ts == sorted(ts)  # equal times across topics may come in either order
    for key, tss in streams.items():
        mine = [i for i in out if _tp(i) == key]
        assert [(i.position.offset, i.event.ts - T0) for i in mine if i.position] == list(
            enumerate(tss)
        )


def _tp(item: Incoming) -> SourcePartition | None:
    return (item.position.source, item.position.partition) if item.position else None


# -- the worker's batch step --------------------------------------------------------------------

PREFIX = "al."
TOPICS = Topics(PREFIX)


def raw(doc: dict[str, Any], topic: str, offset: int, partition: int = 0) -> RawRecord:
    return RawRecord(
        f"{PREFIX}events.{topic}",
        partition,
        offset,
        str(doc["user_id"]).encode(),
        orjson.dumps(doc),
        None,
        (),
    )


def browse_doc(event_id: str, ts: int, user: str = "u-1") -> dict[str, Any]:
    return {
        "event_id": event_id,
        "user_id": user,
        "type": "browse",
        "ts": ts,
        "item_id": "i-1",
        "category": "books",
        "price": 10.0,
        "action": "view",
    }


def purchase_doc(event_id: str, ts: int, user: str = "u-1") -> dict[str, Any]:
    return {
        "event_id": event_id,
        "user_id": user,
        "type": "purchase",
        "ts": ts,
        "order_id": f"o-{event_id}",
        "items": [{"item_id": "i-1", "category": "books", "price": 10.0, "quantity": 1}],
        "amount": 10.0,
    }


def make_worker(batch_max: int | None = None) -> BatchWorker:
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=[Campaign("all", ThresholdPolicy(threshold=0.0), decision_interval_ms=0)],
    )
    return BatchWorker(
        engine,
        ListSink(),
        topics=TOPICS,
        limits=DecodeLimits(),
        wall_clock_ms=lambda: T0 + 3_600_000,
        batch_max=batch_max,
    )


async def test_the_worker_holds_a_purchase_read_ahead_and_its_counters_balance() -> None:
    worker = make_worker()
    browse, purchase = TOPICS.events[0], TOPICS.events[2]
    lagging = {(browse, 0)}
    buy = raw(purchase_doc("p-1", T0 + 60_000), "purchase", 0)
    held = await worker.handle([buy], lagging)
    assert held.statuses == [] and held.decisions == []
    counters = worker.counters
    assert (counters.consumed, counters.held, counters.applied) == (1, 1, 0)
    assert counters.balanced()
    assert worker.aligner.first_held() == {(purchase, 0): 0}

    result = await worker.handle([raw(browse_doc("v-1", T0), "browse", 0)], lagging)
    (decision,) = result.decisions
    assert decision.features["purchase_count_30d"] == 0  # the later purchase is not seen
    assert (counters.consumed, counters.held, counters.applied) == (2, 1, 1)
    assert counters.balanced()

    done = await worker.handle([], ())  # browse caught up
    assert [s.name for s in done.statuses] == ["APPLIED"]
    assert (counters.consumed, counters.held, counters.applied) == (2, 0, 2)
    assert counters.balanced() and counters.as_dict()["held"] == 0


async def test_a_revoke_hands_the_held_events_back() -> None:
    worker = make_worker()
    browse, purchase = TOPICS.events[0], TOPICS.events[2]
    await worker.handle([raw(purchase_doc("p-1", T0), "purchase", 0)], {(browse, 0)})
    worker.on_revoked([(purchase, 0), (browse, 0)])
    counters = worker.counters
    assert (counters.held, counters.handed_back, counters.consumed) == (0, 1, 1)
    assert counters.balanced() and worker.aligner.held() == 0


async def test_the_engine_gets_at_most_batch_max_events_per_call() -> None:
    worker = make_worker(batch_max=2)
    records = [raw(browse_doc(f"v-{n}", T0 + n), "browse", n) for n in range(5)]
    first = await worker.handle(records)
    assert len(first.statuses) == 2 and worker.aligner.ready() == 3
    assert worker.counters.held == 3 and worker.counters.balanced()
    sizes = []
    while worker.aligner.ready():
        sizes.append(len((await worker.handle([])).statuses))
    assert sizes == [2, 1] and worker.counters.applied == 5 and worker.counters.balanced()


async def test_a_retried_call_runs_the_same_events_and_pushes_nothing_twice() -> None:
    worker = make_worker()
    failures = [RuntimeError("Redis went away (test)")]
    process = worker.engine.process

    async def flaky(batch: Sequence[Incoming], **options: Any) -> Any:
        if failures:
            raise failures.pop()
        return await process(batch, **options)

    worker.engine.process = flaky  # type: ignore[method-assign]
    records = [raw(browse_doc("v-1", T0), "browse", 0), raw(browse_doc("v-2", T0 + 1), "browse", 1)]
    with pytest.raises(RuntimeError):
        await worker.handle(records)
    assert worker.counters.consumed == 0  # nothing counted for the failed attempt
    result = await worker.handle(records)  # the retry: the same records object
    assert len(result.statuses) == 2 and worker.aligner.held() == 0
    assert (worker.counters.consumed, worker.counters.applied) == (2, 2)
    assert worker.counters.balanced()
