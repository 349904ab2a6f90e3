"""Consumer lag from the broker: per partition, records behind and the age of the oldest one.

Lag is what the *group* has committed, read from the broker (never from a consumer's own view),
so it stays right across rebalances and for partitions nobody owns at the moment:

- ``lag`` = log-end offset - the offset the group resumes from; that is the committed offset,
  or the log-start offset when the group never committed on the partition (the worker starts
  from the earliest record) or committed below the log start (retention deleted those records);
- ``lag_seconds`` = age of the oldest unprocessed record: now - the Kafka timestamp of the
  record at that offset (CreateTime unless the topic uses LogAppendTime); 0 when lag is 0.

``LagProbe`` keeps its admin client and consumer open between measurements (the worker measures
every few seconds); ``consumer_lag`` opens one for a single measurement (CLI, demo).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.adapters.kafka_io import kafka_client_options
from streams.settings import KafkaSecurity

FETCH_TIMEOUT_S = 3.0
"""How long a measurement waits for the records whose timestamps give the time lag."""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    committed: int | None
    """None when the group never committed on this partition."""
    start_offset: int = 0
    """The partition's log-start offset (records before it were deleted by retention)."""
    oldest_timestamp_ms: int | None = None
    """Kafka timestamp of the oldest unprocessed record; None when lag is 0 or unknown."""
    measured_at_ms: int = 0

    @property
    def position(self) -> int:
        """The offset the group resumes from."""
        if self.committed is None:
            return self.start_offset
        return max(self.committed, self.start_offset)

    @property
    def lag(self) -> int:
        return max(0, self.end_offset - self.position)

    @property
    def lag_seconds(self) -> float | None:
        """Age of the oldest unprocessed record at measurement time; None if it is unknown."""
        if self.lag == 0:
            return 0.0
        if self.oldest_timestamp_ms is None:
            return None
        return max(0.0, (self.measured_at_ms - self.oldest_timestamp_ms) / 1000)

    def as_dict(self) -> dict[str, Any]:
        seconds = self.lag_seconds
        return {
            "topic": self.topic,
            "partition": self.partition,
            "start": self.start_offset,
            "end": self.end_offset,
            "committed": self.committed,
            "lag": self.lag,
            "lag_seconds": round(seconds, 3) if seconds is not None else None,
        }


def total_lag(rows: Iterable[PartitionLag]) -> int:
    return sum(row.lag for row in rows)


def _wall_ms() -> int:
    return int(time.time() * 1000)


