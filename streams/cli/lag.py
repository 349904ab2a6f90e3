"""``dealstream lag``: consumer lag per partition, records and seconds behind."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

import orjson

from streams.cli import Subparsers
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.operations.lag import PartitionLag


def add_parser(subparsers: Subparsers) -> None:
    lag = subparsers.add_parser(
        "lag", help="consumer lag per partition: records and seconds behind"
    )
    lag.add_argument("--json", action="store_true", help="one JSON document")
    lag.add_argument("--group", default=None, help="consumer group (default: DEALSTREAM_GROUP_ID)")
    lag.set_defaults(handler=run_lag_command)


def run_lag_command(settings: Settings, args: argparse.Namespace) -> int:
    from streams.adapters.kafka_io import check_kafka
    from streams.operations.lag import consumer_lag, format_lag_table, lag_report

    group = args.group or settings.group_id

    async def run() -> list[PartitionLag]:
        await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
        return await consumer_lag(
            settings.kafka_bootstrap,
            group,
            settings.topics.events,
            security=settings.kafka_security,
        )

    rows = asyncio.run(run())
    if args.json:
        print(orjson.dumps(lag_report(group, rows)).decode())
    else:
        print(format_lag_table(group, rows))
    return 0
