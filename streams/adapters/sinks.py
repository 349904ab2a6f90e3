"""The record sinks (``engine.ports.RecordSink``): where output records go, one class per way
of producing to Kafka.

- ``RdKafkaSink``: the live worker's outputs, through librdkafka (the worker's event consumer
  waits for each batch's ``delivery`` before it commits the batch's offsets);
- ``ProducerSink``: a plain idempotent aiokafka producer (``dealstream simulate``);
- ``BatchSink``: records packed into per-partition batches, for bulk replays
  (``dealstream replay``).

``BatchSink`` exists because a bulk replay is bound by the client's per-record cost
(``AIOKafkaProducer.send`` creates a future and hashes the key for every record). It picks the
partition itself, with the key hash every Kafka client uses by default (murmur2, positive,
modulo the partition count; cached per user) so records land where a shop's producer would put
them, appends records to one open batch per partition and hands full batches to the producer.
Order per partition is the order of ``send`` calls: a partition's batches are queued in order,
and aiokafka sends one request per broker at a time and puts a retried batch back at the front
of its queue. ``flush`` ships the open batches and waits until Kafka has acknowledged every one.

Every sink's ``delivery`` (or ``flush``) covers the records sent since the last one: a batch's
acknowledgement is its own records', never those sent after it (the producer's own ``flush``
would wait for every batch it holds, including the next micro-batch's). The aiokafka sinks
gather the records' futures; ``RdKafkaSink`` counts acknowledgements per batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import confluent_kafka
from aiokafka import AIOKafkaProducer
from dealstream_native import default_partition

from streams.adapters.kafka_io import (
    PRODUCER_MAX_REQUEST_BYTES,
    kafka_client_options,
    quiet_logger,
)
from streams.errors import EXIT_INTERNAL_ERROR, ConfigError, ServiceUnavailable, SinkError
from streams.settings import KafkaSecurity

log = logging.getLogger("dealstream.worker")


class RdKafkaSink:
    """The live worker's outputs, through librdkafka (confluent-kafka): idempotent, ``acks=all``.

    Why librdkafka: it costs about 3.5 µs of CPU per record where aiokafka costs about 17 µs
    (docs/performance.md). ``send`` hands a record to librdkafka's queue and returns;
    ``delivery`` seals the records sent since the last one into a batch and returns a future
    that completes once Kafka acknowledged every one of them (or fails with the first error).
    The worker's event consumer (``streams/worker/consumer.py``) takes one after every batch and
    commits the batch's offsets only when it completes.

    Delivery reports: librdkafka runs a record's callback inside ``poll``, on the thread that
    calls it. The event loop calls ``poll(0)`` (never blocking) on a timer: every
    ``POLL_BUSY_S`` while a batch waits for its acknowledgements, every ``POLL_IDLE_S``
    otherwise (librdkafka's logs and errors), and at once when ``delivery`` seals a batch. So
    the callbacks, which count each batch's acknowledged records, run on the loop, and no
    thread hands results over; measured against a thread that polls and wakes the loop, it
    costs the same CPU per record and acknowledges a lone record with a lower p99
    (docs/performance.md). A delivery that fails for good (after librdkafka's own retries, up
    to ``message.timeout.ms``) stops the worker at once (``on_failure``, exit 70) rather than
    carrying on without that output; its inputs are read again after the restart and its
    outputs published again from the batch's outbox entry (docs/delivery.md).

    Order per partition: librdkafka's idempotent producer keeps it through retries. Keys are
    partitioned as Kafka's default partitioner does (``murmur2_random``, as aiokafka and the
    Java client do; librdkafka's own default is CRC32). A full queue (``BufferError``) is
    polled, waited out and the record sent again, never dropped.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        security: KafkaSecurity | None = None,
        on_failure: FailureHandler | None = None,
        **config: str | int | bool,
    ) -> None:
        """``config``: librdkafka properties that override ours (tests); ``on_failure``: told
        of a failed delivery on the event loop (default: stop the worker, exit 70)."""
        self.bootstrap = bootstrap
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "client.id": "dealstream-worker",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": LINGER_MS,
            "partitioner": "murmur2_random",
            "message.max.bytes": PRODUCER_MAX_REQUEST_BYTES,
            "message.timeout.ms": DELIVERY_TIMEOUT_MS,
            **kafka_client_options(security).librdkafka(),
            **config,
            "logger": logging.getLogger(LIBRDKAFKA_LOGGER),
            "error_cb": self._on_error,
        }
        self._on_failure = on_failure or stop_on_failed_delivery
        self._producer: confluent_kafka.Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_busy = False
        self._open = _Batch()
        self._sealed: list[_Batch] = []
        """Batches handed out by ``delivery`` and not yet complete."""
        self._errors: list[confluent_kafka.KafkaError] = []
        """Client-wide errors librdkafka reported while starting; the start says the first."""
        self._failed = False

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The librdkafka properties the producer is (or will be) created with."""
        return dict(self._config)

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self, timeout_s: float = 10.0) -> None:
        """Create the producer and ask Kafka for its metadata: a login or TLS handshake the
        broker refuses is a ``ServiceUnavailable`` that says why, within ``timeout_s``, not a
        start that hangs."""
        self._loop = asyncio.get_running_loop()
        try:
            producer = confluent_kafka.Producer(self._config)
        except confluent_kafka.KafkaException as exc:
            raise ConfigError(
                f"the worker's Kafka producer refused its configuration ({exc.args[0].str()}): "
                "check DEALSTREAM_KAFKA_SECURITY_PROTOCOL, DEALSTREAM_KAFKA_SASL_* and "
                "DEALSTREAM_KAFKA_SSL_*"
            ) from None
        # Metadata in a thread (librdkafka blocks); meanwhile the loop serves librdkafka's
        # errors, so that a refused login or certificate fails the start at once.
        metadata = asyncio.ensure_future(asyncio.to_thread(producer.list_topics, None, timeout_s))
        refused: confluent_kafka.KafkaError | None = None
        with quiet_logger(LIBRDKAFKA_LOGGER):  # a failed start says why in one line
            while refused is None and not metadata.done():
                await asyncio.wait((metadata,), timeout=POLL_IDLE_S)
                producer.poll(0)
                refused = next((e for e in self._errors if e.code() in _REFUSALS), None)
        if refused is not None or metadata.exception() is not None:
            if not metadata.done():
                metadata.add_done_callback(lambda done: done.cancelled() or done.exception())
            why = (refused or (self._errors or [_error_of(metadata.exception())])[0]).str()
            raise ServiceUnavailable(
                f"Kafka at {self.bootstrap} refused or did not answer the worker's producer "
                f"({why}): check DEALSTREAM_KAFKA_BOOTSTRAP, "
                "DEALSTREAM_KAFKA_SECURITY_PROTOCOL, DEALSTREAM_KAFKA_SASL_* and "
                "DEALSTREAM_KAFKA_SSL_*"
            ) from None
        self._producer = producer
        self._arm()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued, for at most ``timeout_s``, then let the producer go. What is
        left undelivered was never committed: its batches' outbox entries publish it again."""
        producer = self._producer
        if producer is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(producer) and loop.time() < deadline:
            self._poll()
            await asyncio.sleep(POLL_BUSY_S)
        self._poll()
        left = len(producer)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._producer = None
        if left:
            log.warning(
                "%d output record(s) not acknowledged within %.0f s of the stop; they are "
                "published again from the outbox on the next start",
                left,
                timeout_s,
            )

    # -- RecordSink ----------------------------------------------------------------------------

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        producer = self._producer
        if producer is None:
            raise SinkError("the worker's producer is not started")
        batch = self._open
        while True:
            try:
                producer.produce(
                    topic,
                    value,
                    key,
                    on_delivery=batch.acknowledged,
                    timestamp=timestamp_ms or 0,  # 0: now, as CreateTime
                    headers=list(headers) if headers else None,
                )
                break
            except BufferError:  # librdkafka's queue is full: serve reports, wait, again
                self._poll()
                await asyncio.sleep(POLL_BUSY_S)
            except confluent_kafka.KafkaException as exc:
                raise SinkError(
                    f"librdkafka refused a record of {len(value)} bytes for {topic} "
                    f"({exc.args[0].str()})"
                ) from None
        batch.sent += 1

    async def flush(self) -> None:
        """Wait until Kafka acknowledged everything sent so far; raise if a record failed."""
        await (await self.delivery())

    async def delivery(self) -> Awaitable[object]:
        batch, self._open = self._open, _Batch()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if batch.sent == 0:
            future.set_result(None)
            return future
        batch.future = future
        self._sealed.append(batch)
        self._poll()  # acknowledged already?
        self._arm()
        return future

    # -- delivery reports ----------------------------------------------------------------------

    def _poll(self) -> None:
        """Run librdkafka's callbacks due now (without waiting), then settle the batches
        (even when none ran now: a batch's records may all have been acknowledged by earlier
        polls, before ``delivery`` sealed it)."""
        if self._producer is None:
            return
        self._producer.poll(0)
        if self._sealed or self._open.error is not None:
            self._settle()

    def _tick(self) -> None:
        self._timer = None
        self._poll()
        self._arm()

    def _arm(self) -> None:
        """Keep one timer: soon while a batch waits, slowly otherwise."""
        busy = bool(self._sealed)
        if self._timer is not None:
            if self._timer_busy or not busy:
                return
            self._timer.cancel()
        if self._loop is not None and self._producer is not None:
            self._timer = self._loop.call_later(POLL_BUSY_S if busy else POLL_IDLE_S, self._tick)
            self._timer_busy = busy

    def _on_error(self, error: confluent_kafka.KafkaError) -> None:
        """librdkafka's client-wide errors: a broker down, a refused login (it retries those
        itself, and its log, ``dealstream.librdkafka``, says them). A fatal one (the idempotent
        producer's state is lost) stops the worker."""
        if self._producer is None:  # starting: ``start`` says the first one
            if len(self._errors) < 10:
                self._errors.append(error)
            return
        if error.fatal():
            self._fail(SinkError(f"the worker's Kafka producer failed for good ({error.str()})"))

    def _settle(self) -> None:
        """Fail on any record's error, complete the batches fully acknowledged (not
        necessarily in order: a later batch may be on other partitions)."""
        for batch in (*self._sealed, self._open):
            if batch.error is not None:
                self._fail(SinkError(f"an output record was not delivered ({batch.error})"))
                return
        waiting: list[_Batch] = []
        for batch in self._sealed:
            if batch.acked < batch.sent:
                waiting.append(batch)
            elif batch.future is not None and not batch.future.done():
                batch.future.set_result(None)
        self._sealed = waiting

    def _fail(self, exc: SinkError) -> None:
        for batch in self._sealed:
            if batch.future is not None and not batch.future.done():
                batch.future.set_exception(exc)
        self._sealed = []
        if not self._failed:
            self._failed = True
            self._on_failure(exc)


