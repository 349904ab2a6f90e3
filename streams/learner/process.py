"""``dealstream learner``: learn the training topic in order, publish signed model snapshots.

The learner resumes from the latest snapshot in Redis, reads ``<prefix>training`` (consumer
group ``<group_id>-learner``), scores each example before learning it (prequential metrics),
and every ``snapshot_every`` records or ``snapshot_interval_s`` seconds publishes a snapshot.

Exactly once: each snapshot is published together (one atomic Redis call) with a checkpoint
of the Kafka offsets it includes; the offsets are committed to Kafka only after that. On start
the learner seeks every partition to the checkpoint's offsets, so examples learned after the
last snapshot are learned again exactly once, whether or not their offsets reached Kafka.
The Kafka commit keeps consumer-lag tools honest; the checkpoint is what the learner trusts.

Each example once: a copy of an example read within the last ``dedup_window`` offsets of its
partition (a worker re-published its batch after a crash) is skipped and counted as a
duplicate (``streams.learner.dedup``). On start the learner reads those offsets before its
checkpoint's again, remembering without learning, so a restart recognises the same copies.

One learner at a time: a Redis lease (renewed while running, checked atomically by every
publish) makes a second learner wait, and a stalled one stop, instead of both publishing.
The learner assigns itself every partition of the topic at start (no group rebalances);
partitions added later are read after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from engine.errors import InvalidEvent
from engine.model.feedback import TrainingExample
from engine.model.prequential import OnlineLearner, PrequentialMetrics
from engine.model.signing import signing_key_from_pem
from streams.adapters.kafka_io import (
    check_kafka,
    check_redis,
    ensure_topics,
    kafka_client_options,
)
from streams.adapters.model_store import LeaseLost, ModelStore
from streams.adapters.redis_client import RedisClient, redis_from_settings
from streams.errors import ConfigError
from streams.learner.dedup import RecentExamples, example_key
from streams.learner.http_endpoints import (
    LearnerHealth,
    LearnerMetrics,
    learner_routes,
    serve_learner_http,
)
from streams.settings import ENV_PREFIX, KafkaSecurity, LearnerSettings, Settings

log = logging.getLogger("dealstream.learner")

_LOGGED_INVALID = 20
"""Invalid training records logged one by one; later ones only count."""
_LOGGED_DUPLICATES = 20
"""Duplicates logged one by one; later ones only count (a crash brings a batch of them)."""


@dataclass(slots=True)
class LearnerCounters:
    consumed: int = 0
    """Records read to learn: learned + invalid + duplicates."""
    learned: int = 0
    invalid: int = 0
    duplicates: int = 0
    """Copies of an example already read within the dedup window: skipped."""
    snapshots: int = 0


def _partition_name(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


def _parse_offsets(raw: object) -> dict[TopicPartition, int]:
    offsets: dict[TopicPartition, int] = {}
    if isinstance(raw, dict):
        for name, offset in raw.items():
            topic, _, partition = str(name).rpartition(":")
            if topic and partition.isdigit() and isinstance(offset, int) and offset >= 0:
                offsets[TopicPartition(topic, int(partition))] = offset
    return offsets


async def topic_partitions(
    bootstrap: str, topic: str, *, security: KafkaSecurity | None = None
) -> list[int]:
    """The partition ids of ``topic`` (empty when it does not exist)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=15000,
        **kafka_client_options(security).kwargs(),
    )
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(
        int(partition["partition"])
        for entry in described
        if entry.get("topic") == topic and entry.get("error_code") == 0
        for partition in entry.get("partitions", [])
    )


