"""The worker's consumption of the event topics: aiokafka batches, committed after delivery.

``EventConsumer`` is a mode ``Service`` the Faust app starts with its other services (Faust
itself consumes nothing: ``streams/worker/faust_app.py``). One loop, one batch ahead:

1. ``getmany(timeout_ms=batch_within_s)`` over the three event topics, cut into pieces of up
   to ``batch_max`` records (``in_time_order``: by Kafka timestamp, so the topics are handed
   over together), with the partitions that lag (below);
2. batch k+1 goes to the handler (``BatchWorker.handle`` with its retry/exit policy) while
   batch k's outputs are acknowledged (step 4, in a task); the handler's aligner releases at
   most ``batch_max`` events per call, and the loop calls again with no records while it has
   more ready. When the fetch holds a batch k+2, ``prepare`` is told of it first
   (``BatchWorker.decode_ahead`` decodes it while batch k+1 waits for its Redis reply), and
   that same list is handed over next;
3. ``sink.delivery()`` hands over batch k+1's outputs: what it returns completes once Kafka
   acknowledged every one of them (or raises), whatever is sent after;
4. the loop waits until batch k is delivered (and stops the worker if batch k's delivery
   failed: nothing later is committed either), then starts batch k+1's task: wait for its
   delivery, then hand the next offset of each partition in the batch to the committer;
5. the committer commits, one request at a time, every offset handed to it since its last
   request, to the group ``settings.group_id`` (the one ``dealstream lag``, the metrics and the
   alerts read). A commit takes the broker's coordinator at least its append linger (5 ms by
   default in Kafka 4.1): waiting for it in the loop made that the shortest batch cycle,
   and the floor of every offer's latency at low rates.

Event-time alignment (``engine/alignment.py``, docs/delivery.md): the handler holds each
decoded event until no *lagging* partition of its lane (partition n of every topic) can still
deliver an earlier one. After each fetch the consumer says which assigned partitions lag: the
fetch position is below the last fetch response's high watermark (no response yet: unknown,
counted as caught up so that nothing stalls), or records fetched are not handed over yet. A
partition is committed only up to its first held event (``HeldEvents.first_held``), and paused
while it holds more than ``hold_max`` events (4 batches), resumed at half; a loop that fetched
nothing still calls the handler while events are held (a partition may have caught up).

Commits are therefore in batch order, and each only after its batch's outputs, and every
earlier batch's, were acknowledged. A kill at any point leaves the committed offsets at or
behind what was applied and delivered: the records in between (the batch being handled, the
one being delivered, and those delivered during the commit request in flight) are read again
and recognised as redelivered.

Why one batch ahead and no more: batch k+1 cannot commit before batch k anyway, and one ahead
already hides the whole wait for acknowledgements (about 1 ms at low rates) whenever handling
a batch takes longer. A deeper pipeline would give the one thread no more CPU to use, but
would widen what a kill replays and loses (docs/delivery.md) and what a rebalance waits for.
Commits are the exception: they only move offsets forward, so the committer coalesces them
instead of holding batches back.

Assignment is co-partitioned: every worker subscribes to the same three topics, all created
with ``settings.partitions`` partitions, and ``RangePartitionAssignor`` lays out each topic's
partitions over the members sorted by id, the same way for every topic, so partition n of
browse, search and purchase always lands on the same worker (a user's events, keyed by user
id, meet on one worker). aiokafka's default (round robin over all partitions together) would
not guarantee that. ``tests/integration/test_event_consumer.py`` checks it with two members.

On a rebalance, ``on_partitions_revoked``, in this order: waits for the batch being handled
(the ``_in_flight`` lock), then for it and every batch before it to be delivered and committed
(nothing else is uncommitted but held events and fetched records not yet handled: both are
dropped and read again by the partitions' next owner); runs ``on_revoking`` while the
partitions are still its own (the worker stores the offers its last batch granted, which would
otherwise join their users' state with its next batch, written to partitions it no longer
owns); stops handling until the next assignment; tells the observer (the feature store, which
drops the records it held, the batch worker, which drops the events its aligner held, and the
status page). ``stop`` runs ``on_revoking`` too.
``on_partitions_assigned`` holds the same lock while it runs ``on_assigned`` (the worker's
rewinds the partitions Redis is behind on, or stops it: ``streams/worker/resume.py``; then
recovers what the outbox holds: ``streams/worker/recovery.py``), so no batch
is handled before it; then it gives the observer the new full assignment. Records the fetcher
returned under an earlier assignment are dropped (``_generation``); a dropped record of a
partition this worker owns is read again (the fetch position is put back, never forward).
``stop`` finishes the same way and leaves the group.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import operator
import os
from collections import Counter
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from mode import Service

from engine.ports import RecordSink
from streams.adapters.decode import RawRecord
from streams.errors import EXIT_INTERNAL_ERROR
from streams.worker.crash_points import CrashPoints

log = logging.getLogger("dealstream.worker")

TopicPartitionKey = tuple[str, int]
BatchHandler = Callable[[Sequence[RawRecord], Collection[TopicPartitionKey]], Awaitable[object]]
"""Handles records; the second argument names the partitions known to have records not yet
handed over (``BatchWorker.handle``: its aligner holds back what they may precede)."""
FatalHandler = Callable[[BaseException], None]
AssignedHook = Callable[[AIOKafkaConsumer, Sequence[TopicPartition]], Awaitable[None]]
"""Runs on every assignment before any record of it is fetched; may seek (``ResumeFromRedis``)
and publish (``RecoverOutbox``)."""
RevokingHook = Callable[[], Awaitable[None]]
"""Runs when the worker gives its partitions up (a revoke, a stop), after its last batch is
delivered and committed and while it still owns them (``store_granted_offers``)."""
CommittedHook = Callable[[Mapping[TopicPartitionKey, int]], None]
"""Told of every successful commit: the next offset to read per partition (``Outbox``)."""
PrepareHook = Callable[[Sequence[RawRecord]], None]
"""Told of the next batch's records just before the current batch is handled; that very
object is handed to ``handle`` next unless the assignment changed
(``BatchWorker.decode_ahead``)."""


class HeldEvents(Protocol):
    """What the handler holds back (``engine.alignment.EventTimeAligner``): the consumer commits
    no further than it, pauses partitions that hold too much, and calls again while more is
    ready."""

    def first_held(self) -> dict[TopicPartitionKey, int]: ...

    def held_per_partition(self) -> dict[TopicPartitionKey, int]: ...

    def ready(self) -> int: ...


class AssignmentObserver(Protocol):
    """Who follows the assignment (``WorkerStatus``)."""

    def on_assigned(self, partitions: Iterable[TopicPartitionKey]) -> None: ...

    def on_revoked(self, partitions: Iterable[TopicPartitionKey]) -> None: ...


def raw_record(record: Any, partitions: int | None = None) -> RawRecord:
    """An aiokafka ``ConsumerRecord`` as the worker's ``RawRecord``; ``partitions``: how many
    partitions its topic has (``decode_record`` checks the record is on its key's partition)."""
    timestamp = record.timestamp
    headers = record.headers  # most records have none: no generator for them
    # Positional: built for every record, and a named tuple's keywords cost more.
    return RawRecord(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        timestamp if timestamp is not None and timestamp > 0 else None,
        tuple((str(k), bytes(v or b"")) for k, v in headers) if headers else (),
        partitions,
    )


def _raw(consumer: AIOKafkaConsumer, batch: Iterable[Any]) -> list[RawRecord]:
    """A batch of fetched records as ``RawRecord``s (each with its topic's partition count)."""
    counts: dict[str, int | None] = {}
    records: list[RawRecord] = []
    for record in batch:
        topic = record.topic
        if topic not in counts:
            counts[topic] = len(consumer.partitions_for_topic(topic) or ()) or None
        records.append(raw_record(record, counts[topic]))
    return records


_partition_of = operator.attrgetter("topic", "partition")
"""A fetched record's (topic, partition)."""


def exit_worker(exc: BaseException) -> None:
    """The default on a failure the loop cannot handle (a delivery that failed, a broken client):
    exit non-zero at once so that the supervisor restarts the worker; nothing of the failed
    batch is committed, so it is read again."""
    log.critical("event consumer failed; stopping the worker", exc_info=exc)
    logging.shutdown()
    os._exit(EXIT_INTERNAL_ERROR)


def in_time_order(
    fetched: Mapping[TopicPartition, Sequence[Any]], topics: Sequence[str], batch_max: int
) -> Iterator[list[Any]]:
    """The fetched records merged by Kafka timestamp into batches of ``batch_max``: the order
    they are handed over in.

    Event-time order is the aligner's job (``engine/alignment.py``); handing the topics over
    together, by when they were produced, keeps what it must hold small. Each partition keeps
    its own order (``heapq.merge`` never reorders an input); on equal timestamps the topics
    come in the order given (browse, search, purchase).

    >>> from types import SimpleNamespace as R
    >>> views = [R(topic="b", timestamp=t, offset=t) for t in (1, 3, 5)]
    >>> buys = [R(topic="p", timestamp=t, offset=t) for t in (3, 4)]
    >>> fetched = {TopicPartition("p", 0): buys, TopicPartition("b", 0): views}
    >>> [[(r.topic, r.timestamp) for r in b] for b in in_time_order(fetched, ("b", "p"), 3)]
    [[('b', 1), ('b', 3), ('p', 3)], [('p', 4), ('b', 5)]]
    """
    rank = {topic: index for index, topic in enumerate(topics)}
    ordered = sorted(fetched.items(), key=lambda item: (rank.get(item[0].topic, 0), item[0]))
    merged = heapq.merge(*(records for _, records in ordered), key=_timestamp)
    while batch := list(itertools.islice(merged, batch_max)):
        yield batch


def _timestamp(record: Any) -> int:
    return int(record.timestamp or 0)


HOLD_BATCHES = 4
"""A partition whose held events exceed this many batches is paused (``hold_max``)."""


class EventConsumer(Service):
    """Consumes ``topics`` in batches for ``handle``; see the module docstring."""

    def __init__(
        self,
        *,
        bootstrap: str,
        group_id: str,
        topics: Sequence[str],
        handle: BatchHandler,
        sink: RecordSink,
        batch_max: int,
        batch_within_s: float,
        session_timeout_s: float = 10.0,
        observer: AssignmentObserver | None = None,
        client_options: dict[str, Any] | None = None,
        on_fatal: FatalHandler = exit_worker,
        on_assigned: AssignedHook | None = None,
        on_revoking: RevokingHook | None = None,
        on_committed: CommittedHook | None = None,
        crash_points: CrashPoints | None = None,
        held: HeldEvents | None = None,
        hold_max: int | None = None,
        prepare: PrepareHook | None = None,
    ) -> None:
        super().__init__()
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topics = tuple(topics)
        self.handle = handle
        self.sink = sink
        self.batch_max = batch_max
        self.batch_timeout_ms = max(1, int(batch_within_s * 1000))
        self.session_timeout_s = session_timeout_s
        self.observer = observer
        self.client_options = dict(client_options or {})
        self.on_fatal = on_fatal
        self.on_assigned = on_assigned
        self.on_revoking = on_revoking
        self.on_committed = on_committed
        self.prepare = prepare
        self._crash_points = crash_points if crash_points is not None else CrashPoints()
        self.batches_committed = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._in_flight = asyncio.Lock()
        """Held while a batch is handled (steps 2 to 4): a revoke waits for it."""
        self._finishing: asyncio.Task[None] | None = None
        """The last handled batch's delivery (step 4), awaited while the next batch is handled;
        kept after a failure until the loop raises it."""
        self._to_commit: dict[TopicPartition, OffsetAndMetadata] = {}
        """Offsets of delivered batches not yet sent to Kafka (the committer takes them all)."""
        self._committing: asyncio.Task[None] | None = None
        """The committer: commits ``_to_commit`` until it is empty, one request at a time."""
        self._stopping = False
        self._rebalancing = False
        """Between a revoke and the next assignment: records fetched now are not handled (the
        partitions' next owner reads them from the committed offsets)."""
        self._loop_task: asyncio.Task[None] | None = None
        self._generation = 0
        """Counts assignments: records fetched under an earlier one are not handled."""
        self.held = held
        self.hold_max = hold_max if hold_max is not None else HOLD_BATCHES * batch_max
        """A partition holding more than this is paused until it holds half as much."""
        self._paused: set[TopicPartition] = set()
        self._handed_to: dict[TopicPartition, int] = {}
        """Per partition, the offset after the last record handed to ``handle``."""
        self._commit_to: dict[TopicPartition, int] = {}
        """Per partition, the offset last sent to commit (or the first one handed over)."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def on_start(self) -> None:
        session_ms = int(self.session_timeout_s * 1000)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            **self.client_options,
        )
        await self._consumer.start()
        self._consumer.subscribe(list(self.topics), listener=_Listener(self))
        self._loop_task = asyncio.create_task(self._run(), name="dealstream-event-consumer")

    async def on_stop(self) -> None:
        """Finish the batches in flight (handled, delivered, committed), then leave the group."""
        self._stopping = True
        if self._loop_task is not None:
            await self._loop_task
        await self._settled()  # after a failure the loop left a commit running
        await self._revoking()  # aiokafka's stop calls no revoke listener
        if self._consumer is not None:
            await self._consumer.stop()  # leaves the group
            self._consumer = None

    def assignment(self) -> frozenset[TopicPartitionKey]:
        if self._consumer is None:
            return frozenset()
        return frozenset((tp.topic, tp.partition) for tp in self._consumer.assignment())

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stopping:
                if self._finishing is not None and self._finishing.done():
                    await self._delivered()  # an idle loop learns of a failed delivery too
                # Everything the fetcher holds (bounded by the fetch sizes): a max_records limit
                # would fill the batch from the first partitions alone.
                fetched = await consumer.getmany(timeout_ms=self.batch_timeout_ms)
                generation = self._generation
                batches = list(in_time_order(fetched, self.topics, self.batch_max))
                if not batches and self.held is not None and self.held.held_per_partition():
                    batches = [[]]  # nothing fetched: what became releasable still goes
                lagging = await self._lagging(consumer) if batches else frozenset()
                # Records fetched but not handed over yet: their partitions lag too.
                unhanded = Counter(map(_partition_of, itertools.chain.from_iterable(batches)))
                upcoming: list[RawRecord] | None = None
                for index, batch in enumerate(batches):
                    async with self._in_flight:
                        if self._stopping:
                            break  # the rest is read again from the committed offsets
                        if self._rebalancing or generation != self._generation:
                            # Fetched before or during a rebalance: read again by whoever
                            # owns the partitions now (this worker too).
                            await self._unread(consumer, itertools.chain(*batches[index:]))
                            break
                        unhanded.subtract(map(_partition_of, batch))
                        behind = lagging | {key for key, n in unhanded.items() if n > 0}
                        records = upcoming if upcoming is not None else _raw(consumer, batch)
                        upcoming = None
                        if self.prepare is not None and index + 1 < len(batches):
                            upcoming = _raw(consumer, batches[index + 1])
                            self.prepare(upcoming)
                        await self._process(consumer, records, behind)
                        while self.held is not None and self.held.ready() and not self._stopping:
                            await self._process(consumer, [], behind)
                        self._pause_or_resume(consumer)
            await self._finished()
        except Exception as exc:
            self.on_fatal(exc)

    async def _process(
        self,
        consumer: AIOKafkaConsumer,
        batch: list[RawRecord],
        lagging: Collection[TopicPartitionKey] = frozenset(),
    ) -> None:
        # A rebalance may have revoked partitions between the fetch and now: their records
        # belong to whoever owns them next.
        assigned = consumer.assignment()
        owned = {(tp.topic, tp.partition): tp for tp in assigned}
        kept: list[RawRecord] = []
        commit_to, handed_to = self._commit_to, self._handed_to
        for record in batch:
            tp = owned.get(record[:2])  # (topic, partition)
            if tp is None:
                continue
            kept.append(record)
            commit_to.setdefault(tp, record.offset)
            handed_to[tp] = record.offset + 1
        # The batch object itself when nothing was left out: what ``prepare`` was told of.
        records = batch if len(kept) == len(batch) else kept
        if not records and self.held is None:
            return
        await self.handle(records, lagging)
        offsets = self._commit_points(assigned)
        if not offsets:
            return  # all held: outputs sent meanwhile (dead letters) go with the next delivery
        delivered = await self.sink.delivery()
        await self._delivered()  # the batch before: delivered, or its failure raised here
        self._finishing = asyncio.create_task(
            self._finish(consumer, delivered, offsets), name="dealstream-event-delivery"
        )

    def _commit_points(
        self, assigned: Collection[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """The partitions whose commit can move: to the first event held, or past the last
        record handed over when none is held (a held event must be read again after a crash)."""
        first_held = self.held.first_held() if self.held is not None else {}
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp, end in self._handed_to.items():
            point = min(end, first_held.get((tp.topic, tp.partition), end))
            if tp in assigned and point > self._commit_to.get(tp, point):
                offsets[tp] = OffsetAndMetadata(point, "")
                self._commit_to[tp] = point
        return offsets

    async def _lagging(self, consumer: AIOKafkaConsumer) -> frozenset[TopicPartitionKey]:
        """The assigned partitions known to have records past the fetch position (the last
        fetch response's high watermark). Unknown (no fetch response yet) counts as caught up:
        a quiet or slow-to-answer partition must never stall the others."""
        if self.held is None:
            return frozenset()
        behind: set[TopicPartitionKey] = set()
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await consumer.position(tp)
            except IllegalStateError:  # revoked meanwhile
                continue
            if position < highwater:
                behind.add((tp.topic, tp.partition))
        return frozenset(behind)

    def _pause_or_resume(self, consumer: AIOKafkaConsumer) -> None:
        """Backpressure: stop fetching a partition while it holds more than ``hold_max``
        events (a replay of history must not fill memory); fetch again at half of it."""
        if self.held is None:
            return
        held = self.held.held_per_partition()
        assigned = consumer.assignment()
        for key, count in held.items():
            tp = TopicPartition(*key)
            if count > self.hold_max and tp not in self._paused and tp in assigned:
                consumer.pause(tp)
                self._paused.add(tp)
        for tp in list(self._paused):
            if held.get((tp.topic, tp.partition), 0) <= self.hold_max // 2:
                if tp in assigned:
                    consumer.resume(tp)
                self._paused.discard(tp)

    async def _unread(self, consumer: AIOKafkaConsumer, records: Iterable[Any]) -> None:
        """Put the fetcher of each assigned partition back to the first of ``records`` it has
        moved past: records fetched while the assignment changed are dropped, and those of a
        partition this worker (still or now) owns must be read again. Only ever backwards: a
        record read twice is recognised as redelivered, one skipped would be lost."""
        first: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            if record.offset < first.get(tp, record.offset + 1):
                first[tp] = record.offset
        assigned = consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned and offset < await consumer.position(tp):
                consumer.seek(tp, offset)

    async def _finish(
        self,
        consumer: AIOKafkaConsumer,
        delivered: Awaitable[object],
        offsets: dict[TopicPartition, OffsetAndMetadata],
    ) -> None:
        await delivered  # raises if an output could not be delivered: no commit
        self._crash_points.reached("after_delivery")
        self._commit_soon(consumer, offsets)

    def _commit_soon(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        """Hand a delivered batch's offsets to the committer (started if idle).

        Batches are delivered in order, and a later batch's commit point of a partition is
        never below an earlier one's, so the offsets taken together in one request cover
        every batch delivered before it: one request in flight at a time, never behind."""
        self._to_commit.update(offsets)
        committing = self._committing
        if committing is not None and committing.done():
            committing.result()  # a failed committer: raised by the loop, which stops
            committing = None
        if committing is None:
            self._committing = asyncio.create_task(
                self._commit_delivered(consumer), name="dealstream-event-commit"
            )

    async def _commit_delivered(self, consumer: AIOKafkaConsumer) -> None:
        while self._to_commit:
            offsets, self._to_commit = self._to_commit, {}
            await self._commit(consumer, offsets)

    async def _delivered(self) -> None:
        """Wait until the last handled batch is delivered; raise its failure, or the
        committer's."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            await finishing
        if self._committing is not None and self._committing.done():
            committing, self._committing = self._committing, None
            committing.result()

    async def _finished(self) -> None:
        """Wait until every handled batch is delivered and committed; raise a failure."""
        await self._delivered()
        committing, self._committing = self._committing, None
        if committing is not None:
            await committing

    async def _settled(self) -> None:
        """``_finished`` for the rebalance callback: waits the same, but leaves a failure for
        the loop to raise (it stops the worker; no later batch commits before it)."""
        if self._finishing is not None:
            await asyncio.wait((self._finishing,))
        if self._committing is not None:
            await asyncio.wait((self._committing,))

    async def _commit(
        self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, OffsetAndMetadata]
    ) -> None:
        assigned = consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not mine:
            return
        try:
            await consumer.commit(mine)
        except (CommitFailedError, KafkaError) as exc:
            # The group moved on (this member was too slow or lost its session): the new
            # owner reads these records again and finds them redelivered.
            log.warning("offset commit failed (%s); records will be redelivered", exc)
            return
        self.batches_committed += 1
        self._crash_points.reached("after_commit")
        if self.on_committed is not None:
            self.on_committed({(tp.topic, tp.partition): meta.offset for tp, meta in mine.items()})

    # -- rebalances ----------------------------------------------------------------------------

    async def partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._in_flight:  # 1. the batch being handled is handled
            await self._settled()  # 2. it and every batch before delivered and committed
            await self._revoking()  # 3. while the partitions are still this worker's
            self._rebalancing = True  # 4. nothing more handled until the next assignment
            # Held events are beyond the committed offsets: read again from there.
            for tp in revoked:
                self._handed_to.pop(tp, None)
                self._commit_to.pop(tp, None)
                self._paused.discard(tp)
        keys = [(tp.topic, tp.partition) for tp in revoked]
        if self.observer is not None:
            self.observer.on_revoked(keys)

    async def _revoking(self) -> None:
        if self.on_revoking is None:
            return
        try:
            await self.on_revoking()
        except Exception as exc:  # aiokafka would log it and carry on
            self.on_fatal(exc)

    async def partitions_assigning(self, assigned: Sequence[TopicPartition]) -> None:
        """The assignment's hook (``on_assigned``) runs before any batch is handled: a batch
        fetched meanwhile waits for it (``_in_flight``), and one fetched before it is dropped
        and read again (``_generation``)."""
        async with self._in_flight:
            self._generation += 1
            if self.on_assigned is not None and self._consumer is not None:
                try:
                    await self.on_assigned(self._consumer, assigned)
                except Exception as exc:  # aiokafka would log it and carry on
                    self.on_fatal(exc)
                    return
            self.partitions_assigned(assigned)

    def partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._rebalancing = False
        keys = [(tp.topic, tp.partition) for tp in assigned]
        log.info("assigned %d event partition(s)", len(keys))
        if self.observer is not None:
            self.observer.on_assigned(keys)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: EventConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._consumer.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._consumer.partitions_assigning(list(assigned))