class _Batch:
    """The records sent between two ``delivery`` calls, and how many Kafka acknowledged."""

    __slots__ = ("acked", "error", "future", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.error: str | None = None
        self.future: asyncio.Future[None] | None = None

    def acknowledged(
        self, error: confluent_kafka.KafkaError | None, message: confluent_kafka.Message
    ) -> None:
        if error is not None and self.error is None:
            self.error = f"{message.topic()}: {error.str()}"
        self.acked += 1


FailureHandler = Callable[[BaseException], None]

LIBRDKAFKA_LOGGER = "dealstream.librdkafka"
"""librdkafka's own log lines (served by ``poll``, on the loop) go to this logger."""
LINGER_MS = 1
"""How long librdkafka waits to fill a batch. A batch's offsets are committed once its outputs
are acknowledged, and the next batch but one waits for that commit, so the linger is part of
every batch's cycle at low rates: at 5,000 events/s, 5 ms gave a decision latency p99 of
40-44 ms, 1 ms 29-33 ms (docs/performance.md)."""
DELIVERY_TIMEOUT_MS = 1_200_000
"""How long librdkafka retries a record before it fails for good and stops the worker: 20 min,
as Faust's producer before (``producer_request_timeout``). A Kafka outage shorter than that
holds the commits back, then everything goes through."""
POLL_BUSY_S = 0.001
"""How often the loop polls while a batch waits: at most this much is added to a delivery."""
POLL_IDLE_S = 0.1
_REFUSALS = frozenset(
    {
        confluent_kafka.KafkaError._AUTHENTICATION,
        confluent_kafka.KafkaError._SSL,
        confluent_kafka.KafkaError.SASL_AUTHENTICATION_FAILED,
        confluent_kafka.KafkaError.UNSUPPORTED_SASL_MECHANISM,
        confluent_kafka.KafkaError.ILLEGAL_SASL_STATE,
    }
)
"""librdkafka's errors that no retry fixes: the start fails on the first one."""


def _error_of(exc: BaseException | None) -> confluent_kafka.KafkaError:
    arg = exc.args[0] if exc is not None and exc.args else None
    if isinstance(arg, confluent_kafka.KafkaError):
        return arg
    return confluent_kafka.KafkaError(confluent_kafka.KafkaError._FAIL, str(exc))


def stop_on_failed_delivery(exc: BaseException) -> None:
    """The worker's reaction to an output Kafka would not take: stop at once (exit 70), so that
    the supervisor restarts it and the batch is read again (nothing of it was committed)."""
    log.critical("delivery failed for good (%s); stopping the worker", exc)
    logging.shutdown()
    os._exit(EXIT_INTERNAL_ERROR)


class ProducerSink:
    """An aiokafka producer as a ``RecordSink``; sends are not awaited one
    by one: ``flush`` waits for every pending delivery."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._pending: list[asyncio.Future[Any]] = []

    @classmethod
    def create(
        cls, bootstrap: str, *, security: KafkaSecurity | None = None, **options: Any
    ) -> ProducerSink:
        options.setdefault("linger_ms", 5)
        options.setdefault("acks", "all")
        options.setdefault("enable_idempotence", True)
        options.update(kafka_client_options(security).kwargs())
        return cls(AIOKafkaProducer(bootstrap_servers=bootstrap, **options))

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self.flush()
        await self._producer.stop()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        future = await self._producer.send(
            topic,
            value=value,
            key=key,
            headers=list(headers) if headers else None,
            timestamp_ms=timestamp_ms,
        )
        self._pending.append(future)
        if len(self._pending) >= 10_000:
            await self.flush()

    async def flush(self) -> None:
        await (await self.delivery())

    async def delivery(self) -> Awaitable[object]:
        pending, self._pending = self._pending, []
        return asyncio.gather(*pending)


BATCH_BYTES = 512 * 1024
"""Largest batch (and request size per partition); well under the broker's 1 MiB default."""


class BatchSink:
    """An idempotent ``acks=all`` producer fed whole batches; see the module docstring."""

    def __init__(
        self, bootstrap: str, *, security: KafkaSecurity | None = None, **options: Any
    ) -> None:
        options.setdefault("acks", "all")
        options.setdefault("enable_idempotence", True)
        options.setdefault("max_batch_size", BATCH_BYTES)
        options.setdefault("max_request_size", 2 * BATCH_BYTES)
        options.update(kafka_client_options(security).kwargs())
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **options)
        self._partitions: dict[str, int] = {}
        self._open: dict[tuple[str, int], Any] = {}
        self._pending: list[asyncio.Future[Any]] = []

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self, *, flush: bool = True) -> None:
        """Flush (unless a failure is being handled: then pending records are dropped) and
        close the producer."""
        try:
            if flush:
                await self.flush()
        finally:
            await self._producer.stop()

    async def _count(self, topic: str) -> int:
        partitions = await self._producer.partitions_for(topic)
        self._partitions[topic] = count = len(partitions)
        return count

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        if key is None:
            raise SinkError("replayed records need a key (the user id)")
        count = self._partitions.get(topic) or await self._count(topic)
        where = (topic, default_partition(key, count))
        batch = self._open.get(where)
        if batch is None:
            batch = self._open[where] = self._producer.create_batch()
        record = {"timestamp": timestamp_ms, "key": key, "value": value, "headers": headers or []}
        if batch.append(**record) is None:  # full: ship it, start another
            await self._ship(where)
            batch = self._open[where] = self._producer.create_batch()
            if batch.append(**record) is None:
                raise SinkError(f"a record of {len(value)} bytes does not fit in one batch")

    async def _ship(self, where: tuple[str, int]) -> None:
        batch = self._open.pop(where)
        batch.close()
        topic, partition = where
        self._pending.append(await self._producer.send_batch(batch, topic, partition=partition))

    async def flush(self) -> None:
        """Ship every open batch and wait until Kafka acknowledged all (raises on failure)."""
        await (await self.delivery())

    async def delivery(self) -> Awaitable[object]:
        for where in list(self._open):
            await self._ship(where)
        pending, self._pending = self._pending, []
        return asyncio.gather(*pending)
