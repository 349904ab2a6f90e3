"""``dealstream forget``: delete a user's Redis state and tombstone the user's pseudonym."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from streams.cli import Subparsers
from streams.settings import Settings


def add_parser(subparsers: Subparsers) -> None:
    forget = subparsers.add_parser(
        "forget",
        help="delete a user's Redis state; a tombstone stops the profile being rebuilt "
        "for DEALSTREAM_FORGET_TTL_S",
    )
    forget.add_argument("user_id", metavar="USER_ID")
    forget.set_defaults(handler=run_forget_command)


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What ``forget`` removed, and until when the tombstone holds (epoch ms)."""

    keys: int
    """Keys deleted: the user's hash (feature record, guards and pending decisions), under the
    pseudonym and under the raw id."""
    tombstone_until_ms: int | None


def run_forget_command(settings: Settings, args: argparse.Namespace) -> int:
    done = asyncio.run(forget_user(settings, args.user_id))
    print(
        f"forget: removed {done.keys} key(s) for the user (feature record, guards and pending "
        f"decisions share one); tombstone for {settings.forget_ttl_s:g} s: the user's later "
        "events are skipped (counted as forgotten) until it expires"
    )
    return 0


async def forget_user(settings: Settings, user_id: str) -> Forgotten:
    """Delete the user's features, guard state and pending decisions (their place in the
    label indexes too) under the user's pseudonym, and under the raw id in case a worker ran with
    ``DEALSTREAM_PSEUDONYMS=off`` before; then tombstone the pseudonym for
    ``settings.forget_ttl_s``."""
    from streams.adapters.kafka_io import check_redis
    from streams.adapters.pseudonyms import pseudonyms_from_settings
    from streams.adapters.redis_client import redis_from_settings
    from streams.adapters.redis_ledger import RedisLedger
    from streams.adapters.redis_store import RedisFeatureStore

    pseudonyms = pseudonyms_from_settings(settings)
    client = redis_from_settings(settings)
    try:
        await check_redis(client, settings.redis_url.reveal())
        config = settings.engine_config().ledger_config(())
        keys = 0
        if pseudonyms.keyed:
            # Keys a worker wrote under the raw id (before pseudonyms were turned on).
            raw_store = RedisFeatureStore(client, prefix=settings.redis_prefix)
            raw_ledger = RedisLedger(client, prefix=settings.redis_prefix, config=config)
            keys += await raw_ledger.forget(user_id)
            keys += await raw_store.forget(user_id)
        # The ledger first: it removes the user from the label indexes of the lanes the user's
        # hash names, then the hash.
        ledger = RedisLedger(
            client, prefix=settings.redis_prefix, config=config, pseudonyms=pseudonyms
        )
        keys += await ledger.forget(user_id)
        # The tombstone last: written with the epoch bump that makes every worker read again.
        store = RedisFeatureStore(client, prefix=settings.redis_prefix, pseudonyms=pseudonyms)
        keys += await store.forget(user_id, tombstone_ttl_s=settings.forget_ttl_s)
        return Forgotten(keys, await store.forgotten_until(user_id))
    finally:
        await client.aclose()
