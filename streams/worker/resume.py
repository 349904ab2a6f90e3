"""Where a worker resumes a partition when Redis is behind Kafka.

The group's committed offset says how far Kafka thinks the partition was handled; the feature
store's watermark (``<prefix>wm``) says how far Redis has it. Normally the committed offset is
at most one batch or two past the watermark plus one (a commit follows the Redis write; dead
letters after the last event do not move the watermark). A Redis that lost writes (restarted
without its append-only file, restored from an older snapshot, a failover to a replica that
lagged) comes back behind: resuming from the committed offset would skip the lost events
silently. So, on every assignment:

- watermark ``w`` with ``w + 1 <`` committed: the consumer is rewound to ``w + 1``. What it
  reads again was lost (and is applied again, exactly once: everything after ``w`` is missing
  from Redis, as a lost suffix of writes is) or dead-lettered (dead-lettered again). It is
  what a crash at that point would have read again, with the same ids on the outputs.
- no watermark for the partition while others exist: rewound to the beginning, the same way.
- no watermark at all while the group has committed offsets: Redis holds no state of this
  deployment (restarted empty, or ``DEALSTREAM_REDIS_URL`` / ``DEALSTREAM_REDIS_PREFIX`` name
  another one). Rebuilding means reading the whole retained history again, offers included:
  the worker stops with ``RedisBehindKafka``, which says what to do, instead of guessing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.errors import StreamsError
from streams.worker.consumer import TopicPartitionKey

log = logging.getLogger("dealstream.worker")

Watermarks = Callable[[], Awaitable[Mapping[TopicPartitionKey, int]]]


class RedisBehindKafka(StreamsError):
    """Redis holds no state for partitions the group has already committed."""


@dataclass(frozen=True, slots=True)
class Rewind:
    topic: str
    partition: int
    committed: int
    watermark: int | None
    """Last offset Redis has applied; None: none of this partition."""

    @property
    def to(self) -> int | None:
        """The offset to read from again; None: the partition's beginning."""
        return None if self.watermark is None else self.watermark + 1


def plan_resume(
    committed: Mapping[TopicPartitionKey, int | None], watermarks: Mapping[TopicPartitionKey, int]
) -> list[Rewind]:
    """The partitions to rewind (module docstring); raises ``RedisBehindKafka`` when Redis
    holds no watermark at all while the group has committed some of ``committed``.

    >>> plan_resume({("b", 0): 120, ("b", 1): 50, ("b", 2): None}, {("b", 0): 99, ("b", 1): 49})
    [Rewind(topic='b', partition=0, committed=120, watermark=99)]
    """
    behind = [
        Rewind(topic, partition, offset, watermarks.get((topic, partition)))
        for (topic, partition), offset in sorted(committed.items())
        if offset is not None and offset > 0 and watermarks.get((topic, partition), -1) + 1 < offset
    ]
    if behind and not watermarks:
        where = ", ".join(f"{r.topic}[{r.partition}] committed at {r.committed}" for r in behind)
        raise RedisBehindKafka(
            f"Redis holds no feature watermark, but the consumer group has committed offsets "
            f"({where}): Redis lost its state (restarted without its append-only file?) or "
            "DEALSTREAM_REDIS_URL / DEALSTREAM_REDIS_PREFIX point at another one. Resuming "
            "would skip those events' features silently. To rebuild them from Kafka (outputs "
            "are published again, with the same ids), stop every worker and reset the group: "
            "kafka-consumer-groups.sh --reset-offsets --to-earliest --execute --group <group> "
            "--all-topics; to accept the loss, set each partition's watermark to its committed "
            "offset minus one: redis-cli HSET <prefix>wm <topic>:<partition> <offset>"
        )
    return behind


class ResumeFromRedis:
    """Rewinds the newly assigned partitions Redis is behind on (``EventConsumer``'s
    ``on_assigned``); ``watermarks`` reads the feature store's."""

    def __init__(self, watermarks: Watermarks) -> None:
        self._watermarks = watermarks

    async def __call__(
        self, consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
    ) -> None:
        committed = {(tp.topic, tp.partition): await consumer.committed(tp) for tp in partitions}
        for rewind in plan_resume(committed, await self._watermarks()):
            tp = TopicPartition(rewind.topic, rewind.partition)
            if rewind.to is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, rewind.to)
            log.warning(
                "Redis is behind Kafka on %s[%d]: watermark %s, committed %d; reading again "
                "from %s (Redis lost writes: restarted without its append-only file, or from an "
                "older snapshot)",
                rewind.topic,
                rewind.partition,
                "none" if rewind.watermark is None else rewind.watermark,
                rewind.committed,
                "the beginning" if rewind.to is None else rewind.to,
            )
