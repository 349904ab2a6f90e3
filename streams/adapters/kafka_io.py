"""Kafka plumbing shared by the CLI, the worker and the tools: admin, preflight, producing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.partitioner import murmur2

from streams.errors import ConfigError, ServiceUnavailable
from streams.settings import TopicReplication, redact_url

PRODUCER_MAX_REQUEST_BYTES = 1_000_000
"""The largest record our producers send (their ``max_request_size``, Faust's default; the
broker's default ``message.max.bytes`` is 1,048,588): dead letters are cut to fit it."""

PRODUCER_MAX_REQUEST_BYTES = 1_000_000
"""The largest record our producers send (their ``max_request_size``, Faust's default; the
broker's default ``message.max.bytes`` is 1,048,588): dead letters are cut to fit it."""

_KEY_HASHES: dict[bytes, int] = {}
_KEY_HASHES_MAX = 200_000


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (every client's: murmur2 of the key, made
    positive, modulo the count) puts a keyed record on. Hashes are memoised per key (bounded)."""
    hashed = _KEY_HASHES.get(key)
    if hashed is None:
        if len(_KEY_HASHES) >= _KEY_HASHES_MAX:
            _KEY_HASHES.clear()
        hashed = _KEY_HASHES[key] = murmur2(key) & 0x7FFFFFFF
    return hashed % partitions


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a library's own error logs while we turn its failure into one clear line."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


async def check_kafka(bootstrap: str, *, timeout_s: float = 10.0) -> None:
    """Raise ``ServiceUnavailable`` with advice unless a broker answers a metadata request."""
    with _quiet("aiokafka"):
        await _check_kafka(bootstrap, timeout_s)


async def _check_kafka(bootstrap: str, timeout_s: float) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.list_topics(), timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        raise ServiceUnavailable(
            f"cannot reach Kafka at {bootstrap} ({type(exc).__name__}): start it with "
            "`make services` or set DEALSTREAM_KAFKA_BOOTSTRAP"
        ) from None
    finally:
        await admin.close()


async def check_redis(client: aioredis.Redis, url: str, *, timeout_s: float = 5.0) -> None:
    """Raise ``ServiceUnavailable`` with advice unless Redis answers PING."""
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
    except (TimeoutError, OSError, aioredis.RedisError) as exc:
        raise ServiceUnavailable(
            f"cannot reach Redis at {redact_url(url)} ({type(exc).__name__}): start it with "
            "`make services` or set DEALSTREAM_REDIS_URL"
        ) from None


async def ensure_topics(
    bootstrap: str,
    names: Sequence[str],
    *,
    partitions: int,
    replication: TopicReplication | None = None,
) -> list[str]:
    """Create the topics that do not exist yet, replicated as ``replication`` says (with its
    ``min.insync.replicas``; default: one replica, for a local broker); returns the names it
    created. Existing topics are left as they are."""
    replication = replication or TopicReplication()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                response = await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=partitions,
                            replication_factor=replication.factor,
                            topic_configs=replication.topic_configs(),
                        )
                        for name in missing
                    ]
                )
                _raise_topic_errors(response.topic_errors, replication)
        return missing
    finally:
        await admin.close()


def _raise_topic_errors(errors: Sequence[Sequence[Any]], replication: TopicReplication) -> None:
    """The admin client returns per-topic errors instead of raising them: a replication
    factor above the broker count would otherwise leave the topics missing, unsaid."""
    for name, code, *rest in errors:
        if code in (0, TopicAlreadyExistsError.errno):
            continue
        why = rest[0] if rest and rest[0] else for_code(code).__name__
        raise ConfigError(
            f"cannot create topic {name}: {why} (replication factor {replication.factor}, "
            f"min.insync.replicas {replication.min_insync}); set "
            "DEALSTREAM_REPLICATION_FACTOR to at most the number of brokers and "
            "DEALSTREAM_MIN_INSYNC_REPLICAS to at most the factor"
        )
