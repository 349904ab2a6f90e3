"""``dealstream worker``: preflight checks, topics, then the Faust worker until a signal."""

from __future__ import annotations

import asyncio
import logging

import faust

from streams.app import bootstrap, create_app
from streams.kafka_io import check_kafka, check_redis, ensure_topics
from streams.settings import Settings

log = logging.getLogger("dealstream.worker")


def run_worker(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM. Unreachable services fail fast with a one-line error."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    runtime = bootstrap(settings)

    async def preflight() -> None:
        await check_redis(runtime.redis, settings.redis_url.reveal())
        await check_kafka(settings.kafka_bootstrap)
        created = await ensure_topics(
            settings.kafka_bootstrap, settings.topics.all, partitions=settings.partitions
        )
        if created:
            log.info("created topics %s", ", ".join(created))

    try:
        loop.run_until_complete(preflight())
    except BaseException:
        loop.run_until_complete(runtime.redis.aclose())
        loop.close()
        raise
    app = create_app(runtime)
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
