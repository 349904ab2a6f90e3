"""The worker's event consumer (``streams/worker/consumer.py``) against real Kafka.

- co-partitioned assignment: with two members, partition n of the three event topics is on
  one member;
- offsets are committed only after the batch's outputs were delivered: a batch whose delivery
  fails is read again by the next consumer of the group, and so is the batch handled while it
  was being delivered (one batch ahead);
- commits are in batch order, each only once every output of the records below it was
  acknowledged, even when deliveries complete out of order;
- a commit in flight does not hold the batches back: those delivered meanwhile go together in
  the next commit;
- the handler is told of each fetched batch's next batch before it handles the current one
  (``prepare``), and then gets that very list: every record handled once, in order;
- on revoke, the batches in flight (the one being handled and the one being delivered) are
  handled, delivered and committed before the group moves on: the member that takes over
  starts after them, so no record is handled twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from streams.adapters.decode import RawRecord
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from streams.worker.consumer import EventConsumer
from tests.conftest import Isolation, Services
from tests.sinks import ListSink
from tests.worker_process import clean_up, committed_offsets, poll_until

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


Where = tuple[str, int, int]
"""(topic, partition, offset) of an input record; its output's key encodes the same."""


def where(record: RawRecord) -> Where:
    return (record.topic, record.partition, record.offset)


def output_key(record: RawRecord) -> bytes:
    return f"{record.topic}/{record.partition}/{record.offset}".encode()


class Recorder:
    """A batch handler that keeps each batch and sends one output per record to ``sink``.

    ``committed_before`` holds, for every batch, how many commits the consumer had made when
    its handling began (``consumer`` is set once the consumer exists)."""

    def __init__(self, sink: ListSink, *, delay_s: float = 0.0) -> None:
        self.sink = sink
        self.delay_s = delay_s
        self.batches: list[list[RawRecord]] = []
        self.committed_before: list[int] = []
        self.delivered_before: list[int] = []
        self.consumer: ProbedConsumer | None = None

    async def __call__(self, records: Sequence[RawRecord], lagging: object = ()) -> None:
        if self.consumer is not None:
            self.committed_before.append(len(self.consumer.commits))
            self.delivered_before.append(self.consumer.timed_sink.completed)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        for record in records:
            await self.sink.send("out", output_key(record), b"")
        self.batches.append(list(records))

    def handled(self) -> list[RawRecord]:
        return [record for batch in self.batches for record in batch]


class TimedSink(ListSink):
    """A sink whose deliveries complete on their own, like a producer's acknowledgements.

    Delivery number n takes ``delays[n % len(delays)]`` seconds from its ``delivery`` call, so
    deliveries complete out of order; with a ``gate``, none completes before the gate is set.
    Delivery number ``fail_at`` raises instead, once ``fail_when()`` holds (or after TIMEOUT_S;
    ``failed_when`` says which): the failure comes after whatever the test waits for. ``acked``
    holds the acknowledged outputs' keys; ``completed`` counts the deliveries acknowledged."""

    def __init__(
        self,
        delays: Sequence[float] = (0.0,),
        *,
        gate: asyncio.Event | None = None,
        fail_at: int | None = None,
        fail_when: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__()
        self.delays = tuple(delays)
        self.gate = gate
        self.fail_at = fail_at
        self.fail_when = fail_when
        self.failed_when: bool | None = None
        self.acked: set[bytes | None] = set()
        self.completed = 0
        self._handed = 0

    async def delivery(self) -> Awaitable[object]:
        number = self.flushes
        self.flushes += 1
        keys = [record.key for record in self.records[self._handed :]]
        self._handed = len(self.records)
        return asyncio.ensure_future(self._deliver(number, keys))

    async def _deliver(self, number: int, keys: list[bytes | None]) -> None:
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), TIMEOUT_S)
        await asyncio.sleep(self.delays[number % len(self.delays)])
        if number == self.fail_at:

            async def due() -> bool:
                return self.fail_when()

            self.failed_when = await poll_until(due, TIMEOUT_S, interval_s=0.01)
            raise OSError("delivery failed (test)")
        self.acked.update(keys)
        self.delivered += len(keys)
        self.completed += 1


