"""``dealstream worker``: preflight checks, topics, then the Faust worker until a signal."""

from __future__ import annotations

import asyncio
import logging

import faust
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from streams.adapters.kafka_io import check_kafka, check_redis, ensure_topics
from streams.settings import Settings
from streams.worker.faust_app import bootstrap, create_app, reload_model

log = logging.getLogger("dealstream.worker")

KEEP_HANDLERS_CONFIG = {"version": 1, "disable_existing_loggers": False}
"""A logging config that changes nothing; Faust adds back the handlers it is given."""


class QuietWorker(faust.Worker):
    """Faust's worker without its terminal spinner.

    At WARNING and above Faust adds a spinner handler to the root logger and lowers the root
    level to DEBUG, so every library's debug call (aiokafka logs one per message sent) built
    a log record: about 6 % of the worker's CPU in the end-to-end benchmark. The CLI has
    already configured logging (streams/operations/logs.py); the root logger stays as it set.
    """

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None


def run_worker(settings: Settings, verify_key: Ed25519PublicKey | None = None) -> int:
    """Run until SIGINT/SIGTERM. Unreachable services fail fast with a one-line error.

    Without the learner's public key the worker cannot verify its snapshots, so it scores with
    its own (untrained, or inline-learning) model and says so once.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    runtime = bootstrap(settings, verify_key=verify_key)

    async def preflight() -> None:
        await check_redis(runtime.redis, settings.redis_url.reveal())
        await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
        created = await ensure_topics(
            settings.kafka_bootstrap,
            settings.topics.all,
            partitions=settings.partitions,
            replication=settings.replication,
            security=settings.kafka_security,
        )
        if created:
            log.info("created topics %s", ", ".join(created))
        # The outputs' producer (librdkafka) logs in now: a refused login fails here, in one line.
        await runtime.sink.start()
        if verify_key is None:
            log.warning(
                "DEALSTREAM_MODEL_VERIFY_KEY is not set: no model hot reload from the learner"
            )
        if not runtime.pseudonyms.keyed:
            log.warning(
                "DEALSTREAM_PSEUDONYMS=off: raw user ids are stored in Redis and published on "
                "decisions (local demos only; docs/privacy.md)"
            )
        await reload_model(runtime)
        log.info("scoring with model %s", runtime.engine.model.version)

    try:
        loop.run_until_complete(preflight())
    except BaseException:
        loop.run_until_complete(runtime.sink.stop(0))
        loop.run_until_complete(runtime.redis.aclose())
        loop.close()
        raise
    app = create_app(runtime)
    # Keep the handlers the CLI configured (JSON lines, streams/operations/logs.py): Faust would
    # otherwise replace them with its own coloured text handler.
    app.conf.loghandlers = list(logging.getLogger().handlers)
    worker = QuietWorker(
        app,
        loop=loop,
        loglevel=settings.log_level,
        quiet=True,
        logging_config=KEEP_HANDLERS_CONFIG,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