class Learner:
    """The learning loop of ``dealstream learner``, without signals or preflight.

    ``run(stop)`` returns after ``stop`` is set, having published what it learned. Cancelling
    the task instead behaves like a crash: nothing more is published, the lease is released.
    """

    def __init__(
        self,
        settings: Settings,
        learner_settings: LearnerSettings,
        *,
        redis: RedisClient,
        clock: Callable[[], float] = time.monotonic,
        metrics: LearnerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.config = learner_settings
        self.store = ModelStore(
            redis,
            prefix=settings.redis_prefix,
            keep=learner_settings.keep_versions,
            signing_key=signing_key_from_pem(learner_settings.signing_key.reveal().encode()),
        )
        self.topic = settings.topics.training
        self.group_id = f"{settings.group_id}-learner"
        self.counters = LearnerCounters()
        self.metrics = metrics if metrics is not None else LearnerMetrics()
        self.health = LearnerHealth()
        self.online: OnlineLearner | None = None
        self.positions: dict[TopicPartition, int] = {}
        """Next offset to read per partition: everything before it has been learned."""
        self.recent = RecentExamples(learner_settings.dedup_window)
        self._clock = clock
        self._token = uuid.uuid4().hex
        self._since_snapshot = 0
        self._last_snapshot = clock()
        self._last_renew = clock()

    # -- life cycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if not await self._acquire_lease(stop):
            return
        try:
            trust_checkpoint = await self._resume()
            consumer = AIOKafkaConsumer(
                **kafka_client_options(self.settings.kafka_security).kwargs(),
                bootstrap_servers=self.settings.kafka_bootstrap,
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            await consumer.start()
            try:
                await self._assign(consumer, trust_checkpoint)
                await self._recall(consumer, stop)
                await self._loop(consumer, stop)
                if self._since_snapshot:
                    await self._snapshot(consumer)
            finally:
                await consumer.stop()
        finally:
            self._lease(False)
            with contextlib.suppress(Exception):
                await self.store.release_lease(self._token)

    def _lease(self, held: bool) -> None:
        self.health.lease_held = held
        self.metrics.lease_held.set(1 if held else 0)

    async def _acquire_lease(self, stop: asyncio.Event) -> bool:
        waiting = False
        while not stop.is_set():
            if await self.store.acquire_lease(self._token, self.config.lease_ttl_s):
                self._last_renew = self._clock()
                self._lease(True)
                return True
            if not waiting:
                log.warning(
                    "another learner holds %s; waiting for it to stop (or its lease to expire)",
                    self.store.lease_key,
                )
                waiting = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(1.0, self.config.lease_ttl_s / 3))
        return False

    async def _resume(self) -> bool:
        """Load the latest model and its checkpoint; True when the checkpoint is to be trusted."""
        loaded = await self.store.load_latest()
        if loaded is None:
            self.online = OnlineLearner(
                window=self.config.metrics_window, feedback=self.settings.feedback
            )
            log.info("no published model under %s: starting a fresh one", self.store.latest_key)
            return True  # nothing learned yet: read every partition from its beginning
        model = loaded.model
        checkpoint = await self.store.checkpoint()
        if checkpoint is None or checkpoint.get("version") != model.version:
            self.online = OnlineLearner(
                model, window=self.config.metrics_window, feedback=self.settings.feedback
            )
            log.warning(
                "model %s has no matching checkpoint: resuming from the Kafka group's offsets",
                model.version,
            )
            return False
        self.positions = _parse_offsets(checkpoint.get("offsets"))
        self.online = OnlineLearner(
            model, self._metrics_from(checkpoint), feedback=self.settings.feedback
        )
        last = checkpoint.get("last_labeled_at")
        self.online.last_labeled_at = last if isinstance(last, int) else None
        log.info("resuming model %s from its checkpoint", model.version)
        return True

    def _metrics_from(self, checkpoint: Mapping[str, Any]) -> PrequentialMetrics:
        state = checkpoint.get("metrics")
        if isinstance(state, dict):
            with contextlib.suppress(ValueError):
                metrics = PrequentialMetrics.from_state(state)
                if metrics.window == self.config.metrics_window:
                    return metrics
        return PrequentialMetrics(self.config.metrics_window)

    async def _assign(self, consumer: AIOKafkaConsumer, trust_checkpoint: bool) -> None:
        partitions = await topic_partitions(
            self.settings.kafka_bootstrap, self.topic, security=self.settings.kafka_security
        )
        if not partitions:
            raise ConfigError(f"topic {self.topic} does not exist; run `dealstream topics`")
        assigned = [TopicPartition(self.topic, p) for p in partitions]
        consumer.assign(assigned)
        self.health.assigned = len(assigned)
        for tp in assigned:
            if tp in self.positions:
                consumer.seek(tp, self.positions[tp])
            elif trust_checkpoint:  # the model holds nothing from this partition
                await consumer.seek_to_beginning(tp)
            # else: the group's committed offset, or the earliest one

    async def _recall(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        """Remember (without learning) the records of the ``dedup_window`` offsets before
        each partition's position: the window the learner had when it stopped there."""
        assigned = list(consumer.assignment())
        starts = {tp: await consumer.position(tp) for tp in assigned}
        firsts = await consumer.beginning_offsets(assigned)
        ends = await consumer.end_offsets(assigned)
        pending: dict[TopicPartition, int] = {}
        for tp, start in starts.items():
            stop_at = min(start, ends[tp])  # a position past the log's end: a recreated topic
            first = max(firsts[tp], start - self.recent.window)
            self.recent.advance(tp, first)
            if first < stop_at:
                consumer.seek(tp, first)
                pending[tp] = stop_at
        read = 0
        began = time.monotonic()
        while pending and not stop.is_set():
            batches = await consumer.getmany(
                *pending, timeout_ms=int(self.config.poll_timeout_s * 1000)
            )
            for tp, records in batches.items():
                stop_at = pending.get(tp, -1)
                for record in records:
                    if record.offset >= stop_at:
                        break
                    self.recent.add(tp, record.offset, self._key_of(record))
                    read += 1
            for tp, stop_at in list(pending.items()):
                if await consumer.position(tp) >= stop_at:
                    del pending[tp]
            if self._clock() - self._last_renew >= self.config.lease_ttl_s / 3:
                await self._renew()  # a long recall (many partitions) must keep the lease
        for tp, start in starts.items():
            self.recent.advance(tp, start)
            consumer.seek(tp, start)
        if read:
            log.info(
                "recalled %d training records (%d examples) before the resume offsets in %.1f s "
                "to recognise their copies",
                read,
                len(self.recent),
                time.monotonic() - began,
            )

    # -- the loop -----------------------------------------------------------------------------

    async def _loop(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        timeout_ms = int(self.config.poll_timeout_s * 1000)
        while not stop.is_set():
            batches = await consumer.getmany(
                timeout_ms=timeout_ms, max_records=self.config.batch_max
            )
            for tp, records in batches.items():
                for record in records:
                    self.learn_record(tp, record)
                    if self._since_snapshot >= self.config.snapshot_every:
                        await self._snapshot(consumer)
            self._observe_lag(consumer)
            now = self._clock()
            if (
                self._since_snapshot
                and now - self._last_snapshot >= self.config.snapshot_interval_s
            ):
                await self._snapshot(consumer)
            elif now - self._last_renew >= self.config.lease_ttl_s / 3:
                await self._renew()

    def _observe_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Records not yet learned per partition, from the fetcher's high watermarks."""
        lags: dict[int, int] = {}
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is not None:
                lags[tp.partition] = end - self.positions.get(tp, end)
        self.metrics.observe_lag(lags)

    def learn_record(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        """The learner step: learn one record of the training topic, unless it is invalid or
        a copy of an example read within the dedup window (both counted and skipped)."""
        assert self.online is not None
        self.counters.consumed += 1
        try:
            example = TrainingExample.from_message(orjson.loads(record.value or b""))
        except (InvalidEvent, orjson.JSONDecodeError) as exc:
            self.counters.invalid += 1
            self.metrics.records.labels(result="invalid").inc()
            # The first few are logged; the count is in every snapshot line.
            level = logging.WARNING if self.counters.invalid <= _LOGGED_INVALID else logging.DEBUG
            log.log(
                level,
                "skipping training record %s:%d@%d: %s",
                tp.topic,
                tp.partition,
                record.offset,
                exc,
            )
            key = None
        else:
            key = example_key(example)
            if key in self.recent:
                self.counters.duplicates += 1
                self.metrics.records.labels(result="duplicate").inc()
                level = (
                    logging.WARNING
                    if self.counters.duplicates <= _LOGGED_DUPLICATES
                    else logging.DEBUG
                )
                log.log(
                    level,
                    "skipping training record %s:%d@%d: decision %s (%s) was read before",
                    tp.topic,
                    tp.partition,
                    record.offset,
                    example.decision_id,
                    example.kind,
                )
            else:
                self.online.learn(example)
                self.counters.learned += 1
                self.metrics.records.labels(result="learned").inc()
        self.recent.add(tp, record.offset, key)
        self.positions[tp] = record.offset + 1
        self._since_snapshot += 1

    @staticmethod
    def _key_of(record: ConsumerRecord[Any, Any]) -> str | None:
        """``example_key`` of a record's example; None when it holds no valid one."""
        try:
            return example_key(TrainingExample.from_message(orjson.loads(record.value or b"")))
        except (InvalidEvent, orjson.JSONDecodeError):
            return None

    async def _renew(self) -> None:
        if not await self.store.renew_lease(self._token, self.config.lease_ttl_s):
            raise LeaseLost(
                f"lost the learner lease ({self.store.lease_key}): another learner took over"
            )
        self._last_renew = self._clock()

    async def _snapshot(self, consumer: AIOKafkaConsumer) -> None:
        """Publish the model with the offsets it includes, then commit those offsets."""
        assert self.online is not None
        await self._renew()
        positions = dict(self.positions)
        checkpoint = {
            "offsets": {_partition_name(tp): offset for tp, offset in positions.items()},
            "metrics": self.online.metrics.to_state(),
            "last_labeled_at": self.online.last_labeled_at,
        }
        await self.store.publish(self.online.model, checkpoint=checkpoint, lease_token=self._token)
        self.counters.snapshots += 1
        self._since_snapshot = 0
        self._last_snapshot = self._clock()
        status = self.status()
        self.metrics.observe_snapshot(time.time())
        self.metrics.observe_status(status)
        log.info("snapshot", extra={"status": status})
        try:
            await consumer.commit(positions)
        except KafkaError as exc:  # the checkpoint in Redis is what a restart trusts
            log.warning("committing offsets to Kafka failed (%s); will retry next time", exc)

    def status(self) -> dict[str, Any]:
        """Counters, model version and prequential metrics (JSON-safe, no NaN)."""
        online = self.online.as_dict() if self.online is not None else {}
        return {
            **online,
            "consumed": self.counters.consumed,
            "learned": self.counters.learned,
            "invalid": self.counters.invalid,
            "duplicates": self.counters.duplicates,
            "snapshots": self.counters.snapshots,
        }


def run_learner(settings: Settings, learner_settings: LearnerSettings) -> int:
    """``dealstream learner``: run until SIGINT/SIGTERM, then publish and exit 0.

    Unreachable services or a snapshot that does not verify raise one-line errors
    (``StreamsError`` / ``EngineError``) for the CLI to print.
    """
    return asyncio.run(_main(settings, learner_settings))


async def _main(settings: Settings, config: LearnerSettings) -> int:
    client = redis_from_settings(settings)
    try:
        await check_redis(client, settings.redis_url.reveal())
        await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
        await ensure_topics(
            settings.kafka_bootstrap,
            [settings.topics.training],
            partitions=settings.partitions,
            replication=settings.replication,
            security=settings.kafka_security,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        learner = Learner(settings, config, redis=client)
        runner = None
        if config.http_port:
            routes = learner_routes(
                learner.metrics, learner.health, learner.status, settings.http_token
            )
            try:
                runner = await serve_learner_http(routes, config.http_port, settings.http_bind)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve the learner's /metrics on port {config.http_port} ({exc}); "
                    f"set {ENV_PREFIX}LEARNER_HTTP_PORT to a free port, or 0 for none"
                ) from None
        try:
            await learner.run(stop)
        finally:
            if runner is not None:
                await runner.cleanup()
        return 0
    finally:
        await client.aclose()
