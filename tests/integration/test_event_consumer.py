"""The worker's event consumer (``streams/worker/consumer.py``) against real Kafka.

- co-partitioned assignment: with two members, partition n of the three event topics is on
  one member;
- offsets are committed only after the sink flushed: a batch whose flush fails is read again
  by the next consumer of the group;
- on revoke, the batch in flight is handled, flushed and committed before the group moves on:
  the member that takes over starts after it, so no record is handled twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from streams.adapters.decode import RawRecord
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from streams.worker.consumer import EventConsumer
from tests.conftest import Isolation, Services
from tests.sinks import ListSink
from tests.worker_process import clean_up, poll_until

pytestmark = pytest.mark.integration

PARTITIONS = 4
SESSION_S = 6.0
TIMEOUT_S = 60.0


class Assignments:
    """An ``AssignmentObserver`` that keeps the current assignment and every revoke."""

    def __init__(self) -> None:
        self.current: frozenset[tuple[str, int]] | None = None
        self.revoked: list[tuple[str, int]] = []

    def on_assigned(self, partitions: object) -> None:
        self.current = frozenset(partitions)  # type: ignore[arg-type]

    def on_revoked(self, partitions: object) -> None:
        self.revoked.extend(partitions)  # type: ignore[call-overload]


class FailingFlushSink(ListSink):
    async def flush(self) -> None:
        raise OSError("delivery failed (test)")


@pytest.fixture
async def topics(services: Services, isolation: Isolation) -> AsyncIterator[Topics]:
    topics = Topics(isolation.topic_prefix)
    await ensure_topics(services.kafka_bootstrap, topics.events, partitions=PARTITIONS)
    yield topics
    await clean_up(services, isolation)


async def produce(services: Services, topics: Topics, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(count):
            topic = topics.events[i % 3]
            await producer.send(topic, key=f"u{i % 37}".encode(), value=f"{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()


async def committed(services: Services, group: str) -> dict[tuple[str, int], int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


def make_consumer(
    services: Services,
    isolation: Isolation,
    topics: Topics,
    handled: list[RawRecord],
    sink: ListSink,
    *,
    observer: Assignments | None = None,
    delay_s: float = 0.0,
    failures: list[BaseException] | None = None,
) -> EventConsumer:
    async def handle(records: Sequence[RawRecord]) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        handled.extend(records)

    return EventConsumer(
        bootstrap=services.kafka_bootstrap,
        group_id=isolation.group_id,
        topics=topics.events,
        handle=handle,
        sink=sink,
        batch_max=50,
        batch_within_s=0.05,
        session_timeout_s=SESSION_S,
        observer=observer,
        on_fatal=failures.append if failures is not None else _raise,
    )


def _raise(exc: BaseException) -> None:
    raise AssertionError("the consumer failed") from exc


async def test_two_members_get_co_partitioned_assignments(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    observers = [Assignments(), Assignments()]
    consumers = [
        make_consumer(services, isolation, topics, [], ListSink(), observer=o) for o in observers
    ]
    for consumer in consumers:
        await consumer.start()
    try:

        async def settled() -> bool:
            current = [o.current for o in observers]
            return all(current) and sum(len(c or ()) for c in current) == 3 * PARTITIONS

        assert await poll_until(settled, TIMEOUT_S)
        numbers = []
        for observer in observers:
            assert observer.current is not None
            by_topic = {t: {p for tt, p in observer.current if tt == t} for t in topics.events}
            # RangePartitionAssignor: the same partition numbers of every event topic.
            assert len({frozenset(ps) for ps in by_topic.values()}) == 1, by_topic
            numbers.append(by_topic[topics.browse])
        assert numbers[0] | numbers[1] == set(range(PARTITIONS))
        assert not numbers[0] & numbers[1]
    finally:
        for consumer in consumers:
            await consumer.stop()


async def test_a_batch_whose_flush_fails_is_not_committed_and_is_read_again(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    await produce(services, topics, 300)
    failures: list[BaseException] = []
    first: list[RawRecord] = []
    broken = make_consumer(
        services, isolation, topics, first, FailingFlushSink(), failures=failures
    )
    await broken.start()
    try:

        async def failed() -> bool:
            return bool(failures)

        assert await poll_until(failed, TIMEOUT_S)
    finally:
        await broken.stop()
    assert first, "the first batch was handled"
    assert isinstance(failures[0], OSError)
    assert await committed(services, isolation.group_id) == {}, "nothing committed"

    again: list[RawRecord] = []
    sink = ListSink()  # this one delivers
    consumer = make_consumer(services, isolation, topics, again, sink)
    await consumer.start()
    try:

        async def drained() -> bool:
            return len(again) >= 300

        assert await poll_until(drained, TIMEOUT_S)
    finally:
        await consumer.stop()
    seen = {(r.topic, r.partition, r.offset) for r in again}
    assert len(seen) == 300 == len(again)
    assert {(r.topic, r.partition, r.offset) for r in first} <= seen, "the failed batch again"
    offsets = await committed(services, isolation.group_id)
    assert sum(offsets.values()) == 300, "every record committed once handled and flushed"
    assert sink.flushes >= consumer.batches_committed


async def test_revoke_finishes_flushes_and_commits_the_batch_in_flight(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    total = 3_000
    await produce(services, topics, total)
    handled_a: list[RawRecord] = []
    handled_b: list[RawRecord] = []
    sink_a = ListSink()
    observer_a = Assignments()
    # Slow batches: a rebalance nearly always lands while one is in flight.
    a = make_consumer(
        services, isolation, topics, handled_a, sink_a, observer=observer_a, delay_s=0.2
    )
    b = make_consumer(services, isolation, topics, handled_b, ListSink())
    await a.start()
    try:

        async def a_started() -> bool:
            return len(handled_a) >= 100

        assert await poll_until(a_started, TIMEOUT_S)
        await b.start()
        try:

            async def revoked() -> bool:
                return bool(observer_a.revoked)

            assert await poll_until(revoked, TIMEOUT_S)
            # Every batch A handled before the revoke returned was flushed and committed.
            assert sink_a.flushes == a.batches_committed

            async def drained() -> bool:
                return len(handled_a) + len(handled_b) >= total

            assert await poll_until(drained, TIMEOUT_S)
        finally:
            await b.stop()
    finally:
        await a.stop()
    keys = [(r.topic, r.partition, r.offset) for r in handled_a + handled_b]
    assert len(keys) == len(set(keys)) == total, "nothing handled twice, nothing skipped"
    offsets = await committed(services, isolation.group_id)
    assert sum(offsets.values()) == total
