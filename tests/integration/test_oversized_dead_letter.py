"""A record too large to dead-letter whole (issue 13): the worker cuts it to fit the
producer's 1,000,000-byte limit, says so in headers, and keeps consuming the partition.

Before, the whole 1.2 MB record went to the producer, which refused it: the worker exited 70
and met the same record on every restart. Real Kafka and Redis; the worker is a subprocess.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from engine.features.state import KIND_CODE
from streams.adapters.decode import record_bytes
from streams.adapters.kafka_io import PRODUCER_MAX_REQUEST_BYTES, ensure_topics
from streams.settings import Topics
from tests.conftest import Isolation, Services
from tests.worker_process import WorkerProcess, accounted, clean_up, read_states, worker_env

pytestmark = pytest.mark.integration

BIG_BYTES = 1_200_000
TIMEOUT_S = 90.0


def browse(user: str, event_id: str, ts: int, **extra: object) -> bytes:
    event = {
        "event_id": event_id,
        "user_id": user,
        "type": "browse",
        "ts": ts,
        "item_id": "i1",
        "category": "books",
        "price": 12.5,
        **extra,
    }
    return orjson.dumps(event)


async def test_a_1_2_mb_record_is_dead_lettered_cut_and_the_partition_moves_on(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    topics = Topics(isolation.topic_prefix)
    user = "u-big"
    now_ms = int(time.time() * 1000)
    before = browse(user, "e-before", now_ms - 3000)
    big = browse(user, "e-big", now_ms - 2000, pad="x" * BIG_BYTES)
    after = browse(user, "e-after", now_ms - 1000)
    assert len(big) > BIG_BYTES

    # The browse topic takes records up to 2 MB, as a shop's topic might.
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topics.browse, 1, 1, topic_configs={"max.message.bytes": "2000000"})]
        )
    finally:
        await admin.close()
    await ensure_topics(services.kafka_bootstrap, topics.all, partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka_bootstrap, acks="all", max_request_size=2_500_000
    )
    await producer.start()
    try:
        for value in (before, big, after):
            await producer.send_and_wait(
                topics.browse, value, key=user.encode(), headers=[("shop", b"s1")]
            )
    finally:
        await producer.stop()

    worker = WorkerProcess(
        worker_env(services, isolation, http_port=free_port, partitions=1),
        tmp_path / "worker.log",
    )
    worker.start()
    try:
        final = await worker.wait_progress(lambda line: line["consumed"] >= 3, TIMEOUT_S)
        consumer = AIOKafkaConsumer(
            topics.dlq,
            bootstrap_servers=services.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            fetched = await consumer.getmany(timeout_ms=10_000)
        finally:
            await consumer.stop()
        states = await read_states(services, isolation, [user])
        assert worker.alive(), "the worker died on an oversized record" + worker.tail()
        code = worker.stop()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    tail = worker.tail()

    assert final["dead_lettered"] == {"too_large": 1}, final
    assert final["applied"] == 2 and accounted(final) == final["consumed"] == 3, final
    assert states[user].get(f"n{KIND_CODE['view']}") == 2.0, states[user]
    assert code == 0, f"worker exit status {code} on SIGTERM" + tail

    dlq = [record for records in fetched.values() for record in records]
    assert len(dlq) == 1, dlq
    letter = dlq[0]
    headers = dict(letter.headers)
    assert headers["dealstream.error.class"] == b"too_large"
    assert headers["dealstream.error.truncated"] == b"value"
    assert headers["dealstream.error.original_size"] == str(len(big)).encode()
    assert headers["shop"] == b"s1"
    assert letter.key == user.encode()
    assert letter.value is not None and big.startswith(letter.value)
    assert len(letter.value) > 990_000  # cut to the limit, not emptied
    sent = record_bytes(letter.key, letter.value, list(letter.headers))
    assert sent <= PRODUCER_MAX_REQUEST_BYTES
