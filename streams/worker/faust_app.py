"""The composition root of the live worker: settings in, a ready Faust app out.

``bootstrap`` builds every client, the engine and the metrics registry once; ``create_app``
wires them into a Faust app whose single agent consumes the event topics in micro-batches
(``take_events``) and hands each batch to ``BatchWorker``, and whose web server serves
``/metrics``, ``/health``, ``/ready`` and the status page
(``streams/worker/http_endpoints.py``). Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import redis.asyncio as aioredis

from engine.campaigns import default_campaigns, load_campaigns
from engine.pipeline import DiscountEngine
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.adapters.model_store import ModelReloader, ModelStore
from streams.adapters.redis_ledger import RedisLedger
from streams.adapters.redis_store import RedisFeatureStore
from streams.adapters.sinks import FaustSink
from streams.errors import EXIT_INTERNAL_ERROR
from streams.operations.lag import LagProbe
from streams.operations.metrics import TimedFeatureStore, TimedLedger, WorkerMetrics
from streams.settings import Secret, Settings
from streams.worker.batch_worker import BatchWorker
from streams.worker.http_endpoints import (
    REFRESH_INTERVAL_S,
    WorkerStatus,
    connect_rebalance_signals,
    install_routes,
)

log = logging.getLogger("dealstream.worker")


@dataclass(slots=True)
class Runtime:
    """Everything the worker process owns, built once by ``bootstrap``."""

    settings: Settings
    redis: aioredis.Redis
    engine: DiscountEngine
    reloader: ModelReloader | None
    """Picks up models the learner publishes; None without a model key (no hot reload)."""
    metrics: WorkerMetrics
    """This worker's Prometheus registry and metrics (served on ``/metrics``)."""


MODEL_POLL_INTERVAL_S = 2.0


def bootstrap(
    settings: Settings,
    *,
    model_key: Secret | None = None,
    redis_client: aioredis.Redis | None = None,
    metrics: WorkerMetrics | None = None,
) -> Runtime:
    metrics = metrics if metrics is not None else WorkerMetrics()
    redis_seconds = metrics.redis_call
    campaigns = (
        load_campaigns(settings.campaigns_path)
        if settings.campaigns_path is not None
        else default_campaigns()
    )
    client = redis_client or aioredis.Redis.from_url(settings.redis_url.reveal())
    store = TimedFeatureStore(
        RedisFeatureStore(client, prefix=settings.redis_prefix),
        redis_seconds.labels("features").observe,
    )
    config = settings.engine_config()
    ledger = TimedLedger(
        RedisLedger(client, prefix=settings.redis_prefix, config=config.ledger_config(campaigns)),
        redis_seconds.labels("ledger").observe,
    )
    engine = DiscountEngine(store, ledger=ledger, campaigns=campaigns, config=config)
    reloader = (
        ModelReloader(ModelStore(client, prefix=settings.redis_prefix), model_key)
        if model_key is not None
        else None
    )
    return Runtime(
        settings=settings,
        redis=client,
        engine=engine,
        reloader=reloader,
        metrics=metrics,
    )


async def reload_model(runtime: Runtime) -> None:
    """Swap in the newest verified model the learner published, if there is a newer one."""
    if runtime.reloader is None:
        return
    engine = runtime.engine
    try:
        model = await runtime.reloader.poll(engine.model.version)
    except (OSError, aioredis.RedisError) as exc:
        log.warning("model reload skipped: %s", type(exc).__name__)
        return
    if model is not None:
        engine.model = model


def _raw_record(message: Any) -> RawRecord:
    headers = message.headers or ()
    if isinstance(headers, dict):
        headers = tuple(headers.items())
    return RawRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
        headers=tuple((str(k), bytes(v or b"")) for k, v in headers),
    )


REDIS_RETRY_MAX_S = 10.0
"""Exit status when a batch fails for a reason that is neither bad input nor Redis being away."""


async def _handle_until_done(worker: BatchWorker, records: Sequence[RawRecord]) -> None:
    """Run one batch; while Redis is unreachable, wait and retry the same batch.

    Bad input never raises here (it is dead-lettered). Anything else is a bug: the worker
    exits non-zero so that its supervisor restarts it, instead of staying up without
    consuming (Faust would restart the agent, which then reads nothing).
    """
    delay = 0.5
    while True:
        try:
            # Outputs are handed to the producer before Faust acks the inputs; Faust flushes
            # the producer before it commits their offsets (FaustSink).
            await worker.handle(records)
            return
        except (OSError, aioredis.RedisError) as exc:
            log.warning(
                "batch failed (%s: Redis unreachable?); retry in %.1f s", type(exc).__name__, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, REDIS_RETRY_MAX_S)
        except Exception:
            log.critical("batch failed unexpectedly; stopping the worker", exc_info=True)
            logging.shutdown()
            os._exit(EXIT_INTERNAL_ERROR)


def _faust_datadir(group_id: str) -> Path:
    """Faust's data folder: tables live in memory, so it stays empty; keep it out of the cwd."""
    path = Path(tempfile.gettempdir()) / "dealstream-faust" / group_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def create_app(runtime: Runtime) -> faust.App:
    settings = runtime.settings
    app = faust.App(
        settings.group_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        topic_replication_factor=1,
        topic_partitions=settings.partitions,
        web_port=settings.http_port,
        web_bind="0.0.0.0",
        consumer_auto_offset_reset="earliest",
        autodiscover=False,
        # Tables live in memory; keep Faust's (empty) data folder out of the working directory.
        datadir=str(_faust_datadir(settings.group_id)),
        producer_acks=-1,
        producer_linger=0.005,
        web_router_enabled=False,
        web_tables_enabled=False,
    )
    sink = FaustSink(app)
    worker = BatchWorker(
        runtime.engine,
        sink,
        topics=settings.topics,
        limits=DecodeLimits(
            max_message_bytes=settings.max_message_bytes,
            max_clock_skew_ms=int(settings.max_clock_skew_s * 1000),
        ),
        metrics=runtime.metrics,
    )
    status = WorkerStatus(
        worker,
        redis=runtime.redis,
        group=settings.group_id,
        probe=LagProbe(settings.kafka_bootstrap),
        model_store=ModelStore(runtime.redis, prefix=settings.redis_prefix),
    )
    connect_rebalance_signals(app, status)
    install_routes(app, status)
    events_topic = app.topic(*settings.topics.events, key_serializer="raw", value_serializer="raw")

    @app.agent(events_topic, name="dealstream-events")
    async def process_events(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            await _handle_until_done(worker, [_raw_record(e.message) for e in events])

    @app.timer(interval=MODEL_POLL_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def poll_model() -> None:
        await reload_model(runtime)

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def log_progress() -> None:
        log.info("progress", extra={"counters": worker.counters.as_dict()})

    @app.timer(interval=REFRESH_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def refresh_status() -> None:
        await status.refresh()

    async def close_probe(sender: Any, *args: Any, **kwargs: Any) -> None:
        if status.probe is not None:
            await status.probe.close()

    app.on_before_shutdown.connect(close_probe)  # type: ignore[arg-type]
    return app
