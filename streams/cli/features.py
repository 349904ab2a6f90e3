"""``dealstream features``: print users' current feature vectors, read from Redis."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import orjson

from engine.features.catalogue import compute_features
from engine.features.state import State
from streams.cli import Subparsers
from streams.settings import Settings


def add_parser(subparsers: Subparsers) -> None:
    features = subparsers.add_parser("features", help="print users' current feature vectors")
    features.add_argument("user_ids", nargs="+", metavar="USER_ID")
    features.add_argument("--json", action="store_true", help="one JSON line per user")
    features.set_defaults(handler=run_features_command)


def run_features_command(settings: Settings, args: argparse.Namespace) -> int:
    states = asyncio.run(read_feature_states(settings, args.user_ids))
    for user_id in args.user_ids:
        state = states[user_id]
        vector = compute_features(state) if state else None
        if args.json:
            print(orjson.dumps({"user_id": user_id, "features": vector}).decode())
        elif vector is None:
            print(f"{user_id}: no history")
        else:
            shown = ", ".join(f"{k}={v:g}" for k, v in vector.items() if v)
            print(f"{user_id}: {shown}")
    return 0


async def read_feature_states(settings: Settings, user_ids: Sequence[str]) -> dict[str, State]:
    from streams.adapters.kafka_io import check_redis
    from streams.adapters.pseudonyms import pseudonyms_from_settings
    from streams.adapters.redis_client import redis_from_settings
    from streams.adapters.redis_store import RedisFeatureStore

    pseudonyms = pseudonyms_from_settings(settings)
    client = redis_from_settings(settings)
    try:
        await check_redis(client, settings.redis_url.reveal())
        # The records are keyed by the users' pseudonyms: the same key as the worker's.
        store = RedisFeatureStore(client, prefix=settings.redis_prefix, pseudonyms=pseudonyms)
        return await store.read_states(user_ids)
    finally:
        await client.aclose()