class LagProbe:
    """Measures a group's lag on some topics; ``start`` once, ``measure`` often, ``close``."""

    def __init__(
        self,
        bootstrap: str,
        *,
        request_timeout_ms: int = 10_000,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
        wall_clock_ms: Callable[[], int] = _wall_ms,
        security: KafkaSecurity | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._security = security
        self._request_timeout_ms = request_timeout_ms
        self._fetch_timeout_s = fetch_timeout_s
        self._wall_clock_ms = wall_clock_ms
        self._clients: tuple[AIOKafkaAdminClient, AIOKafkaConsumer] | None = None
        """Created by ``start``, inside the event loop (aiokafka requires it)."""

    async def start(self) -> None:
        if self._clients is not None:
            return
        options = kafka_client_options(self._security).kwargs()
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self._bootstrap,
            request_timeout_ms=self._request_timeout_ms,
            **options,
        )
        consumer = AIOKafkaConsumer(
            **options,
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            request_timeout_ms=self._request_timeout_ms,
            max_partition_fetch_bytes=64 * 1024,
            auto_offset_reset="earliest",
        )
        await admin.start()
        try:
            await consumer.start()
        except BaseException:
            await admin.close()
            raise
        self._clients = (admin, consumer)

    async def close(self) -> None:
        if self._clients is None:
            return
        admin, consumer = self._clients
        self._clients = None
        try:
            await consumer.stop()
        finally:
            await admin.close()

    def _started(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._clients is None:
            raise RuntimeError("LagProbe.start() was not awaited")
        return self._clients

    async def partitions(self, topics: Sequence[str]) -> list[TopicPartition]:
        """The partitions of the topics that exist (missing topics have none)."""
        admin, _ = self._started()
        described = await admin.describe_topics(list(topics))
        found = {
            t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in described
            if t["error_code"] == 0
        }
        return [TopicPartition(topic, p) for topic in topics for p in found.get(topic, ())]

    async def measure(self, group: str, topics: Sequence[str]) -> list[PartitionLag]:
        """Lag of ``group`` on every partition of ``topics``, in topic and partition order."""
        await self.start()
        partitions = await self.partitions(topics)
        if not partitions:
            return []
        admin, consumer = self._started()
        starts = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group)
        rows = []
        for tp in partitions:
            meta = committed.get(tp)
            rows.append(
                PartitionLag(
                    tp.topic,
                    tp.partition,
                    ends[tp],
                    meta.offset if meta is not None and meta.offset >= 0 else None,
                    starts[tp],
                )
            )
        stamps = await self._oldest_timestamps(
            partitions,
            {TopicPartition(r.topic, r.partition): r.position for r in rows if r.lag > 0},
        )
        now_ms = self._wall_clock_ms()
        return [
            PartitionLag(
                r.topic,
                r.partition,
                r.end_offset,
                r.committed,
                r.start_offset,
                stamps.get(TopicPartition(r.topic, r.partition)),
                now_ms,
            )
            for r in rows
        ]

    async def _oldest_timestamps(
        self, partitions: Sequence[TopicPartition], positions: dict[TopicPartition, int]
    ) -> dict[Any, int]:
        """Timestamp of the first record at or after each position (reads one batch each).

        The consumer stays assigned to every partition measured, paused; only the partitions
        read are resumed, and only while they are read.
        """
        if not positions:
            return {}
        _, consumer = self._started()
        if consumer.assignment() != set(partitions):
            consumer.assign(list(partitions))
            consumer.pause(*partitions)
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        consumer.resume(*positions)
        try:
            found: dict[Any, int] = {}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._fetch_timeout_s
            while len(found) < len(positions):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                waiting = [tp for tp in positions if tp not in found]
                batch = await consumer.getmany(*waiting, timeout_ms=int(remaining * 1000))
                for tp, records in batch.items():
                    for record in records:
                        if record.offset >= positions[tp] and tp not in found:
                            found[tp] = int(record.timestamp)
            return found
        finally:
            consumer.pause(*positions)


async def consumer_lag(
    bootstrap: str, group: str, topics: Sequence[str], *, security: KafkaSecurity | None = None
) -> list[PartitionLag]:
    """One measurement of ``group``'s lag on ``topics`` (opens and closes its own clients)."""
    probe = LagProbe(bootstrap, security=security)
    try:
        return await probe.measure(group, topics)
    finally:
        await probe.close()


def lag_report(group: str, rows: Sequence[PartitionLag]) -> dict[str, Any]:
    """The ``dealstream lag --json`` document."""
    seconds = [row.lag_seconds for row in rows]
    known = [s for s in seconds if s is not None]
    return {
        "group": group,
        "total_lag": total_lag(rows),
        "max_lag_seconds": round(max(known), 3) if known else 0.0,
        "partitions": [row.as_dict() for row in rows],
    }


def format_lag_table(group: str, rows: Sequence[PartitionLag]) -> str:
    """A plain-text table: topic, partition, end, committed, lag, seconds; then the total."""
    if not rows:
        return f"group {group}: none of the topics exists yet (no partitions, no lag)"
    header = ("topic", "partition", "end", "committed", "lag", "seconds")
    lines = [header]
    for row in rows:
        seconds = row.lag_seconds
        lines.append(
            (
                row.topic,
                str(row.partition),
                str(row.end_offset),
                "-" if row.committed is None else str(row.committed),
                str(row.lag),
                "?" if seconds is None else f"{seconds:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    known = [s for s in (row.lag_seconds for row in rows) if s is not None]
    oldest = f"{max(known):.1f}" if known else "0.0"
    text.append(f"group {group}: total lag {total_lag(rows)} records, oldest {oldest} s")
    return "\n".join(text)
