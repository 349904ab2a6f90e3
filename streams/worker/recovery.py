"""What a stopped worker may have left undone, recovered from the outbox on every assignment.

A batch's outputs are kept in its outbox entry, written in the same Redis call as its feature
records and ledger effect (``streams/adapters/outbox.py``), and deleted once Kafka committed
the batch. So after a crash anywhere between that call and the commit (before the sends,
between them, mid-commit), the entry is still there and the partitions' committed offsets are
at or below its watermarks. The records in between are read again, but Redis has them
applied: they are redelivered and publish nothing. Their outputs come from the entry instead:

- on every assignment, before any record is fetched, every entry covering one of the assigned
  partitions is looked at: unless Kafka committed past it on every partition it covers, its
  outputs are published again (same ids) and their delivery awaited;
- its granted offers are stored in the state of the users this worker owns, at once, in a
  call fenced by the partitions just claimed: a granted offer joins its user's state with the
  worker's next batch, and the worker that granted it may have stopped (SIGKILL) after Kafka
  committed the batch and before that next one. An offer already stored is recognised by its
  id and skipped;
- then the assigned partitions are released from the entry (``Outbox.release``), which is
  deleted once no partition is left: an entry whose partitions went to several workers is
  recovered by each of them for its own users.

An entry that covers partitions of two workers is published by each: consumers dedup by id
(docs/delivery.md). A worker that crashes before it released an entry leaves it to the
partitions' next owner, which does the same again (nothing twice: ids).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from dealstream_native import default_partition

from engine.pipeline import DiscountEngine
from streams.adapters.outbox import Outbox
from streams.adapters.redis_ledger import ledger_result
from streams.adapters.redis_store import RedisFeatureStore
from streams.worker.batch_worker import BatchWorker

log = logging.getLogger("dealstream.worker")


def _partition(field: str) -> TopicPartition:
    topic, _, partition = field.rpartition(":")
    return TopicPartition(topic, int(partition))


def _behind(committed: int | None, watermark: int) -> bool:
    """Whether Kafka has not committed past the entry's watermark on this partition."""
    return committed is None or committed <= watermark


class RecoverOutbox:
    """The event consumer's assignment hook for the outbox (module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        store: RedisFeatureStore,
        engine: DiscountEngine,
        worker: BatchWorker,
    ) -> None:
        self._outbox = outbox
        self._store = store
        self._engine = engine
        self._worker = worker

    async def __call__(
        self, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
    ) -> None:
        # Claimed now, not when a batch first carries them: a worker that lost them without
        # noticing can no longer write them (its stores of granted offers included).
        await self._store.claim((tp.topic, tp.partition) for tp in partitions)
        assigned = {f"{tp.topic}:{tp.partition}" for tp in partitions}
        touching = {
            entry_id: coverage
            for entry_id, coverage in (await self._outbox.coverage()).items()
            if assigned & coverage.keys()
        }
        if not touching:
            return
        committed: dict[str, int | None] = {}
        for field in sorted({field for coverage in touching.values() for field in coverage}):
            committed[field] = await consumer.committed(_partition(field))
        owned = {tp.partition for tp in partitions}
        # co-partitioned topics: one partition count, and a user's partition in each
        count = max(len(consumer.partitions_for_topic(tp.topic) or ()) for tp in partitions)

        def owns(user_id: str) -> bool:
            return default_partition(user_id.encode(), count) in owned

        engine = self._engine
        published = republished = 0
        for entry in await self._outbox.read(touching):
            result = engine.settled_outputs(
                entry.drafts, ledger_result(entry.outcomes, entry.events, ()), owns=owns
            )
            if any(_behind(committed[field], mark) for field, mark in entry.coverage.items()):
                await self._worker.republish(result)
                published += len(result.offers) + len(result.decisions) + len(result.training)
                republished += 1
        if republished:
            await self._worker.sink.flush()
            log.warning(
                "published %d output(s) of %d batch(es) again from the outbox: Kafka had not "
                "committed them (the worker that handled them stopped first)",
                published,
                republished,
            )
        offers = engine.take_granted_offers()
        stored = await self._store.store_now(
            offers, allowed_lateness_ms=engine.config.allowed_lateness_ms
        )
        log.info(
            "recovered %d outbox entr(ies): %d of %d granted offer(s) stored (the others were)",
            len(touching),
            stored,
            len(offers),
        )
        await self._outbox.release(
            {entry_id: assigned & coverage.keys() for entry_id, coverage in touching.items()}
        )
