"""The worker's batch step, independent of Faust: decode, align, run the engine, emit.

Decoded events go through the event-time aligner (``engine/alignment.py``): the engine runs on
what it releases, so a decision never sees an event a lagging topic had not delivered yet.
Every consumed record ends in exactly one bucket of ``WorkerCounters``:
consumed = applied + redelivered + duplicates + late + forgotten + dead-lettered + held +
handed back.
Outputs published again from the outbox after a crash are counted apart (``republished``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from engine.alignment import EventTimeAligner, SourcePartition
from engine.features.store import UpdateStatus
from engine.pipeline import BatchResult, DiscountEngine, Incoming
from engine.ports import RecordSink
from streams.adapters.batch_commit import STALE_RETRIES, ReplyWait, StateEpochMoved
from streams.adapters.decode import DeadLetter, DecodeLimits, RawRecord, decode_record
from streams.adapters.pseudonyms import Pseudonyms
from streams.operations.logs import DeadLetterLog, log_outputs
from streams.operations.metrics import WorkerMetrics
from streams.settings import Topics
from streams.worker.crash_points import CrashPoints

log = logging.getLogger("dealstream.worker")


@dataclass(slots=True)
class WorkerCounters:
    consumed: int = 0
    applied: int = 0
    redelivered: int = 0
    duplicates: int = 0
    late: int = 0
    forgotten: int = 0
    """Events of users ``dealstream forget`` tombstoned: skipped, the profile not rebuilt."""
    dead_lettered: Counter[str] = field(default_factory=Counter)
    offers: int = 0
    decisions: int = 0
    training: int = 0
    batches: int = 0
    republished: int = 0
    """Offers, decisions and training examples published again from the outbox."""
    held: int = 0
    """Consumed events the aligner holds now, waiting for a lagging topic of their lane."""
    handed_back: int = 0
    """Held events dropped on a revoke: the partitions' next owner reads them again."""
    decoded_ahead: int = 0
    """Consumed records decoded while the batch before them waited for its Redis reply
    (``BatchWorker.decode_ahead``); not an outcome, so not part of ``balanced``."""

    def balanced(self) -> bool:
        """The accounting invariant: nothing consumed went unaccounted for."""
        accounted = (
            self.applied
            + self.redelivered
            + self.duplicates
            + self.late
            + self.forgotten
            + sum(self.dead_lettered.values())
            + self.held
            + self.handed_back
        )
        return accounted == self.consumed

    def as_dict(self) -> dict[str, object]:
        return {
            "consumed": self.consumed,
            "applied": self.applied,
            "redelivered": self.redelivered,
            "duplicates": self.duplicates,
            "late": self.late,
            "forgotten": self.forgotten,
            "dead_lettered": dict(self.dead_lettered),
            "offers": self.offers,
            "decisions": self.decisions,
            "training": self.training,
            "batches": self.batches,
            "republished": self.republished,
            "held": self.held,
            "handed_back": self.handed_back,
            "decoded_ahead": self.decoded_ahead,
        }


@dataclass(slots=True)
class _Admitted:
    """One call's records, decoded and pushed into the aligner, and what it released: kept
    until the engine ran them, so that a retried call runs the same events again."""

    records: Sequence[RawRecord]
    dead: list[DeadLetter]
    released: list[Incoming]


Decoded = Incoming | DeadLetter

DECODE_AHEAD_CHUNK = 32
"""Records decoded ahead between two turns of the event loop: a batch whose Redis reply has
come waits for at most this many decodes (about 0.2 ms) before it goes on."""


@dataclass(slots=True)
class _DecodeJob:
    """The next batch's records, decoded in order by ``task`` into ``decoded`` (a prefix of
    ``records`` once the task is cancelled)."""

    records: Sequence[RawRecord]
    decoded: list[Decoded]
    task: asyncio.Task[None]


_STATUS_FIELD = {
    UpdateStatus.APPLIED: "applied",
    UpdateStatus.REDELIVERED: "redelivered",
    UpdateStatus.DUPLICATE: "duplicates",
    UpdateStatus.LATE: "late",
    UpdateStatus.FORGOTTEN: "forgotten",
}


