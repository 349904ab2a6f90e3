"""The live worker aligns the three event topics by event time (issue 13, "one event-time clock").

Two hours of history are produced all at once, in event-time order, to a small purchase topic
and a browse topic large enough to take many fetches: the worker reads every purchase in its
first fetch, far ahead of browse in event time. Without alignment a decision's features would
count purchases made after its trigger. The worker (a subprocess, real Kafka and Redis) must
give every decision exactly the features of an in-process run of the same events in event-time
order (``DiscountEngine`` over ``InMemoryFeatureStore`` / ``InMemoryLedger``), lose nothing
(counters balanced, nothing left held, commits at the end of every partition) and hold a
bounded number of events (the peak is read from ``dealstream_events_held`` on ``/metrics``).
"""

from __future__ import annotations

import asyncio
import random
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.campaigns import parse_campaigns
from engine.events import parse_event
from engine.features.store import InMemoryFeatureStore
from engine.ledger import InMemoryLedger
from engine.pipeline import DiscountEngine, Incoming
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Settings, Topics
from tests.conftest import Isolation, Services
from tests.worker_process import (
    WorkerProcess,
    accounted,
    clean_up,
    committed_offsets,
    produce_events,
    read_topic,
    worker_env,
)

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000
"""2026-01-01 00:00 UTC: history, well behind the worker's clock."""
SPAN_MS = 2 * 3600 * 1000
USERS = 80
BROWSE, SEARCHES, PURCHASES = 24_000, 1_200, 2_400
"""Browse is about 6 MB (many fetches of 1 MB per partition); purchases fit in one."""
PARTITIONS = 2
BATCH_MAX = 200
"""The worker pauses a partition holding more than 4 batches (800 events): each purchase
partition (about 1,200 events) is paused while browse catches up."""
CAMPAIGNS_TOML = """\
[[campaign]]
name = "align"
policy = "threshold"
threshold = 1.0               # never an offer: features depend on events alone
triggers = ["view", "cart", "search"]
decision_interval_s = 300
"""
TIMEOUT_S = 240.0


def history(seed: int) -> list[dict[str, Any]]:
    """Browse, search and purchase events of ``USERS`` users over ``SPAN_MS``, by event time."""
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for n, kind in enumerate(
        ["browse"] * BROWSE + ["search"] * SEARCHES + ["purchase"] * PURCHASES
    ):
        user = f"u{rng.randrange(USERS)}"
        ts = T0 + rng.randrange(SPAN_MS)
        category = f"c{rng.randrange(12)}"
        event: dict[str, Any] = {"event_id": f"e{n}", "user_id": user, "type": kind, "ts": ts}
        if kind == "browse":
            action = rng.choice(["view", "view", "view", "cart", "favorite"])
            event |= {
                "item_id": f"i{rng.randrange(500)}",
                "category": category,
                "price": round(rng.uniform(1, 80), 2),
                "action": action,
            }
        elif kind == "search":
            event |= {"query": f"q{rng.randrange(50)}", "category": category}
        else:
            price = round(rng.uniform(1, 80), 2)
            item = {
                "item_id": f"i{rng.randrange(500)}",
                "category": category,
                "price": price,
                "quantity": 1,
            }
            event |= {"order_id": f"o{n}", "items": [item], "amount": price}
        events.append(event)
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    return events


async def reference_features(
    events: list[dict[str, Any]], env: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """decision_id -> features of an in-process run of ``events`` in event-time order."""
    campaigns = parse_campaigns(tomllib.loads(CAMPAIGNS_TOML))
    config = Settings.from_env(env).engine_config()
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        ledger=InMemoryLedger(config.ledger_config(campaigns)),
        campaigns=campaigns,
        config=config,
    )
    features: dict[str, dict[str, Any]] = {}
    now_ms = int(time.time() * 1000)
    for start in range(0, len(events), 500):
        batch = [Incoming(parse_event(e)) for e in events[start : start + 500]]
        result = await engine.process(batch, wall_clock_ms=now_ms)
        features.update({d.decision_id: d.features for d in result.decisions})
    return features


def events_held(port: int) -> float | None:
    """``dealstream_events_held`` from the worker's ``/metrics``; None while it is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("dealstream_events_held "):
            return float(line.split()[1])
    return None


async def end_offsets(services: Services, topics: Topics) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=services.kafka_bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics.events for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}


async def test_history_produced_at_once_gives_the_features_of_event_time_order(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    events = history(seed=13)
    total = len(events)
    topics = Topics(isolation.topic_prefix)
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS_TOML, encoding="utf-8")
    env = worker_env(
        services,
        isolation,
        http_port=free_port,
        campaigns=campaigns,
        partitions=PARTITIONS,
        batch_max=BATCH_MAX,
        allowed_lateness_s=86_400,
    )
    expected = await reference_features(events, env)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    peak = 0.0
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS)
        assert await produce_events(services, topics, events) == total
        worker.start()
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            held = events_held(free_port)
            peak = max(peak, held or 0.0)
            last = worker.last_progress()
            if last is not None and last["consumed"] >= total and last["held"] == 0:
                break
            assert worker.alive(), "the worker exited" + worker.tail()
            await asyncio.sleep(0.05)
        final = await worker.wait_progress(
            lambda line: line["consumed"] >= total and line["held"] == 0, 30
        )
        decisions = await read_topic(services, topics.decisions, idle_s=3.0)
        ends = await end_offsets(services, topics)
        committed = await committed_offsets(services, isolation.group_id)
        code = worker.stop()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    tail = worker.tail()

    print(
        f"\n{total} events ({BROWSE} browse, {SEARCHES} search, {PURCHASES} purchase) on "
        f"{PARTITIONS} partitions, batch_max {BATCH_MAX}: peak held {peak:.0f}; "
        f"{len(decisions)} decisions; worker: {final}"
    )
    assert code == 0, f"worker exit status {code}" + tail
    assert final["consumed"] == final["applied"] == total, final
    assert accounted(final) == total and final["handed_back"] == 0, final
    assert {key: committed.get(key) for key in ends} == ends, (committed, ends)
    got = {d["decision_id"]: d["features"] for d in decisions}
    assert len(got) == len(decisions) == len(expected) > 100
    wrong = [d for d in expected if got.get(d) != expected[d]]
    assert not wrong, f"{len(wrong)} of {len(expected)} decisions differ, e.g. {wrong[:3]}"
    # The purchase topic was read ahead and held back, within the pause bound (four batches
    # per partition, plus what one fetch brings).
    assert peak > 0, "nothing was ever held: the test did not read ahead"
