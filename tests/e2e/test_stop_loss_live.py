"""The stop-loss live: two worker processes share it through Redis, a restart keeps it, and
the learner learns with the workers' delayed-feedback method.

A campaign offers 40 % to everyone outside its holdout. The shop's purchases honour the offers:
treated users pay 60 % of their cart, holdout users the full price, so the campaign loses
28 % of every treated order's value against its holdout. Both workers consume the same
topics (the users are spread over their partitions); the stop-loss sums of both end up in
one place, and the campaign stops. A worker started after both stopped makes its very first
decisions in explore-only mode, because it starts from the state in Redis.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from engine.campaigns import load_campaigns
from engine.decisions import in_holdout
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import Isolation, Services
from tests.worker_process import (
    WorkerProcess,
    clean_up,
    poll_until,
    produce_events,
    read_topic,
    worker_env,
)

pytestmark = pytest.mark.e2e

CAMPAIGNS = """
[[campaign]]
name = "deep-cut"
policy = "threshold"
threshold = 0.0
discount_pct = 40
decision_interval_s = 0
holdout = 0.3
stop_loss = { window_h = 24, min_decisions = 40, min_users = 8, explore = 0.1 }
"""
USERS = 80


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ticks(start_ms: int) -> list[dict[str, Any]]:
    """Views of other users, spread over every partition: each worker settles once more and
    learns the shared state (a worker acts on the state as of its previous batch)."""
    return [
        {
            "event_id": f"tick-{index}",
            "user_id": f"z{index:03d}",
            "type": "browse",
            "ts": start_ms + index,
            "item_id": "i0",
            "category": "books",
            "price": 10.0,
            "action": "view",
        }
        for index in range(40)
    ]


async def stored_state(services: Services, isolation: Isolation) -> dict[bytes, bytes]:
    client = services.redis()
    try:
        return dict(await client.hgetall(f"{isolation.redis_prefix}sl:deep-cut"))
    finally:
        await client.aclose()


def shop(start_ms: int, round_: int, held_out: set[str]) -> list[dict[str, Any]]:
    """Every user views an item; a minute later every user buys it (treated users with 40 %
    off, as the offer says, holdout users at full price)."""
    events: list[dict[str, Any]] = []
    for index in range(USERS):
        user = f"u{index:03d}"
        ts = start_ms + index * 10
        price = 50.0 + index % 7
        events.append(
            {
                "event_id": f"v{round_}-{user}",
                "user_id": user,
                "type": "browse",
                "ts": ts,
                "item_id": f"i{index}",
                "category": "books",
                "price": price,
                "action": "view",
            }
        )
        paid = price if user in held_out else round(price * 0.6, 2)
        events.append(
            {
                "event_id": f"p{round_}-{user}",
                "user_id": user,
                "type": "purchase",
                "ts": ts + 60_000,
                "order_id": f"o{round_}-{user}",
                "items": [
                    {"item_id": f"i{index}", "category": "books", "price": price, "quantity": 1}
                ],
                "amount": paid,
            }
        )
    return events


def test_two_workers_share_the_stop_loss_and_a_restart_keeps_it(
    services: Services, isolation: Isolation, tmp_path: Path
) -> None:
    campaigns_path = tmp_path / "campaigns.toml"
    campaigns_path.write_text(CAMPAIGNS)
    (campaign,) = load_campaigns(campaigns_path)
    held_out = {f"u{i:03d}" for i in range(USERS) if in_holdout(campaign, f"u{i:03d}")}
    assert 10 <= len(held_out) <= 40
    topics = Topics(isolation.topic_prefix)
    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap, topics.all, partitions=4, security=services.kafka_security
        )
    )
    start_ms = int(time.time() * 1000) - 3_600_000

    def env() -> dict[str, str]:
        return worker_env(
            services,
            isolation,
            campaigns=campaigns_path,
            http_port=free_port(),
            batch_max=20,
            feedback="closed",
        )

    workers = [WorkerProcess(env(), tmp_path / f"worker{n}.log") for n in (1, 2)]
    first = shop(start_ms, 1, held_out)
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            asyncio.run(worker.wait_progress(lambda p: True, timeout_s=90))
        asyncio.run(produce_events(services, topics, first))

        def consumed() -> int:
            return sum(int((w.last_progress() or {}).get("consumed", 0)) for w in workers)

        deadline = time.monotonic() + 120
        while consumed() < len(first) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert consumed() == len(first), workers[0].tail() + workers[1].tail()

        async def stopped() -> bool:
            return (await stored_state(services, isolation)).get(b"state") == b"1"

        assert asyncio.run(poll_until(stopped, timeout_s=30))
        tick = ticks(start_ms + 100_000)
        asyncio.run(produce_events(services, topics, tick))
        expected = len(first) + len(tick)
        deadline = time.monotonic() + 120
        while consumed() < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        # One more round of views, decided by both workers in the stopped state.
        views = [e for e in shop(start_ms + 120_000, 2, held_out) if e["type"] == "browse"]
        asyncio.run(produce_events(services, topics, views))
        deadline = time.monotonic() + 120
        while consumed() < expected + len(views) and time.monotonic() < deadline:
            time.sleep(0.5)
        shares = [int((w.last_progress() or {}).get("consumed", 0)) for w in workers]
        assert all(share > 0 for share in shares), f"both workers must take part: {shares}"
    finally:
        codes = [worker.stop() for worker in workers]
    assert codes == [0, 0], workers[0].tail() + workers[1].tail()

    stored = asyncio.run(stored_state(services, isolation))
    try:
        assert stored[b"state"] == b"1", stored
        decisions = asyncio.run(read_topic(services, topics.decisions))
        second_round = [
            d
            for d in decisions
            if str(d["trigger_event_id"]).startswith("v2-") and not d["holdout"]
        ]
        assert len(second_round) == USERS - len(held_out)
        assert all("stop_loss:explore_only" in d["rules"] for d in second_round)
        offered = [d for d in second_round if d["offer_id"]]
        assert len(offered) < len(second_round) / 2  # explore = 0.1 of the proposals

        # A worker that starts now decides its very first batch in the stopped state.
        restarted = WorkerProcess(env(), tmp_path / "worker3.log")
        third = [e for e in shop(start_ms + 240_000, 3, held_out) if e["type"] == "browse"]
        try:
            restarted.start()
            asyncio.run(restarted.wait_progress(lambda p: True, timeout_s=90))
            asyncio.run(produce_events(services, topics, third))
            asyncio.run(
                restarted.wait_progress(lambda p: p["consumed"] >= len(third), timeout_s=120)
            )
        finally:
            assert restarted.stop() == 0, restarted.tail()
        decisions = asyncio.run(read_topic(services, topics.decisions))
        third_round = [
            d
            for d in decisions
            if str(d["trigger_event_id"]).startswith("v3-") and not d["holdout"]
        ]
        assert len(third_round) == USERS - len(held_out)
        assert all("stop_loss:explore_only" in d["rules"] for d in third_round)
        # The training topic carries what the learner of the `closed` method needs: the
        # conversions and, once windows close, the final labels.
        training = asyncio.run(read_topic(services, topics.training, idle_s=2.0))
        assert {t["kind"] for t in training} == {"converted"}
        assert len(training) == len(first) // 2
    finally:
        asyncio.run(clean_up(services, isolation))
