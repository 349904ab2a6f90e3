"""The worker's producer (Faust's, replaced in ``create_app``): idempotent, ``acks=all``, and
the request limit that dead letters are cut to. Built, not started: no broker needed."""

from __future__ import annotations

import redis.asyncio as aioredis

from streams.adapters.kafka_io import PRODUCER_MAX_REQUEST_BYTES
from streams.settings import Secret, Settings, TopicReplication
from streams.worker.faust_app import IdempotentProducer, bootstrap, create_app
from tests.conftest import TEST_PSEUDONYM_KEY


async def test_the_workers_producer_is_idempotent_with_acks_all() -> None:
    settings = Settings(
        replication=TopicReplication(3, 2), pseudonym_key=Secret(TEST_PSEUDONYM_KEY)
    )
    client = aioredis.Redis()
    try:
        app = create_app(bootstrap(settings, redis_client=client))
        assert isinstance(app.producer, IdempotentProducer)
        assert app.conf.topic_replication_factor == 3
        producer = app.producer._new_producer()
        # aiokafka keeps these private: idempotence is its transaction manager (producer id
        # and sequence numbers), acks what the sender asks of the broker.
        assert producer._txn_manager is not None
        assert producer._sender._acks == -1
        assert producer._max_request_size == PRODUCER_MAX_REQUEST_BYTES
    finally:
        await client.aclose()
