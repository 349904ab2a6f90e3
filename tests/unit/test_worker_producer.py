"""The worker's producers (its outputs' librdkafka producer, and Faust's, replaced in
``create_app``): idempotent, ``acks=all``, and the request limit that dead letters are cut to.
Built, not started: no broker needed."""

from __future__ import annotations

import redis.asyncio as aioredis

from streams.adapters.kafka_io import PRODUCER_MAX_REQUEST_BYTES
from streams.adapters.sinks import LINGER_MS
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


async def test_the_outputs_producer_is_idempotent_with_acks_all_and_kafkas_partitioner() -> None:
    """The outputs go through librdkafka (``RdKafkaSink``), not Faust's producer."""
    settings = Settings(pseudonym_key=Secret(TEST_PSEUDONYM_KEY))
    client = aioredis.Redis()
    try:
        runtime = bootstrap(settings, redis_client=client)
        assert not runtime.sink.started  # built, not connected: the preflight starts it
        config = runtime.sink.config
        assert config["enable.idempotence"] is True and config["acks"] == "all"
        # Kafka's default partitioner (aiokafka's and the Java client's); librdkafka's own
        # default (CRC32) would put a user's outputs on another partition than before.
        assert config["partitioner"] == "murmur2_random"
        assert config["message.max.bytes"] == PRODUCER_MAX_REQUEST_BYTES
        assert config["linger.ms"] == LINGER_MS == 1  # part of every batch's cycle at low rates
    finally:
        await client.aclose()