class Revoke(NamedTuple):
    """Batches handled and committed when a revoke began and when it returned, and the
    outputs delivered by then."""

    handled_before: int
    committed_before: int
    handled_after: int
    committed_after: int
    delivered_after: int


class ProbedConsumer(EventConsumer):
    """An ``EventConsumer`` that checks every commit and records the state at each revoke.

    Before each commit: what it commits (``commits``) and every input below it, handled by
    this consumer, whose output ``sink`` has not acknowledged (``unacknowledged``). A revoke
    that takes partitions sets the ``gate`` (if any) and is recorded (``revokes``). With a
    ``commit_gate``, the first commit request waits for it (a slow group coordinator)."""

    def __init__(
        self,
        recorder: Recorder,
        sink: TimedSink,
        *,
        gate: asyncio.Event | None,
        commit_gate: asyncio.Event | None = None,
        **options: Any,
    ) -> None:
        super().__init__(handle=recorder, sink=sink, **options)
        self.recorder = recorder
        self.timed_sink = sink
        self.gate = gate
        self.commit_gate = commit_gate
        self.commits: list[dict[tuple[str, int], int]] = []
        self.handled_at_commit: list[int] = []
        """Batches handled when each commit request was sent."""
        self.unacknowledged: list[Where] = []
        self.revokes: list[Revoke] = []
        recorder.consumer = self

    async def _commit(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        nexts = {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}
        self.commits.append(nexts)
        self.handled_at_commit.append(len(self.recorder.batches))
        self.unacknowledged += [
            where(record)
            for record in self.recorder.handled()
            if record.offset < nexts.get((record.topic, record.partition), 0)
            and output_key(record) not in self.timed_sink.acked
        ]
        if self.commit_gate is not None and len(self.commits) == 1:
            await asyncio.wait_for(self.commit_gate.wait(), TIMEOUT_S)
        await super()._commit(consumer, offsets)

    async def partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        if not revoked:  # the first join
            await super().partitions_revoked(revoked)
            return
        before = (len(self.recorder.batches), self.batches_committed)
        if self.gate is not None:
            self.gate.set()
        await super().partitions_revoked(revoked)
        after = (len(self.recorder.batches), self.batches_committed, self.timed_sink.delivered)
        self.revokes.append(Revoke(*before, *after))


def next_offsets(batch: Sequence[RawRecord]) -> dict[tuple[str, int], int]:
    nexts: dict[tuple[str, int], int] = {}
    for record in batch:
        key = (record.topic, record.partition)
        nexts[key] = max(nexts.get(key, 0), record.offset + 1)
    return nexts


def covered(batches: Sequence[Sequence[RawRecord]]) -> list[dict[tuple[str, int], int]]:
    """Per batch, the offsets that commit it and every batch before it."""
    offsets: dict[tuple[str, int], int] = {}
    result = []
    for batch in batches:
        offsets = {**offsets, **next_offsets(batch)}
        result.append(offsets)
    return result


def merged(commits: Sequence[dict[tuple[str, int], int]]) -> list[dict[tuple[str, int], int]]:
    """What the group has committed after each commit request."""
    offsets: dict[tuple[str, int], int] = {}
    result = []
    for commit in commits:
        offsets = {**offsets, **commit}
        result.append(offsets)
    return result


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
    async def handle(records: Sequence[RawRecord], lagging: object = ()) -> None:
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


def probed_consumer(
    services: Services,
    isolation: Isolation,
    topics: Topics,
    recorder: Recorder,
    sink: TimedSink,
    *,
    gate: asyncio.Event | None = None,
    commit_gate: asyncio.Event | None = None,
    observer: Assignments | None = None,
    failures: list[BaseException] | None = None,
) -> ProbedConsumer:
    return ProbedConsumer(
        recorder,
        sink,
        gate=gate,
        commit_gate=commit_gate,
        bootstrap=services.kafka_bootstrap,
        group_id=isolation.group_id,
        topics=topics.events,
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
        services, isolation, topics, first, TimedSink(fail_at=0), failures=failures
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
    assert await committed_offsets(services, isolation.group_id) == {}, "nothing committed"

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
    offsets = await committed_offsets(services, isolation.group_id)
    assert sum(offsets.values()) == 300, "every record committed once handled and flushed"
    assert sink.flushes >= consumer.batches_committed


async def test_a_failed_delivery_commits_nothing_of_its_batch_nor_of_the_batch_handled_meanwhile(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    total = 600
    await produce(services, topics, total)
    failures: list[BaseException] = []
    # The second batch's delivery fails, but only once the third batch has been handled.
    sink = TimedSink(fail_at=1, fail_when=lambda: len(recorder.batches) >= 3)
    recorder = Recorder(sink)
    broken = probed_consumer(services, isolation, topics, recorder, sink, failures=failures)
    await broken.start()
    try:

        async def failed() -> bool:
            return bool(failures)

        assert await poll_until(failed, TIMEOUT_S)
    finally:
        await broken.stop()
    assert isinstance(failures[0], OSError)
    assert sink.failed_when, "the failure came after the next batch was handled"
    assert len(recorder.batches) >= 3
    assert broken.commits == [next_offsets(recorder.batches[0])], "only the first batch"
    assert not broken.unacknowledged
    first_done = next_offsets(recorder.batches[0])
    assert await committed_offsets(services, isolation.group_id) == first_done

    again: list[RawRecord] = []
    consumer = make_consumer(services, isolation, topics, again, ListSink())
    await consumer.start()
    try:

        async def drained() -> bool:
            return len(again) >= total - len(recorder.batches[0])

        assert await poll_until(drained, TIMEOUT_S)
    finally:
        await consumer.stop()
    seen = [where(r) for r in again]
    assert len(seen) == len(set(seen)) == total - len(recorder.batches[0])
    assert not {where(r) for r in recorder.batches[0]} & set(seen), "the first batch stays done"
    for batch in recorder.batches[1:3]:
        assert {where(r) for r in batch} <= set(seen), "the failed batch and the next, again"
    assert sum((await committed_offsets(services, isolation.group_id)).values()) == total


async def test_commits_follow_batch_order_and_the_acknowledgements(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    total = 1_500
    await produce(services, topics, total)
    # Deliveries of unequal length: a batch's outputs are often acknowledged after the next's.
    sink = TimedSink(delays=(0.08, 0.0, 0.03, 0.0))
    recorder = Recorder(sink)
    consumer = probed_consumer(services, isolation, topics, recorder, sink)
    await consumer.start()
    try:

        async def drained() -> bool:
            return len(recorder.handled()) >= total

        assert await poll_until(drained, TIMEOUT_S)
    finally:
        await consumer.stop()  # the last batches are delivered and committed first
    assert len(recorder.batches) >= 10
    # Each commit request covers a run of batches in order: the group's offsets after it are
    # those of every batch up to some batch, later with each request, up to the last.
    after_each = merged(consumer.commits)
    prefixes = covered(recorder.batches)
    ends = [prefixes.index(offsets) for offsets in after_each]
    assert ends == sorted(set(ends)), "commits in batch order, never backwards"
    assert ends[-1] == len(recorder.batches) - 1
    assert not consumer.unacknowledged, "never past an output not yet acknowledged"
    assert len(sink.acked) == total
    # One batch ahead: some batch was handled before the batch before it was delivered, but
    # never before the one before that was.
    assert any(done < index for index, done in enumerate(recorder.delivered_before))
    assert all(done >= index - 1 for index, done in enumerate(recorder.delivered_before)), (
        "never more than one batch ahead"
    )
    assert sum((await committed_offsets(services, isolation.group_id)).values()) == total


async def test_a_commit_in_flight_does_not_hold_the_batches_back(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    total = 600
    await produce(services, topics, total)
    commit_gate = asyncio.Event()
    sink = TimedSink()
    recorder = Recorder(sink)
    consumer = probed_consumer(services, isolation, topics, recorder, sink, commit_gate=commit_gate)
    await consumer.start()
    try:

        async def handled_while_committing() -> bool:
            return len(recorder.batches) >= 5

        # The first commit request waits for the gate; the loop goes on meanwhile.
        assert await poll_until(handled_while_committing, TIMEOUT_S)
        assert len(consumer.commits) == 1
        commit_gate.set()

        async def drained() -> bool:
            return len(recorder.handled()) >= total

        assert await poll_until(drained, TIMEOUT_S)
    finally:
        await consumer.stop()
    prefixes = covered(recorder.batches)
    after_each = merged(consumer.commits)
    assert after_each[0] == prefixes[0], "the first commit: the first batch"
    # The next request carries every batch delivered while the first was in flight.
    assert consumer.handled_at_commit[1] >= 5
    assert prefixes.index(after_each[1]) >= 3
    ends = [prefixes.index(offsets) for offsets in after_each]
    assert ends == sorted(set(ends)) and ends[-1] == len(recorder.batches) - 1
    assert len(consumer.commits) < len(recorder.batches), "batches went together"
    assert not consumer.unacknowledged
    assert sum((await committed_offsets(services, isolation.group_id)).values()) == total


async def test_the_next_batch_is_prepared_before_the_current_one_is_handled(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    total = 1_500
    await produce(services, topics, total)
    events: list[tuple[str, Sequence[RawRecord]]] = []

    async def handle(records: Sequence[RawRecord], lagging: object = ()) -> None:
        events.append(("handle", records))

    consumer = EventConsumer(
        bootstrap=services.kafka_bootstrap,
        group_id=isolation.group_id,
        topics=topics.events,
        handle=handle,
        sink=ListSink(),
        batch_max=50,
        batch_within_s=0.05,
        session_timeout_s=SESSION_S,
        on_fatal=_raise,
        prepare=lambda records: events.append(("prepare", records)),
    )
    await consumer.start()
    try:

        async def drained() -> bool:
            return sum(len(r) for kind, r in events if kind == "handle") >= total

        assert await poll_until(drained, TIMEOUT_S)
    finally:
        await consumer.stop()
    handled = [records for kind, records in events if kind == "handle"]
    prepared = [records for kind, records in events if kind == "prepare"]
    assert prepared, "fetches of more than one batch prepare the next"
    for index, (kind, records) in enumerate(events):
        if kind == "prepare":
            # Then the current batch is handled, then the prepared one itself (same object).
            after = [later for later_kind, later in events[index + 1 :] if later_kind == "handle"]
            assert after[1] is records
    assert sorted(where(r) for batch in handled for r in batch) == sorted(
        {where(r) for batch in handled for r in batch}
    ), "every record handled once"
    assert sum(len(batch) for batch in handled) == total


async def test_revoke_waits_for_the_batches_in_flight_to_be_delivered_and_committed(
    services: Services, isolation: Isolation, topics: Topics
) -> None:
    total = 3_000
    await produce(services, topics, total)
    # A's deliveries wait for the revoke: when B joins, A has handled two batches and committed
    # none (the first is being delivered, the second was handled meanwhile).
    gate = asyncio.Event()
    sink_a = TimedSink(delays=(0.05, 0.0), gate=gate)
    recorder_a = Recorder(sink_a, delay_s=0.05)
    observer_a = Assignments()
    a = probed_consumer(
        services, isolation, topics, recorder_a, sink_a, gate=gate, observer=observer_a
    )
    handled_b: list[RawRecord] = []
    b = make_consumer(services, isolation, topics, handled_b, ListSink())
    await a.start()
    try:

        async def a_waits() -> bool:
            return len(recorder_a.batches) >= 2

        assert await poll_until(a_waits, TIMEOUT_S)
        await b.start()
        try:

            async def revoked() -> bool:
                return bool(observer_a.revoked)

            assert await poll_until(revoked, TIMEOUT_S)

            async def drained() -> bool:
                return len(recorder_a.handled()) + len(handled_b) >= total

            assert await poll_until(drained, TIMEOUT_S)
        finally:
            await b.stop()
    finally:
        await a.stop()
    revoke = a.revokes[0]
    assert (revoke.handled_before, revoke.committed_before) == (2, 0), "two batches in flight"
    assert revoke.handled_after == revoke.committed_after == 2, "both committed, no third one"
    assert revoke.delivered_after == sum(len(batch) for batch in recorder_a.batches[:2])
    assert not a.unacknowledged
    keys = [where(r) for r in recorder_a.handled() + handled_b]
    assert len(keys) == len(set(keys)) == total, "nothing handled twice, nothing skipped"
    offsets = await committed_offsets(services, isolation.group_id)
    assert sum(offsets.values()) == total
