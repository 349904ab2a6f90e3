"""The worker's batch step without Faust or Kafka: where the per-event CPU of the worker goes.

Runs ``BatchWorker.handle`` in this process on the same simulated events, in batches of
``DEALSTREAM_BATCH_MAX``, against the real Redis (both Lua scripts) with a sink that only
encodes. Each batch is decoded while the one before waits for its Redis reply, as the event
consumer has the worker do when a fetch holds several batches. The difference between the
worker's CPU per event and this one is what Faust, the Kafka consumer and producer cost per
event.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Sequence
from typing import Any

import orjson

from bench.e2e.common import CAMPAIGNS, Names, load_average
from bench.e2e.preload import DEFAULT_GAP_MS
from engine.analysis.simulation.world import open_loop
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.settings import Settings, Topics
from streams.worker.batch_worker import BatchWorker
from streams.worker.faust_app import bootstrap


class NullSink:
    """Counts what the worker would produce; values are already encoded by the worker."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        self.sent += 1

    async def flush(self) -> None:
        """Nothing is ever pending."""

    async def delivery(self) -> Awaitable[object]:
        return asyncio.sleep(0)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def simulated_records(
    events: int, users: int, topics: Topics, gap_ms: float = DEFAULT_GAP_MS
) -> list[RawRecord]:
    """The open-loop world's events as the consumer hands them to the worker (one partition,
    ``gap_ms`` apart on average, event times ending just before now)."""
    by_kind = {"browse": topics.browse, "search": topics.search, "purchase": topics.purchase}
    start_ms = int(time.time() * 1000) - int(events * gap_ms) - 5_000
    records = []
    for offset, event in enumerate(
        open_loop(users=users, events=events, seed=11, start_ms=start_ms, mean_gap_ms=gap_ms)
    ):
        user = str(event["user_id"])
        records.append(
            RawRecord(by_kind[str(event["type"])], 0, offset, user.encode(), orjson.dumps(event))
        )
    return records


async def measure_inprocess(
    *,
    redis_url: str,
    names: Names,
    events: int,
    users: int,
    batch: int,
    gap_ms: float = DEFAULT_GAP_MS,
) -> dict[str, Any]:
    settings = Settings.from_env(
        {
            "DEALSTREAM_REDIS_URL": redis_url,
            "DEALSTREAM_REDIS_PREFIX": names.redis_prefix,
            "DEALSTREAM_TOPIC_PREFIX": names.topic_prefix,
            "DEALSTREAM_CAMPAIGNS": str(CAMPAIGNS),
            # the product's default: user ids pseudonymised (docs/privacy.md)
            "DEALSTREAM_PSEUDONYM_KEY": "bench-pseudonym-key-0123456789abcdef",
        }
    )
    runtime = bootstrap(settings)
    topics = settings.topics
    records = simulated_records(events, users, topics, gap_ms)
    sink = NullSink()
    worker = BatchWorker(
        runtime.engine,
        sink,
        topics=topics,
        limits=DecodeLimits(),
        metrics=runtime.metrics,
        pseudonyms=runtime.pseudonyms,
        reply_wait=runtime.reply_wait,
    )
    load = load_average()
    try:
        batches = [records[start : start + batch] for start in range(0, len(records), batch)]
        wall, cpu = time.perf_counter(), _cpu_s()
        for index, current in enumerate(batches):
            if index + 1 < len(batches):  # as the event consumer does when it fetched more
                worker.decode_ahead(batches[index + 1])
            await worker.handle(current)
        wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    finally:
        await runtime.redis.aclose()
    return {
        "events": len(records),
        "batch": batch,
        "events_per_s": round(len(records) / wall),
        "cpu_us_per_event": round(1e6 * cpu / len(records), 1),
        "outputs": sink.sent,
        "decoded_ahead": worker.counters.decoded_ahead,
        "load_average": load,
    }
