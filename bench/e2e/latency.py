"""Decision latency at fixed offered rates: event time to offer produced.

One worker runs on its own topics. For each phase the load generator sends simulated events at
a fixed rate with ``ts`` = the wall clock at send; a consumer of the offers topic takes each
offer's Kafka timestamp (CreateTime, set by the worker's producer) minus its ``issued_at`` (the
trigger's event time). Offers whose trigger was sent during the phase's first ``warmup_s``
seconds are discarded; percentiles come from the rest.

The load generator shares the machine with the worker, Kafka and Redis, so it is kept cheap:
each phase's events are simulated before it starts, and they are sent through librdkafka
(the worker's own producer library, ``acks=all``, linger 1 ms) rather than aiokafka, which
took about half a core at 5,000 events/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import Any

import confluent_kafka
import orjson
from aiokafka import AIOKafkaConsumer

from bench.e2e.common import Names, Worker, load_average, median, percentile, wait_consumed
from engine.analysis.simulation.world import open_loop

TICK_S = 0.002


@dataclass(frozen=True, slots=True)
class Phase:
    rate: float
    warmup_s: float
    window_s: float
    seed: int


class OfferClock:
    """Reads the offers topic in the background and keeps (issued_at, latency ms) pairs."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        self.samples: list[tuple[int, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    issued_at = int(orjson.loads(record.value)["issued_at"])
                    self.samples.append((issued_at, record.timestamp - issued_at))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()


class LoadProducer:
    """Sends the load generator's events through librdkafka; ``flush`` raises if any was not
    acknowledged."""

    def __init__(self, bootstrap: str) -> None:
        self._producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "linger.ms": 1,
                "partitioner": "murmur2_random",  # the Java client's: users keep their partition
            }
        )
        self.failed: list[str] = []

    def _on_delivery(self, error: Any, message: Any) -> None:
        if error is not None:
            self.failed.append(str(error))

    def send(self, topic: str, value: bytes, key: bytes) -> None:
        self._producer.produce(topic, value, key, on_delivery=self._on_delivery)

    def poll(self) -> None:
        self._producer.poll(0)

    async def flush(self) -> None:
        left = await asyncio.to_thread(self._producer.flush, 60)
        if left or self.failed:
            raise RuntimeError(f"load generator: {left} unsent, failures {self.failed[:3]}")


async def _offer_at_rate(
    producer: LoadProducer, names: Names, phase: Phase, users: int
) -> tuple[int, int, int]:
    """Send at ``phase.rate`` events/s for warm-up + window; returns (sent, window start ms,
    window end ms) in wall-clock epoch ms."""
    total = int(phase.rate * (phase.warmup_s + phase.window_s))
    topics = names.topics
    by_kind = {"browse": topics.browse, "search": topics.search, "purchase": topics.purchase}
    # The world's event times at this rate; each is replaced by the wall clock at send.
    stream = open_loop(users=users, events=total, seed=phase.seed, mean_gap_ms=1000.0 / phase.rate)
    events = [
        (by_kind[str(event["type"])], str(event["user_id"]).encode(), event)
        for event in itertools.islice(stream, total)
    ]
    started = time.monotonic()
    start_ms = int(time.time() * 1000)
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - started) * phase.rate) + 1)
        while sent < due:
            topic, key, event = events[sent]
            event["ts"] = int(time.time() * 1000)
            producer.send(topic, orjson.dumps(event), key)
            sent += 1
        producer.poll()
        await asyncio.sleep(TICK_S)
    await producer.flush()
    window_start = start_ms + int(phase.warmup_s * 1000)
    return sent, window_start, int(time.time() * 1000)


async def measure_latency(
    *,
    bootstrap: str,
    redis_url: str,
    names: Names,
    log_dir: Any,
    worker_env: dict[str, str],
    rates: list[float],
    runs: int,
    warmup_s: float,
    window_s: float,
    users: int,
) -> dict[str, Any]:
    worker = Worker(
        names, bootstrap=bootstrap, redis_url=redis_url, log_dir=log_dir, extra=worker_env
    )
    clock = OfferClock(bootstrap, names.topics.offers)
    producer = LoadProducer(bootstrap)
    worker.start()
    results: dict[str, Any] = {}
    try:
        await clock.start()
        produced = 0
        # Warm-up: the worker joins its group, loads the campaigns and sees a first batch.
        sent, _, _ = await _offer_at_rate(producer, names, Phase(200, 2, 0, 1000), users)
        produced += sent
        await wait_consumed([worker], produced, timeout_s=120)
        for rate in rates:
            phase_runs = []
            for run in range(runs):
                load = load_average()
                phase = Phase(rate, warmup_s, window_s, seed=2000 + 100 * int(rate) + run)
                sent, window_start, window_end = await _offer_at_rate(producer, names, phase, users)
                produced += sent
                await wait_consumed([worker], produced, timeout_s=120)
                await asyncio.sleep(1.0)  # let the offer consumer catch up
                lat = sorted(
                    ms for issued, ms in clock.samples if window_start <= issued <= window_end
                )
                phase_runs.append(
                    {
                        "offered_rate": rate,
                        "sent": sent,
                        "offers_in_window": len(lat),
                        "p50_ms": percentile(lat, 50),
                        "p95_ms": percentile(lat, 95),
                        "p99_ms": percentile(lat, 99),
                        "max_ms": lat[-1] if lat else float("nan"),
                        "load_average": load,
                    }
                )
            results[str(int(rate))] = {
                "offered_rate": int(rate),
                "p50_ms": median(r["p50_ms"] for r in phase_runs),
                "p95_ms": median(r["p95_ms"] for r in phase_runs),
                "p99_ms": median(r["p99_ms"] for r in phase_runs),
                "runs": phase_runs,
            }
    finally:
        await clock.stop()
        await worker.stop()
    return results
