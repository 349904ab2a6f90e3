"""The producer side of ``dealstream replay``: records packed into per-partition batches.

A bulk replay is bound by the client's per-record cost (``AIOKafkaProducer.send`` creates a
future and hashes the key for every record). This sink picks the partition itself, with the
key hash every Kafka client uses by default (murmur2, positive, modulo the partition count;
cached per user) so records land where a shop's producer would put them, appends records to
one open batch per partition and hands full batches to the producer. Order per partition is
the order of ``send`` calls: a partition's batches are queued in order, and aiokafka sends
one request per broker at a time and puts a retried batch back at the front of its queue.
``flush`` ships the open batches and waits until Kafka has acknowledged every one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from streams.replay.checkpoint import ReplayError

__all__ = ["BatchSink"]

BATCH_BYTES = 512 * 1024
"""Largest batch (and request size per partition); well under the broker's 1 MiB default."""


class BatchSink:
    """An idempotent ``acks=all`` producer fed whole batches; see the module docstring."""

    def __init__(self, bootstrap: str, **options: Any) -> None:
        options.setdefault("acks", "all")
        options.setdefault("enable_idempotence", True)
        options.setdefault("max_batch_size", BATCH_BYTES)
        options.setdefault("max_request_size", 2 * BATCH_BYTES)
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options)
        self._partitions: dict[str, int] = {}
        self._hashes: dict[bytes, int] = {}
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
            raise ReplayError("replayed records need a key (the user id)")
        count = self._partitions.get(topic) or await self._count(topic)
        hashed = self._hashes.get(key)
        if hashed is None:
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        where = (topic, hashed % count)
        batch = self._open.get(where)
        if batch is None:
            batch = self._open[where] = self._producer.create_batch()
        record = {"timestamp": timestamp_ms, "key": key, "value": value, "headers": headers or []}
        if batch.append(**record) is None:  # full: ship it, start another
            await self._ship(where)
            batch = self._open[where] = self._producer.create_batch()
            if batch.append(**record) is None:
                raise ReplayError(f"a record of {len(value)} bytes does not fit in one batch")

    async def _ship(self, where: tuple[str, int]) -> None:
        batch = self._open.pop(where)
        batch.close()
        topic, partition = where
        self._pending.append(await self._producer.send_batch(batch, topic, partition=partition))

    async def flush(self) -> None:
        """Ship every open batch and wait until Kafka acknowledged all (raises on failure)."""
        for where in list(self._open):
            await self._ship(where)
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)
