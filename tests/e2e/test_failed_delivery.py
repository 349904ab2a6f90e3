"""An output Kafka refuses for good stops the worker (exit 70) and nothing of its batch is
committed: the dead-letter topic here takes records of at most 300 bytes, so the first dead
letter (a poison pill with the worker's headers) is refused by the broker. Real Kafka and
Redis; the worker is a subprocess."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.errors import EXIT_INTERNAL_ERROR
from streams.settings import Topics
from tests.conftest import Isolation, Services
from tests.worker_process import (
    WorkerProcess,
    clean_up,
    committed_offsets,
    produce_events,
    worker_env,
)

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60.0


async def test_a_dead_letter_the_broker_refuses_stops_the_worker_uncommitted(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    topics = Topics(isolation.topic_prefix)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=services.kafka_bootstrap, **services.kafka_options()
    )
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    name,
                    1,
                    1,
                    topic_configs={"max.message.bytes": "300"} if name == topics.dlq else {},
                )
                for name in topics.all
            ]
        )
    finally:
        await admin.close()
    await produce_events(services, topics, [], raw=[(topics.browse, b"u1", b"not json" * 20)])
    worker = WorkerProcess(
        worker_env(services, isolation, http_port=free_port, partitions=1),
        tmp_path / "worker.log",
    )
    worker.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while worker.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        code = worker.stop(timeout_s=5)
        assert code == EXIT_INTERNAL_ERROR, f"exit {code}" + worker.tail()
        assert "delivery failed for good" in worker.log_text(), worker.tail()
        assert "Message size too large" in worker.log_text(), worker.tail()
        assert not await committed_offsets(services, isolation.group_id)
    finally:
        worker.stop(timeout_s=5)
        await clean_up(services, isolation)
