"""Small operator commands that talk to Redis: inspect and forget users."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from engine.state import State
from streams.kafka_io import check_redis
from streams.redis_ledger import RedisLedger
from streams.redis_store import RedisFeatureStore
from streams.settings import Settings


async def read_feature_states(settings: Settings, user_ids: Sequence[str]) -> dict[str, State]:
    client = aioredis.Redis.from_url(settings.redis_url.reveal())
    try:
        await check_redis(client, settings.redis_url.reveal())
        store = RedisFeatureStore(client, prefix=settings.redis_prefix)
        return await store.read_states(user_ids)
    finally:
        await client.aclose()


async def forget_user(settings: Settings, user_id: str) -> dict[str, int]:
    """Delete the user's features, dedup set, guard state and pending decisions."""
    client = aioredis.Redis.from_url(settings.redis_url.reveal())
    try:
        await check_redis(client, settings.redis_url.reveal())
        store = RedisFeatureStore(client, prefix=settings.redis_prefix)
        ledger = RedisLedger(
            client, prefix=settings.redis_prefix, config=settings.engine_config().ledger_config(())
        )
        return {
            "feature keys": await store.forget(user_id),
            "ledger keys": await ledger.forget(user_id),
        }
    finally:
        await client.aclose()
