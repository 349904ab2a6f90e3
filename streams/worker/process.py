"""``dealstream worker``: preflight checks, topics, then the Faust worker until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

import faust
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from streams.adapters.kafka_io import check_kafka, check_redis, ensure_topics
from streams.errors import EXIT_STOP_TIMEOUT
from streams.operations.garbage_collector import CollectorPauses
from streams.settings import Settings
from streams.worker.faust_app import bootstrap, create_app, reload_model

log = logging.getLogger("dealstream.worker")

KEEP_HANDLERS_CONFIG = {"version": 1, "disable_existing_loggers": False}
"""A logging config that changes nothing; Faust adds back the handlers it is given."""


class FaustWorker(faust.Worker):
    """Faust's worker as dealstream runs it: the CLI's logging, and a deadline on stopping.

    Logging: at WARNING and above Faust adds a spinner handler to the root logger and lowers
    the root level to DEBUG, so every library's debug call (aiokafka logs one per message sent)
    built a log record: about 6 % of the worker's CPU in the end-to-end benchmark. The CLI has
    already configured logging (streams/operations/logs.py); the root logger stays as it set.

    Stopping: without Kafka, a graceful stop waits on leaving the group and on the last commit
    for minutes. From the first SIGTERM/SIGINT the worker has ``stop_timeout_s``; then it
    says so and exits 75 at once. Nothing is lost: what it had not committed is read again.
    """

    stop_timeout_s: float = 0.0
    """0: no deadline."""

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        self.spinner = None

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        if not self._signal_stop_time and self.stop_timeout_s > 0:
            deadline = threading.Timer(self.stop_timeout_s, _stop_now, (self.stop_timeout_s,))
            deadline.daemon = True
            deadline.start()
        super()._schedule_shutdown(signal)


def _stop_now(timeout_s: float) -> None:
    """The stop deadline passed (runs on the timer's thread, the event loop may be stuck)."""
    log.error(
        "graceful stop did not finish within %g s (DEALSTREAM_STOP_TIMEOUT_S; is Kafka or "
        "Redis answering?): exiting without it; uncommitted batches are read again",
        timeout_s,
    )
    os._exit(EXIT_STOP_TIMEOUT)


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
    worker = FaustWorker(
        app,
        loop=loop,
        loglevel=settings.log_level,
        quiet=True,
        logging_config=KEEP_HANDLERS_CONFIG,
    )
    worker.stop_timeout_s = settings.stop_timeout_s
    gc_pause = runtime.metrics.gc_pause
    pauses = CollectorPauses(
        lambda generation, seconds: gc_pause.labels(str(generation)).observe(seconds)
    )
    pauses.install()
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        pauses.uninstall()
    return 0
