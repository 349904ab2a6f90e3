"""Topic creation with a replication factor (issue 13), against the real broker: the topics
get ``min.insync.replicas``; a factor the cluster cannot meet is a one-line ``ConfigError``
that says what to set, not topics silently missing."""

from __future__ import annotations

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from streams.adapters.kafka_io import ensure_topics
from streams.errors import ConfigError
from streams.settings import TopicReplication, Topics
from tests.conftest import Isolation, Services
from tests.worker_process import clean_up

pytestmark = pytest.mark.integration


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
        [described] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topics.offers)]
        )
        configs = {entry[0]: entry[1] for entry in described.resources[0][4]}
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
