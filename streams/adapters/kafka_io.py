"""Kafka plumbing shared by the CLI, the worker and the tools: admin, preflight, producing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence

import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2

from streams.errors import ServiceUnavailable
from streams.settings import redact_url

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


async def ensure_topics(bootstrap: str, names: Sequence[str], *, partitions: int) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(name, num_partitions=partitions, replication_factor=1)
                        for name in missing
                    ]
                )
        return missing
    finally:
        await admin.close()
