"""``dealstream forget``: delete every key stored about a user."""

from __future__ import annotations

import argparse
import asyncio

from streams.cli import Subparsers
from streams.settings import Settings


def add_parser(subparsers: Subparsers) -> None:
    forget = subparsers.add_parser("forget", help="delete every key stored about a user")
    forget.add_argument("user_id", metavar="USER_ID")
    forget.set_defaults(handler=run_forget_command)


def run_forget_command(settings: Settings, args: argparse.Namespace) -> int:
    removed = asyncio.run(forget_user(settings, args.user_id))
    detail = ", ".join(f"{count} {kind}" for kind, count in removed.items())
    print(f"forget: removed {sum(removed.values())} key(s) for the user ({detail})")
    return 0


async def forget_user(settings: Settings, user_id: str) -> dict[str, int]:
    """Delete the user's features, dedup set, guard state and pending decisions."""
    from streams.adapters.kafka_io import check_redis
    from streams.adapters.redis_client import redis_from_settings
    from streams.adapters.redis_ledger import RedisLedger
    from streams.adapters.redis_store import RedisFeatureStore

    client = redis_from_settings(settings)
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
