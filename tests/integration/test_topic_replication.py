"""Topic creation with a replication factor (issue 13), against the real broker: the topics
get ``min.insync.replicas``; a factor the cluster cannot meet is a one-line ``ConfigError``
that says what to set, not topics silently missing."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.adapters.kafka_io import ensure_topics
from streams.errors import ConfigError
from streams.settings import TopicReplication, Topics
from tests.conftest import Isolation, Services
from tests.worker_process import clean_up

pytestmark = pytest.mark.integration


async def _topic_configs(admin: AIOKafkaAdminClient, topic: str) -> dict[str, str]:
    """A new topic's configuration as a broker describes it. The broker that answers may not
    know the topic for a moment after it was created (its metadata follows the controller's),
    and then describes it with an error and no entries: ask again, for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        [described] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        error_code, _, _, _, entries = described.resources[0][:5]
        if (error_code == 0 and entries) or time.monotonic() > deadline:
            return {entry[0]: entry[1] for entry in entries}
        await asyncio.sleep(0.2)


async def test_topics_get_their_min_insync_replicas_and_an_impossible_factor_is_refused(
    services: Services, isolation: Isolation
) -> None:
    topics = Topics(isolation.topic_prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        created = await ensure_topics(
            services.kafka_bootstrap,
            [topics.offers],
            partitions=1,
            replication=TopicReplication.of(brokers),
        )
        assert created == [topics.offers]
        configs = await _topic_configs(admin, topics.offers)
        expected = TopicReplication.of(brokers).min_insync
        assert configs["min.insync.replicas"] == str(expected)

        too_many = TopicReplication.of(brokers + 1)
        with pytest.raises(ConfigError, match="DEALSTREAM_REPLICATION_FACTOR") as raised:
            await ensure_topics(
                services.kafka_bootstrap, [topics.decisions], partitions=1, replication=too_many
            )
        assert topics.decisions in str(raised.value)
        assert topics.decisions not in await admin.list_topics()
    finally:
        await admin.close()
        await clean_up(services, isolation)
