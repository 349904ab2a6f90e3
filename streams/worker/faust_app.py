"""The composition root of the live worker: settings in, a ready Faust app out.

``bootstrap`` builds every client, the engine and the metrics registry once; ``create_app``
wires them into a Faust app that runs the event consumer (``streams/worker/consumer.py``:
aiokafka batches handed to ``BatchWorker``, offsets committed after the outputs are delivered)
as one of its services, produces the outputs (through librdkafka: ``RdKafkaSink``, not Faust's
producer), runs the timers and serves ``/metrics``,
``/health``, ``/ready`` and the status page (``streams/worker/http_endpoints.py``). Faust
itself consumes nothing. Nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from faust.app.base import BootStrategy
from faust.transport.drivers.aiokafka import Producer as AIOKafkaDriverProducer
from mode import Service

from engine.campaigns import default_campaigns, load_campaigns
from engine.pipeline import DiscountEngine
from streams.adapters.batch_commit import ReplyWait
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.adapters.kafka_io import PRODUCER_MAX_REQUEST_BYTES, kafka_client_options
from streams.adapters.model_store import ModelReloader, ModelStore
from streams.adapters.outbox import Outbox
from streams.adapters.pseudonyms import Pseudonyms, pseudonyms_from_settings
from streams.adapters.redis_client import RedisClient, redis_from_settings
from streams.adapters.redis_errors import RedisBatchFailed, retry_on_redis
from streams.adapters.redis_ledger import RedisLedger
from streams.adapters.redis_store import RedisFeatureStore
from streams.adapters.replica_wait import ReplicaWait
from streams.adapters.sinks import RdKafkaSink
from streams.errors import (
    EXIT_INTERNAL_ERROR,
    StreamsError,
)
from streams.operations.lag import LagProbe
from streams.operations.metrics import TimedFeatureStore, TimedLedger, WorkerMetrics
from streams.settings import KafkaSecurity, Settings
from streams.worker.batch_worker import BatchWorker
from streams.worker.consumer import AssignmentObserver, EventConsumer, TopicPartitionKey
from streams.worker.crash_points import CrashPoints
from streams.worker.http_endpoints import (
    HEARTBEAT_INTERVAL_S,
    REFRESH_INTERVAL_S,
    WorkerStatus,
    install_routes,
)
from streams.worker.recovery import RecoverOutbox
from streams.worker.resume import ResumeFromRedis

log = logging.getLogger("dealstream.worker")


@dataclass(slots=True)
class Runtime:
    """Everything the worker process owns, built once by ``bootstrap``."""

    settings: Settings
    redis: RedisClient
    features: RedisFeatureStore
    """The engine's feature store, which follows the event consumer's assignment."""
    outbox: Outbox
    """The batches' outputs kept until Kafka commits them; republished after a crash."""
    engine: DiscountEngine
    reloader: ModelReloader | None
    """Picks up models the learner publishes; None without a verify key (no hot reload)."""
    metrics: WorkerMetrics
    """This worker's Prometheus registry and metrics (served on ``/metrics``)."""
    crash_points: CrashPoints
    """Fault tests only (``DEALSTREAM_CRASH_AT``); by default none."""
    pseudonyms: Pseudonyms
    """How user ids are stored in Redis and published on ``decisions`` (docs/privacy.md)."""
    sink: RdKafkaSink
    """The outputs' producer; built here, started by the preflight (``run_worker``) or, failing
    that, with the app (``ProducerService``)."""
    reply_wait: ReplyWait
    """Open while the batch's Redis call waits: when the next batch is decoded."""


MODEL_POLL_INTERVAL_S = 2.0