class BatchWorker:
    """Runs one micro-batch of raw records through the engine and sends what comes out.

    ``metrics`` (built by the composition root) receives every batch's counts; without one the
    worker keeps a private ``WorkerMetrics`` nobody scrapes. ``aligner`` holds decoded events
    until their lane's low watermark passes them (by default one over ``topics.events``; the
    event consumer reads its held offsets and counts); ``batch_max`` caps what one call releases
    to the engine (None: no cap).
    """

    def __init__(
        self,
        engine: DiscountEngine,
        sink: RecordSink,
        *,
        topics: Topics,
        limits: DecodeLimits,
        wall_clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        metrics: WorkerMetrics | None = None,
        crash_points: CrashPoints | None = None,
        aligner: EventTimeAligner | None = None,
        batch_max: int | None = None,
        pseudonyms: Pseudonyms | None = None,
        reply_wait: ReplyWait | None = None,
    ) -> None:
        self.engine = engine
        self.pseudonyms = pseudonyms if pseudonyms is not None else Pseudonyms.raw()
        """Decisions go to Kafka under the user's pseudonym (offers keep the raw id)."""
        self.sink = sink
        self.topics = topics
        self.limits = limits
        self.counters = WorkerCounters()
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self._wall_clock_ms = wall_clock_ms
        self._dead_letter_log = DeadLetterLog(log)
        self._crash_points = crash_points if crash_points is not None else CrashPoints()
        self.aligner = aligner if aligner is not None else EventTimeAligner(topics.events)
        self.batch_max = batch_max
        self._admitted: _Admitted | None = None
        self._decode_jobs: list[_DecodeJob] = []
        """At most two: the batch about to be handled, and the one after it."""
        self._reply_wait = reply_wait
        """When decoding ahead may run: while the batch's Redis call waits (None: whenever the
        event loop gets to it)."""

    async def handle(
        self, records: Sequence[RawRecord], lagging: Collection[SourcePartition] = ()
    ) -> BatchResult:
        """Decode ``records``, push them into the aligner and run the engine on what it
        releases (at most ``batch_max``; the consumer calls again while more is ready).

        ``lagging``: the (topic, partition)s the consumer knows have records it has not fetched
        yet (their lanes wait for them); every other one counts as caught up. A call that
        raised, made again with the same ``records`` object (``retry_on_redis``), runs the same
        released events again instead of pushing the records twice.
        """
        now_ms = self._wall_clock_ms()
        admitted = self._admitted
        if admitted is None or admitted.records is not records:
            admitted = self._admitted = self._admit(records, lagging, now_ms)
        incoming, dead = admitted.released, admitted.dead
        if not incoming and not dead:  # all held (or nothing new): no engine call
            self._admitted = None
            empty = BatchResult(statuses=[])
            self._count(admitted, empty)
            if records:
                self.metrics.record_batch(
                    records,
                    empty,
                    (),
                    type_of=self.topics.event_type_of,
                    now_ms=now_ms,
                    spend_cents={},
                )
            return empty
        for attempt in range(1, STALE_RETRIES + 1):
            try:
                result = await self.engine.process(incoming, wall_clock_ms=now_ms)
                break
            except StateEpochMoved:
                # `dealstream forget` ran meanwhile: nothing was written, and the batch runs
                # again on records read afresh.
                if attempt == STALE_RETRIES:
                    raise
        self._admitted = None
        self._crash_points.reached("after_batch_call")
        await self._emit(result, dead)
        self._crash_points.reached("after_send")
        if dead:
            self._dead_letter_log.log(dead, now_ms / 1000)
        log_outputs(log, result.offers, result.decisions)
        self._count(admitted, result)
        self.counters.batches += 1
        self.metrics.record_batch(
            records,
            result,
            dead,
            type_of=self.topics.event_type_of,
            now_ms=self._wall_clock_ms(),
            spend_cents=result.spend_cents,
        )
        return result

    def on_assigned(self, partitions: Iterable[SourcePartition]) -> None:
        """Nothing to do: a new assignment's records arrive by the consumer."""

    def on_revoked(self, partitions: Iterable[SourcePartition]) -> None:
        """Drop the held events of the revoked partitions: they are beyond the committed
        offsets, so their next owner (maybe this worker) reads them again. Records being
        decoded ahead were fetched under the old assignment: the consumer drops them too."""
        counters = self.counters
        counters.handed_back += self.aligner.drop(partitions)
        counters.held = self.aligner.held()
        self._drop_decode_jobs(self._decode_jobs)

    def decode_ahead(self, records: Sequence[RawRecord]) -> None:
        """Start decoding the batch after the one about to be handled.

        Decoding depends on nothing the batch before changes, so it runs while that batch's
        Redis call waits for the reply (``reply_wait``) instead of adding to the next batch's
        time. ``handle`` uses the results only for this very ``records`` object and decodes
        whatever the task has not reached yet; the task yields to the event loop every
        ``DECODE_AHEAD_CHUNK`` records.
        """
        jobs = self._decode_jobs
        self._drop_decode_jobs(jobs[:-1])  # a job nobody handled (the loop moved on)
        decoded: list[Decoded] = []
        task = asyncio.get_running_loop().create_task(
            self._decode_into(records, decoded), name="dealstream-decode-ahead"
        )
        jobs.append(_DecodeJob(records, decoded, task))

    async def _decode_into(self, records: Sequence[RawRecord], decoded: list[Decoded]) -> None:
        topics, limits, append = self.topics, self.limits, decoded.append
        reply_wait = self._reply_wait
        for start in range(0, len(records), DECODE_AHEAD_CHUNK):
            if start:
                await asyncio.sleep(0)  # the batch goes on as soon as its reply has come
            if reply_wait is not None:
                await reply_wait.opened()  # at once while a call waits
            now_ms = self._wall_clock_ms()
            for record in records[start : start + DECODE_AHEAD_CHUNK]:
                append(decode_record(record, topics=topics, limits=limits, now_ms=now_ms))

    def _decoded_ahead(self, records: Sequence[RawRecord]) -> list[Decoded]:
        """What was decoded ahead of ``records`` (a prefix of them, maybe empty); the jobs of
        ``records`` and of anything before them end here."""
        jobs = self._decode_jobs
        for index, job in enumerate(jobs):
            if job.records is records:
                self._drop_decode_jobs(jobs[: index + 1])
                return job.decoded
        return []

    def _drop_decode_jobs(self, jobs: Sequence[_DecodeJob]) -> None:
        for job in list(jobs):
            job.task.cancel()  # a done task ignores it; a running one stops between chunks
            self._decode_jobs.remove(job)

    def _admit(
        self, records: Sequence[RawRecord], lagging: Collection[SourcePartition], now_ms: int
    ) -> _Admitted:
        incoming: list[Incoming] = []
        dead: list[DeadLetter] = []
        ahead = self._decoded_ahead(records)
        self.counters.decoded_ahead += len(ahead)
        for index, record in enumerate(records):
            decoded = (
                ahead[index]
                if index < len(ahead)
                else decode_record(record, topics=self.topics, limits=self.limits, now_ms=now_ms)
            )
            if isinstance(decoded, DeadLetter):
                dead.append(decoded)
            else:
                incoming.append(decoded)
        self.aligner.push(incoming, lagging=lagging)
        return _Admitted(records, dead, self.aligner.release(self.batch_max))

    def _count(self, admitted: _Admitted, result: BatchResult) -> None:
        counters = self.counters
        counters.consumed += len(admitted.records)
        for status in result.statuses:
            name = _STATUS_FIELD[status]
            setattr(counters, name, getattr(counters, name) + 1)
        for letter in admitted.dead:
            counters.dead_lettered[letter.code] += 1
        counters.offers += len(result.offers)
        counters.decisions += len(result.decisions)
        counters.training += len(result.training)
        counters.held = self.aligner.held()

    async def republish(self, result: BatchResult) -> None:
        """Send the outputs of a batch settled before a crash (its outbox entry) again."""
        await self._emit(result, ())
        self.counters.republished += len(result.offers) + len(result.decisions)
        self.counters.republished += len(result.training)

    async def _emit(self, result: BatchResult, dead: Sequence[DeadLetter]) -> None:
        topics = self.topics
        for letter in dead:
            message = letter.message(self.limits.max_dead_letter_bytes)
            await self.sink.send(topics.dlq, message.key, message.value, message.headers)
        for offer in result.offers:
            await self.sink.send(
                topics.offers, offer.user_id.encode(), orjson.dumps(offer.to_message())
            )
        pseudonym = self.pseudonyms.of
        for decision in result.decisions:
            user = pseudonym(decision.user_id)
            published = decision.to_message()
            published["user_id"] = user
            await self.sink.send(topics.decisions, user.encode(), orjson.dumps(published))
        for example in result.training:
            await self.sink.send(
                topics.training, example.decision_id.encode(), orjson.dumps(example.to_message())
            )
