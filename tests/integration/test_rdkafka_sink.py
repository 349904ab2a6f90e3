"""The worker's output producer (``RdKafkaSink``, librdkafka) against the real broker: a batch's
delivery completes only once Kafka holds its records, records keep their key, value, headers,
timestamp, Kafka's default partition and their order per partition, and a record the broker
refuses fails the delivery and tells the worker (which stops: exit 70)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord
from dealstream_native import default_partition

from streams.adapters.kafka_io import ensure_topics
from streams.adapters.sinks import RdKafkaSink
from streams.errors import ServiceUnavailable, SinkError
from tests.conftest import Isolation, Services, unused_port

pytestmark = pytest.mark.integration

PARTITIONS = 4


@pytest.fixture
async def topic(services: Services, isolation: Isolation) -> AsyncIterator[str]:
    name = f"{isolation.topic_prefix}out"
    await ensure_topics(
        services.kafka_bootstrap,
        [name],
        partitions=PARTITIONS,
        security=services.kafka_security,
    )
    yield name
    await _delete(services, [name])


async def _delete(services: Services, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=services.kafka_bootstrap, **services.kafka_options()
    )
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


async def _end_offsets(services: Services, topic: str) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=services.kafka_bootstrap, **services.kafka_options()
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
        return sum(ends.values())
    finally:
        await consumer.stop()


Record = ConsumerRecord[bytes, bytes]


async def _read(services: Services, topic: str, count: int) -> list[Record]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka_bootstrap,
        **services.kafka_options(),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = time.monotonic() + 30
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_delivery_completes_once_kafka_holds_the_records_as_sent(
    services: Services, topic: str
) -> None:
    # A long linger holds the records in librdkafka: the delivery must wait for them.
    sink = RdKafkaSink(
        services.kafka_bootstrap, security=services.kafka_security, **{"linger.ms": 700}
    )
    await sink.start()
    try:
        now_ms = int(time.time() * 1000)
        sent = [
            (f"u{i % 37}".encode(), f"value {i}".encode(), [("n", str(i).encode())], now_ms - i)
            for i in range(500)
        ]
        for key, value, headers, ts in sent:
            await sink.send(topic, key, value, headers, ts)
        await sink.send(topic, None, b"no key")  # no headers, no timestamp: CreateTime is now
        delivered = await sink.delivery()
        await asyncio.sleep(0.3)
        assert not asyncio.ensure_future(delivered).done()
        assert await _end_offsets(services, topic) == 0, "Kafka had them before the delivery"
        await delivered
        assert await _end_offsets(services, topic) == len(sent) + 1
        await (await sink.delivery())  # nothing sent since: done at once
    finally:
        await sink.stop()

    records = await _read(services, topic, len(sent) + 1)
    (unkeyed,) = [r for r in records if r.key is None]
    assert unkeyed.value == b"no key" and not unkeyed.headers
    assert abs(unkeyed.timestamp - time.time() * 1000) < 60_000
    assert unkeyed.timestamp_type == 0  # CreateTime
    keyed = sorted((r for r in records if r.key is not None), key=lambda r: r.offset)
    got = {(r.key, r.value, tuple(r.headers), r.timestamp) for r in keyed}
    assert got == {(k, v, tuple(h), ts) for k, v, h, ts in sent}
    for partition in range(PARTITIONS):
        # Kafka's default partitioner (murmur2), as aiokafka's and a shop's producer use, and
        # the order of the sends.
        read = [r.value for r in keyed if r.partition == partition]
        expected = [v for k, v, _, _ in sent if default_partition(k, PARTITIONS) == partition]
        assert read == expected


async def test_batches_complete_on_their_own_records(services: Services, topic: str) -> None:
    """Batch k's delivery covers its records only; a later batch's wait does not hold it."""
    sink = RdKafkaSink(services.kafka_bootstrap, security=services.kafka_security)
    await sink.start()
    try:
        deliveries = []
        for batch in range(20):
            for i in range(50):
                await sink.send(topic, f"u{i}".encode(), f"{batch}:{i}".encode())
            deliveries.append(await sink.delivery())
        await asyncio.wait_for(asyncio.gather(*deliveries), 30)
        assert await _end_offsets(services, topic) == 1000
    finally:
        await sink.stop()


async def test_a_batch_acknowledged_before_it_is_sealed_completes(
    services: Services, topic: str
) -> None:
    """The records' reports may all be served (by the idle poll) before ``delivery`` is
    called: the delivery must complete all the same, with nothing sent after it."""
    sink = RdKafkaSink(services.kafka_bootstrap, security=services.kafka_security)
    await sink.start()
    try:
        await sink.send(topic, b"u1", b"early")
        await asyncio.sleep(1.0)  # several idle polls: the acknowledgement is counted
        await asyncio.wait_for(await sink.delivery(), 10)
    finally:
        await sink.stop()


async def test_a_full_queue_is_waited_out_never_dropped(services: Services, topic: str) -> None:
    """librdkafka's queue takes 10 records here: sends past that wait for deliveries."""
    sink = RdKafkaSink(
        services.kafka_bootstrap,
        security=services.kafka_security,
        **{"queue.buffering.max.messages": 10},
    )
    await sink.start()
    try:
        for i in range(300):
            await sink.send(topic, f"u{i % 7}".encode(), str(i).encode())
        await asyncio.wait_for(sink.flush(), 30)
    finally:
        await sink.stop()
    records = await _read(services, topic, 300)
    assert sorted(int(r.value) for r in records) == list(range(300))
    for partition in range(PARTITIONS):
        values = [
            int(r.value)
            for r in sorted(records, key=lambda r: r.offset)
            if r.partition == partition
        ]
        assert values == sorted(values)


async def test_a_record_the_broker_refuses_fails_the_delivery_and_stops_the_worker(
    services: Services, isolation: Isolation
) -> None:
    name = f"{isolation.topic_prefix}small"
    admin = AIOKafkaAdminClient(
        bootstrap_servers=services.kafka_bootstrap, **services.kafka_options()
    )
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "2000"})]
        )
    finally:
        await admin.close()
    failures: list[BaseException] = []
    sink = RdKafkaSink(
        services.kafka_bootstrap,
        security=services.kafka_security,
        on_failure=failures.append,
    )
    await sink.start()
    try:
        await sink.send(name, b"u1", b"fits")
        await sink.send(name, b"u1", b"x" * 20_000)  # within the producer's 1 MB, not the topic's
        delivered = await sink.delivery()
        with pytest.raises(SinkError, match="Message size too large"):
            await asyncio.wait_for(delivered, 30)
        assert len(failures) == 1 and isinstance(failures[0], SinkError)
    finally:
        await sink.stop(timeout_s=1)
        await _delete(services, [name])


async def test_a_broker_that_does_not_answer_fails_the_start_in_one_line() -> None:
    sink = RdKafkaSink(f"127.0.0.1:{unused_port()}")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="did not answer the worker's producer"):
        await sink.start(timeout_s=2)
    assert time.monotonic() - started < 30
    assert not sink.started
