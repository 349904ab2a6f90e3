"""Integration fixtures: a real Redis client and key prefix per test, cleaned up afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from streams.adapters.redis_store import RedisFeatureStore
from tests.conftest import Isolation, Services


async def delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN MATCH prefix*), in chunks."""
    removed = 0
    chunk: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        chunk.append(key)
        if len(chunk) >= 1000:
            removed += await client.unlink(*chunk)
            chunk = []
    if chunk:
        removed += await client.unlink(*chunk)
    return removed


async def keys_under(client: aioredis.Redis, prefix: str) -> set[str]:
    return {key.decode() async for key in client.scan_iter(match=f"{prefix}*", count=1000)}


@dataclass
class RedisEnv:
    client: aioredis.Redis
    prefix: str
    store: RedisFeatureStore


@pytest.fixture
async def redis_env(services: Services, isolation: Isolation) -> AsyncIterator[RedisEnv]:
    """A client, this test's key prefix and a store on it; keys under the prefix go afterwards."""
    prefix = isolation.redis_prefix
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        yield RedisEnv(client, prefix, RedisFeatureStore(client, prefix=prefix))
    finally:
        await delete_prefix(client, prefix)
        assert not await keys_under(client, prefix)
        await client.aclose()
