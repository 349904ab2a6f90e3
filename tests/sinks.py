"""The test double of the ``RecordSink`` port (``engine.ports``): records kept in a list."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import NamedTuple


class SentRecord(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int | None


class ListSink:
    """Keeps every record sent; ``flush`` and ``delivery`` mark everything sent so far as
    delivered at once (``flushes`` counts both)."""

    def __init__(self) -> None:
        self.records: list[SentRecord] = []
        self.delivered = 0
        self.flushes = 0

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        self.records.append(SentRecord(topic, key, value, list(headers or ()), timestamp_ms))

    async def flush(self) -> None:
        await (await self.delivery())

    async def delivery(self) -> Awaitable[object]:
        self.delivered = len(self.records)
        self.flushes += 1
        return asyncio.gather()  # already done: nothing to wait for

    def to(self, topic: str) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
        """``(key, value, headers)`` of the records sent to ``topic``, in order."""
        return [(r.key, r.value, r.headers) for r in self.records if r.topic == topic]
