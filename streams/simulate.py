"""``dealstream simulate``: synthetic traffic to a JSONL file or straight to Kafka."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson

from engine.simulator import generate
from streams.kafka_io import ProducerSink
from streams.settings import Topics


def write_jsonl(events: Iterator[dict[str, object]], out: IO[bytes]) -> int:
    count = 0
    for event in events:
        out.write(orjson.dumps(event))
        out.write(b"\n")
        count += 1
    return count


def simulate_to_file(*, users: int, events: int, seed: int, out: Path) -> int:
    stream = generate(users=users, events=events, seed=seed)
    if str(out) == "-":
        return write_jsonl(stream, sys.stdout.buffer)
    with out.open("wb") as handle:
        return write_jsonl(stream, handle)


async def simulate_to_kafka(
    *,
    users: int,
    events: int,
    seed: int,
    bootstrap: str,
    topics: Topics,
    rate: float | None,
    user_prefix: str = "u",
) -> int:
    """Produce events keyed by user id; event time is the wall clock, paced at ``rate``/s."""
    start_ms = int(time.time() * 1000)
    gap_ms = 1000.0 / rate if rate else 1.0
    sink = ProducerSink.create(bootstrap)
    await sink.start()
    started = time.monotonic()
    sent = 0
    try:
        stream = generate(
            users=users,
            events=events,
            seed=seed,
            start_ms=start_ms,
            mean_gap_ms=gap_ms,
            user_prefix=user_prefix,
        )
        for event in stream:
            topic = {"browse": topics.browse, "search": topics.search}.get(
                str(event["type"]), topics.purchase
            )
            await sink.send(topic, str(event["user_id"]).encode(), orjson.dumps(event))
            sent += 1
            if rate:
                due = started + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
    finally:
        await sink.stop()
    return sent
