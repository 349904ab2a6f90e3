"""Outputs a crash may have lost, published again from the outbox on every assignment.

A batch's outputs are kept in its outbox entry, written in the same Redis call as its feature
records and ledger effect (``streams/adapters/outbox.py``), and deleted once Kafka committed
the batch. So after a crash anywhere between that call and the commit (before the sends,
between them, mid-commit), the entry is still there and the partitions' committed offsets are
at or below its watermarks. The records in between are read again, but Redis has them
applied: they are redelivered and publish nothing. Their outputs come from the entry instead:

- on every assignment, before any record is fetched, every entry covering one of the assigned
  partitions is looked at: if Kafka committed past it on every partition it covers, it is
  deleted; otherwise its outputs are published again (same ids), their delivery awaited, and
  the entry deleted;
- a granted offer joins its user's state with the next batch if this worker owns the user
  (an offer that already did is recognised by its id and skipped).

An entry that covers partitions of two workers is published by whichever looks first, and
may be published by both: consumers dedup by id (docs/delivery.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.pipeline import DiscountEngine
from streams.adapters.kafka_io import default_partition
from streams.adapters.outbox import Outbox
from streams.adapters.redis_ledger import ledger_result
from streams.worker.batch_worker import BatchWorker

log = logging.getLogger("dealstream.worker")


def _partition(field: str) -> TopicPartition:
    topic, _, partition = field.rpartition(":")
    return TopicPartition(topic, int(partition))


def _behind(committed: int | None, watermark: int) -> bool:
    """Whether Kafka has not committed past the entry's watermark on this partition."""
    return committed is None or committed <= watermark


class RepublishOutbox:
    """The event consumer's assignment hook for the outbox (module docstring)."""

    def __init__(self, outbox: Outbox, engine: DiscountEngine, worker: BatchWorker) -> None:
        self._outbox = outbox
        self._engine = engine
        self._worker = worker

    async def __call__(
        self, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
    ) -> None:
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
        done: list[str] = []
        due: dict[str, dict[str, int]] = {}
        for entry_id, coverage in touching.items():
            if any(_behind(committed[field], mark) for field, mark in coverage.items()):
                due[entry_id] = coverage
            else:
                done.append(entry_id)
        entries = await self._outbox.read(due)
        if entries:
            owned = {tp.partition for tp in partitions}
            # co-partitioned topics: one partition count, and a user's partition in each
            count = max(len(consumer.partitions_for_topic(tp.topic) or ()) for tp in partitions)

            def owns(user_id: str) -> bool:
                return default_partition(user_id.encode(), count) in owned

            published = 0
            for entry in entries:
                result = self._engine.settled_outputs(
                    entry.drafts, ledger_result(entry.outcomes, entry.events, ()), owns=owns
                )
                await self._worker.republish(result)
                published += len(result.offers) + len(result.decisions) + len(result.training)
            await self._worker.sink.flush()
            log.warning(
                "published %d output(s) of %d batch(es) again from the outbox: Kafka had not "
                "committed them (the worker that handled them stopped first)",
                published,
                len(entries),
            )
        await self._outbox.delete(done + [entry.entry_id for entry in entries])