def bootstrap(
    settings: Settings,
    *,
    verify_key: Ed25519PublicKey | None = None,
    redis_client: RedisClient | None = None,
    metrics: WorkerMetrics | None = None,
    pseudonyms: Pseudonyms | None = None,
) -> Runtime:
    """Wire the worker; ``pseudonyms`` default to the settings' (a ``ConfigError`` without a key
    unless raw ids were chosen: ``pseudonyms_from_settings``)."""
    if pseudonyms is None:
        pseudonyms = pseudonyms_from_settings(settings)
    metrics = metrics if metrics is not None else WorkerMetrics()
    redis_seconds = metrics.redis_call
    campaigns = (
        load_campaigns(settings.campaigns_path)
        if settings.campaigns_path is not None
        else default_campaigns()
    )
    client = redis_client or redis_from_settings(settings)
    # Each batch call waits for replicas before anything of it is published or committed
    # (streams/adapters/replica_wait.py; DEALSTREAM_REDIS_WAIT_REPLICAS, 1 in a Redis Cluster).
    replication = (
        ReplicaWait(
            client,
            prefix=settings.redis_prefix,
            replicas=settings.redis_wait_replicas,
            timeout_ms=max(1, round(settings.redis_wait_timeout_s * 1000)),
            on_shortfall=metrics.redis_replication_shortfalls.inc,
        )
        if settings.redis_wait_replicas > 0
        else None
    )
    # One Redis call per batch: the ledger's carries the records the store staged and the
    # outbox entry of the batch's outputs (streams/adapters/outbox.py).
    features = RedisFeatureStore(
        client,
        prefix=settings.redis_prefix,
        max_cached_users=settings.state_cache_users,
        defer_writes=True,
        pseudonyms=pseudonyms,
        replication=replication,
    )
    outbox = Outbox(
        client, prefix=settings.redis_prefix, pseudonyms=pseudonyms, replication=replication
    )
    metrics.feature_records_held.set_function(features.held_users)
    metrics.feature_record_bytes_held.set_function(features.held_record_bytes)
    store = TimedFeatureStore(features, redis_seconds.labels("features").observe)
    config = settings.engine_config()
    reply_wait = ReplyWait()
    ledger = TimedLedger(
        RedisLedger(
            client,
            prefix=settings.redis_prefix,
            config=config.ledger_config(campaigns),
            features=features,
            outbox=outbox,
            retry_deadline_s=settings.redis_retry_deadline_s,
            pseudonyms=pseudonyms,
            replication=replication,
            reply_wait=reply_wait,
            remembered_users=settings.state_cache_users,
        ),
        redis_seconds.labels("ledger").observe,
    )
    engine = DiscountEngine(store, ledger=ledger, campaigns=campaigns, config=config)
    reloader = (
        ModelReloader(ModelStore(client, prefix=settings.redis_prefix, verify_key=verify_key))
        if verify_key is not None
        else None
    )
    return Runtime(
        settings=settings,
        redis=client,
        features=features,
        outbox=outbox,
        engine=engine,
        reloader=reloader,
        metrics=metrics,
        crash_points=CrashPoints(settings.crash_at),
        pseudonyms=pseudonyms,
        sink=RdKafkaSink(settings.kafka_bootstrap, security=settings.kafka_security),
        reply_wait=reply_wait,
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


async def _handle_until_done(
    worker: BatchWorker,
    records: Sequence[RawRecord],
    lagging: Collection[TopicPartitionKey],
    *,
    deadline_s: float,
) -> None:
    """Run one batch, retried while Redis fails it in a way that can heal (``retry_on_redis``).

    Any other outcome stops the worker at once (``os._exit``), non-zero so that its supervisor
    restarts it, rather than staying up without consuming: exit ``EXIT_REDIS_REFUSED`` (78)
    when Redis refuses the batch for good (a permission, the password, a key of another type, a
    script error), ``EXIT_REDIS_UNAVAILABLE`` (69) when it failed past the deadline, and
    ``EXIT_INTERNAL_ERROR`` (70) on anything else (a bug: bad input is dead-lettered, never
    raised). The log line says why and what to do. Nothing of the failed batch is committed:
    the event consumer commits a batch's offsets only after this returns and the batch's
    outputs were delivered, so the batch is read again after the restart (what an attempt did
    write is recognised by the feature watermark, and its outputs are published again from its
    outbox entry: docs/delivery.md).
    """
    try:
        # Outputs are handed to the producer here; the event consumer waits for their
        # delivery (RdKafkaSink.delivery) before it commits the batch's offsets.
        await retry_on_redis(lambda: worker.handle(records, lagging), deadline_s=deadline_s)
    except RedisBatchFailed as stop:
        log.critical(
            "Redis failed the batch; stopping the worker",
            extra={"code": stop.failure.code, "reason": str(stop)},
            exc_info=True,
        )
        logging.shutdown()
        os._exit(stop.exit_code)
    except Exception:
        log.critical("batch failed unexpectedly; stopping the worker", exc_info=True)
        logging.shutdown()
        os._exit(EXIT_INTERNAL_ERROR)


async def store_granted_offers(runtime: Runtime) -> None:
    """Store the offers the last batch granted, which would otherwise join their users' state
    with the worker's next batch (a revoke or a stop: that batch would be of other partitions,
    or never come). A failure is logged, not raised: the offers are still in the batch's
    outbox entry, and the partitions' next owner stores them from there."""
    engine = runtime.engine
    offers = engine.take_granted_offers()
    if not offers:
        return
    try:
        stored = await runtime.features.store_now(
            offers, allowed_lateness_ms=engine.config.allowed_lateness_ms
        )
        log.info(
            "stored %d of %d granted offer(s) before giving the partitions up", stored, len(offers)
        )
    except (StreamsError, OSError, aioredis.RedisError) as exc:
        log.warning(
            "could not store %d granted offer(s) before giving the partitions up (%s): their "
            "next owner stores them from the outbox",
            len(offers),
            type(exc).__name__,
        )


class _FollowAssignment:
    """The feature store and the status page, both told of every assignment change (the store
    first: it drops what it held of revoked partitions before anyone reads the status)."""

    def __init__(self, *observers: AssignmentObserver) -> None:
        self._observers = observers

    def on_assigned(self, partitions: Iterable[TopicPartitionKey]) -> None:
        keys = list(partitions)
        for observer in self._observers:
            observer.on_assigned(keys)

    def on_revoked(self, partitions: Iterable[TopicPartitionKey]) -> None:
        keys = list(partitions)
        for observer in self._observers:
            observer.on_revoked(keys)


def _faust_datadir(group_id: str) -> Path:
    """Faust's data folder: tables live in memory, so it stays empty; keep it out of the cwd."""
    path = Path(tempfile.gettempdir()) / "dealstream-faust" / group_id
    path.mkdir(parents=True, exist_ok=True)
    return path


class _ServingOnly(BootStrategy):
    """Faust without its Kafka consumer: no agents, tables or group of its own. The producer,
    the web server, timers and services start as usual."""

    enable_kafka_consumer = False


PRODUCER_STOP_S = 10.0
"""How long a clean stop waits for the outputs still queued to be acknowledged."""


class ProducerService(Service):
    """The outputs' producer as one of the app's services, added before the event consumer:
    Faust stops its services in reverse order, so the consumer's last batches are delivered
    and committed before the producer flushes (within ``PRODUCER_STOP_S``) and goes."""

    def __init__(self, sink: RdKafkaSink) -> None:
        super().__init__()
        self.sink = sink

    async def on_start(self) -> None:
        if not self.sink.started:
            await self.sink.start()

    async def on_stop(self) -> None:
        await self.sink.stop(PRODUCER_STOP_S)


class IdempotentProducer(AIOKafkaDriverProducer):
    """Faust's aiokafka producer, idempotent with ``acks=all``: a send the client retries
    (a lost acknowledgement, a leader change) is written once, in order. Faust turns
    idempotence on only with ``processing_guarantee="exactly_once"``, which needs its own
    consumer and transactions; ``producer_acks`` is its only durability setting. The worker's
    outputs do not go through it (``RdKafkaSink``); nothing of ours sends through it now, but
    Faust starts it with the app and would use it for anything it produces itself."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


def faust_credentials(security: KafkaSecurity) -> faust.types.auth.CredentialsT | None:
    """Faust's ``broker_credentials`` for ``security``: the same TLS context and SASL login
    as every other client of ours (``kafka_client_options``); None for plaintext."""
    options = kafka_client_options(security)
    if options.sasl_mechanism is not None:
        return faust.SASLCredentials(
            username=options.sasl_plain_username,
            password=options.sasl_plain_password,
            ssl_context=options.ssl_context,
            mechanism=options.sasl_mechanism,
        )
    if options.ssl_context is not None:
        return faust.SSLCredentials(options.ssl_context)
    return None


def faust_app_id(group_id: str) -> str:
    """The Faust app's id, apart from the events' consumer group.

    The event consumer joins ``group_id`` with aiokafka's ``range`` assignor; the lag probe,
    ``dealstream lag``, the metrics and the alerts read that group's offsets. Faust's consumer
    is disabled (``_ServingOnly``), but should it ever start one it would join the group named
    after the app id with Faust's own assignor protocol, and members of one group with no
    common protocol fail to join: the app gets its own id so that this can never happen.
    """
    return f"{group_id}-app"


def create_app(runtime: Runtime) -> faust.App:
    settings = runtime.settings
    app = faust.App(
        faust_app_id(settings.group_id),
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=faust_credentials(settings.kafka_security),
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        topic_replication_factor=settings.replication.factor,
        topic_partitions=settings.partitions,
        web_port=settings.http_port,
        web_bind=settings.http_bind,
        consumer_auto_offset_reset="earliest",
        autodiscover=False,
        # Tables live in memory; keep Faust's (empty) data folder out of the working directory.
        datadir=str(_faust_datadir(settings.group_id)),
        # Faust's own producer (the outputs go through RdKafkaSink): durable all the same.
        producer_acks=-1,
        producer_linger=0.005,
        # Dead letters are cut to fit this (DecodeLimits.max_dead_letter_bytes).
        producer_max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        web_router_enabled=False,
        web_tables_enabled=False,
    )
    app.producer = IdempotentProducer(app.transport, loop=app.loop, beacon=app.beacon)
    sink = runtime.sink
    worker = BatchWorker(
        runtime.engine,
        sink,
        topics=settings.topics,
        limits=DecodeLimits(
            max_message_bytes=settings.max_message_bytes,
            max_clock_skew_ms=int(settings.max_clock_skew_s * 1000),
        ),
        metrics=runtime.metrics,
        crash_points=runtime.crash_points,
        batch_max=settings.batch_max,
        pseudonyms=runtime.pseudonyms,
        reply_wait=runtime.reply_wait,
    )
    runtime.metrics.events_held.set_function(worker.aligner.held)
    status = WorkerStatus(
        worker,
        redis=runtime.redis,
        group=settings.group_id,
        redis_prefix=settings.redis_prefix,
        probe=LagProbe(settings.kafka_bootstrap, security=settings.kafka_security),
        model_store=ModelStore(runtime.redis, prefix=settings.redis_prefix),
    )
    app.boot_strategy = _ServingOnly(app)
    install_routes(app, status, settings.http_token)

    stopping: list[asyncio.Future[None]] = []
    """Fault tests only (``stop_consumer``): the consumer's stop, kept referenced."""

    async def handle(records: Sequence[RawRecord], lagging: Collection[TopicPartitionKey]) -> None:
        await _handle_until_done(
            worker, records, lagging, deadline_s=settings.redis_retry_deadline_s
        )
        if runtime.crash_points.stop_consumer_now():
            stopping.append(asyncio.ensure_future(consumer.stop()))

    resume = ResumeFromRedis(runtime.features.watermarks)
    recover = RecoverOutbox(runtime.outbox, runtime.features, runtime.engine, worker)

    async def on_assigned(consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]) -> None:
        # Rewinds first (Redis lost writes: those batches run again, entries and all), then
        # the outputs and granted offers of batches a stopped worker left behind.
        await resume(consumer, partitions)
        await recover(consumer, partitions)

    async def on_revoking() -> None:
        await store_granted_offers(runtime)

    # Faust starts it (an instance is accepted, though typed as a class) after the outputs'
    # producer (ProducerService, added first) and stops it before: the last batches are
    # delivered and committed while the producer is still up.
    consumer = EventConsumer(
        bootstrap=settings.kafka_bootstrap,
        group_id=settings.group_id,
        topics=settings.topics.events,
        handle=handle,
        sink=sink,
        batch_max=settings.batch_max,
        batch_within_s=settings.batch_within_s,
        session_timeout_s=settings.session_timeout_s,
        # The worker drops the events its aligner held of revoked partitions.
        observer=_FollowAssignment(runtime.features, worker, runtime.outbox, status),
        on_assigned=on_assigned,
        on_revoking=on_revoking,
        on_committed=runtime.outbox.committed,
        crash_points=runtime.crash_points,
        held=worker.aligner,
        prepare=worker.decode_ahead,  # decodes batch k+1 while batch k waits on Redis
        client_options=kafka_client_options(settings.kafka_security).kwargs(),
    )
    status.consumer = consumer
    app.service(ProducerService(sink))  # type: ignore[arg-type]
    app.service(consumer)  # type: ignore[arg-type]

    @app.timer(interval=HEARTBEAT_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def heartbeat() -> None:
        status.heartbeat.beat()

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
