"""Preload simulated events into Kafka, and the raw consume + decode baseline of the same topics.

Preloaded events lie in the recent past (the last one a few seconds before now), so none is
beyond the worker's clock-skew limit and none is older than the allowed lateness relative to
the others; sends are batched (futures gathered, never awaited one by one).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from engine.analysis.simulation.world import open_loop
from engine.events import decode_event
from streams.settings import Topics

DEFAULT_GAP_MS = 1.0
"""Mean event-time gap between preloaded events by default (1,000,000 events span about 17
minutes, so no label event falls due: the first wait is an hour; ``--gap-ms``)."""


@dataclass(frozen=True, slots=True)
class Preloaded:
    events: int
    users_active: int
    seconds: float
    by_type: dict[str, int]


async def preload(
    bootstrap: str,
    topics: Topics,
    *,
    events: int,
    users: int,
    seed: int,
    gap_ms: float = DEFAULT_GAP_MS,
) -> Preloaded:
    start_ms = int(time.time() * 1000) - int(events * gap_ms) - 5_000
    by_topic = {"browse": topics.browse, "search": topics.search, "purchase": topics.purchase}
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        max_batch_size=512 * 1024,
        enable_idempotence=True,
    )
    await producer.start()
    started = time.perf_counter()
    by_type: dict[str, int] = {}
    active: set[str] = set()
    try:
        pending: list[asyncio.Future[object]] = []
        for event in open_loop(
            users=users, events=events, seed=seed, start_ms=start_ms, mean_gap_ms=gap_ms
        ):
            kind = str(event["type"])
            user = str(event["user_id"])
            by_type[kind] = by_type.get(kind, 0) + 1
            active.add(user)
            pending.append(
                await producer.send(by_topic[kind], orjson.dumps(event), key=user.encode())
            )
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return Preloaded(events, len(active), time.perf_counter() - started, by_type)


async def raw_consume(bootstrap: str, topics: Topics, *, events: int, group_id: str) -> float:
    """Events/s of a plain aiokafka consumer reading and decoding (orjson + ``decode_event``,
    the worker's validation) every preloaded record; timed from the first record to the last."""
    consumer = AIOKafkaConsumer(
        *topics.events,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    expected = {"events.browse": "browse", "events.search": "search", "events.purchase": "purchase"}
    types = {topic: expected[topic.removeprefix(topics.prefix)] for topic in topics.events}
    await consumer.start()
    seen = 0
    first = 0.0
    try:
        while seen < events:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            if batch and not first:
                first = time.perf_counter()
            for tp, records in batch.items():
                kind = types[tp.topic]
                for record in records:
                    decode_event(record.value, expected_type=kind)
                seen += sum(1 for _ in records)
        return seen / (time.perf_counter() - first)
    finally:
        await consumer.stop()
