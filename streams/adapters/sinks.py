"""The record sinks (``engine.ports.RecordSink``): where output records go, one class per way
of producing to Kafka.

- ``FaustSink``: the live worker's outputs, through the Faust app's own producer (the worker's
  event consumer waits for each batch's ``delivery`` before it commits the batch's offsets);
- ``ProducerSink``: a plain idempotent aiokafka producer (``dealstream simulate``);
- ``BatchSink``: records packed into per-partition batches, for bulk replays
  (``dealstream replay``).

``BatchSink`` exists because a bulk replay is bound by the client's per-record cost
(``AIOKafkaProducer.send`` creates a future and hashes the key for every record). It picks the
partition itself, with the key hash every Kafka client uses by default (murmur2, positive,
modulo the partition count; cached per user) so records land where a shop's producer would put
them, appends records to one open batch per partition and hands full batches to the producer.
Order per partition is the order of ``send`` calls: a partition's batches are queued in order,
and aiokafka sends one request per broker at a time and puts a retried batch back at the front
of its queue. ``flush`` ships the open batches and waits until Kafka has acknowledged every one.

Every sink keeps the delivery futures of the records sent since the last ``delivery`` (or
``flush``) and hands them out as one ``asyncio.gather``: a batch's acknowledgement is its own
records', never those sent after it (the producer's own ``flush`` would wait for every batch
it holds, including the next micro-batch's).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Sequence
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from streams.adapters.kafka_io import default_partition, kafka_client_options
from streams.errors import EXIT_INTERNAL_ERROR, SinkError
from streams.settings import KafkaSecurity

log = logging.getLogger("dealstream.worker")


class FaustSink:
    """Sends through the Faust app's producer without waiting for each record's delivery.

    ``delivery`` (``flush``) waits until every record sent since the last one is acknowledged
    and raises if one could not be delivered; the worker's event consumer
    (``streams/worker/consumer.py``) takes one after every batch and commits the batch's
    offsets only when it completes. A
    delivery that fails for good (after the producer's own retries) also stops the worker at
    once (exit 70) instead of carrying on without that output. Its inputs are read again after
    the restart and skipped as redelivered (their features are already applied); their outputs
    are published again from the batch's outbox entry (docs/delivery.md).
    """

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._pending: list[asyncio.Future[Any]] = []

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        timestamp = timestamp_ms / 1000 if timestamp_ms is not None else None
        pending = await self._app.producer.send(
            topic, key, value, None, timestamp, list(headers) if headers else None
        )
        future = asyncio.ensure_future(pending)
        future.add_done_callback(_stop_on_failed_delivery)
        self._pending.append(future)

    async def flush(self) -> None:
        """Wait until Kafka acknowledged everything sent so far; raise if a record failed."""
        await (await self.delivery())

    async def delivery(self) -> Awaitable[object]:
        pending, self._pending = self._pending, []
        return asyncio.gather(*pending)


def _stop_on_failed_delivery(future: asyncio.Future[Any]) -> None:
    if future.cancelled() or future.exception() is None:
        return
    log.critical("delivery failed for good (%r); stopping the worker", future.exception())
    logging.shutdown()
    os._exit(EXIT_INTERNAL_ERROR)


class ProducerSink:
    """An aiokafka producer as a ``RecordSink``; sends are not awaited one
    by one: ``flush`` waits for every pending delivery."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._pending: list[asyncio.Future[Any]] = []

    @classmethod
    def create(
        cls, bootstrap: str, *, security: KafkaSecurity | None = None, **options: Any
    ) -> ProducerSink:
        options.setdefault("linger_ms", 5)
        options.setdefault("acks", "all")
        options.setdefault("enable_idempotence", True)
        options.update(kafka_client_options(security).kwargs())
        return cls(AIOKafkaProducer(bootstrap_servers=bootstrap, **options))

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self.flush()
        await self._producer.stop()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        future = await self._producer.send(
            topic,
            value=value,
            key=key,
            headers=list(headers) if headers else None,
            timestamp_ms=timestamp_ms,
        )
        self._pending.append(future)
        if len(self._pending) >= 10_000:
            await self.flush()

    async def flush(self) -> None:
        await (await self.delivery())

    async def delivery(self) -> Awaitable[object]:
        pending, self._pending = self._pending, []
        return asyncio.gather(*pending)


BATCH_BYTES = 512 * 1024
"""Largest batch (and request size per partition); well under the broker's 1 MiB default."""


class BatchSink:
    """An idempotent ``acks=all`` producer fed whole batches; see the module docstring."""

    def __init__(
        self, bootstrap: str, *, security: KafkaSecurity | None = None, **options: Any
    ) -> None:
        options.setdefault("acks", "all")
        options.setdefault("enable_idempotence", True)
        options.setdefault("max_batch_size", BATCH_BYTES)
        options.setdefault("max_request_size", 2 * BATCH_BYTES)
        options.update(kafka_client_options(security).kwargs())
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options)
        self._partitions: dict[str, int] = {}
        self._open: dict[tuple[str, int], Any] = {}
        self._pending: list[asyncio.Future[Any]] = []

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self, *, flush: bool = True) -> None:
        """Flush (unless a failure is being handled: then pending records are dropped) and
        close the producer."""
        try:
            if flush:
                await self.flush()
        finally:
            await self._producer.stop()

    async def _count(self, topic: str) -> int:
        partitions = await self._producer.partitions_for(topic)
        self._partitions[topic] = count = len(partitions)
        return count

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        if key is None:
            raise SinkError("replayed records need a key (the user id)")
        count = self._partitions.get(topic) or await self._count(topic)
        where = (topic, default_partition(key, count))
        batch = self._open.get(where)
        if batch is None:
            batch = self._open[where] = self._producer.create_batch()
        record = {"timestamp": timestamp_ms, "key": key, "value": value, "headers": headers or []}
        if batch.append(**record) is None:  # full: ship it, start another
            await self._ship(where)
            batch = self._open[where] = self._producer.create_batch()
            if batch.append(**record) is None:
                raise SinkError(f"a record of {len(value)} bytes does not fit in one batch")

    async def _ship(self, where: tuple[str, int]) -> None:
        batch = self._open.pop(where)
        batch.close()
        topic, partition = where
        self._pending.append(await self._producer.send_batch(batch, topic, partition=partition))

    async def flush(self) -> None:
        """Ship every open batch and wait until Kafka acknowledged all (raises on failure)."""
        await (await self.delivery())

    async def delivery(self) -> Awaitable[object]:
        for where in list(self._open):
            await self._ship(where)
        pending, self._pending = self._pending, []
        return asyncio.gather(*pending)
