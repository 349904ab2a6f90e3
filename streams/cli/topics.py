"""``dealstream topics``: create the contract's topics when missing."""

from __future__ import annotations

import argparse
import asyncio

from streams.cli import Subparsers
from streams.settings import Settings


def add_parser(subparsers: Subparsers) -> None:
    topics = subparsers.add_parser("topics", help="create the contract's topics when missing")
    topics.set_defaults(handler=run_topics_command)


def run_topics_command(settings: Settings, args: argparse.Namespace) -> int:
    from streams.adapters.kafka_io import check_kafka, ensure_topics

    async def run() -> list[str]:
        await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
        return await ensure_topics(
            settings.kafka_bootstrap,
            settings.topics.all,
            partitions=settings.partitions,
            replication=settings.replication,
            security=settings.kafka_security,
        )

    created = asyncio.run(run())
    print(f"topics: created {len(created)}, all present: {', '.join(settings.topics.all)}")
    return 0
