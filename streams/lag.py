"""Consumer lag from the broker: log-end offset minus committed offset, per partition."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    end_offset: int
    committed: int | None
    """None when the group never committed on this partition (lag = whole partition)."""

    @property
    def lag(self) -> int:
        return self.end_offset - (self.committed or 0)


async def consumer_lag(bootstrap: str, group: str, topics: Sequence[str]) -> list[PartitionLag]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [
                TopicPartition(topic, p)
                for topic in topics
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
        ends = await consumer.end_offsets(partitions) if partitions else {}
        committed = await admin.list_consumer_group_offsets(group)
        return [
            PartitionLag(
                tp.topic,
                tp.partition,
                ends[tp],
                committed[tp].offset if tp in committed and committed[tp].offset >= 0 else None,
            )
            for tp in partitions
        ]
    finally:
        await consumer.stop()
        await admin.close()
