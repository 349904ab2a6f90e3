"""Two workers share one campaign budget: together they never grant more than N cents."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from engine.analysis.simulation.world import open_loop
from engine.campaigns import load_campaigns
from engine.decisions import offer_cost_cents, order_value
from engine.events import parse_event
from engine.ledger import LedgerConfig, event_day
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_ledger import RedisLedger
from streams.settings import Topics
from tests.conftest import Isolation, Services
from tests.worker_process import (
    WorkerProcess,
    clean_up,
    produce_events,
    read_topic,
    worker_env,
)

pytestmark = pytest.mark.e2e

BUDGET = 40.0  # currency units per day -> 4,000 cents
CAMPAIGNS = f"""
[[campaign]]
name = "race"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 0
daily_budget = {BUDGET}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_workers_never_overspend_a_shared_budget(
    services: Services, isolation: Isolation, tmp_path: Path
) -> None:
    campaigns_path = tmp_path / "campaigns.toml"
    campaigns_path.write_text(CAMPAIGNS)
    (campaign,) = load_campaigns(campaigns_path)
    topics = Topics(isolation.topic_prefix)
    # All events on one event-time day, so one daily budget applies.
    now = int(time.time() * 1000)
    start_ms = max(now - 3600 * 1000, now // 86_400_000 * 86_400_000)
    events = list(open_loop(users=200, events=3000, seed=11, start_ms=start_ms, mean_gap_ms=5))
    by_id = {str(e["event_id"]): parse_event(e) for e in events}
    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap, topics.all, partitions=4, security=services.kafka_security
        )
    )

    workers = [
        WorkerProcess(
            worker_env(
                services, isolation, campaigns=campaigns_path, http_port=free_port(), batch_max=50
            ),
            tmp_path / f"worker{n}.log",
        )
        for n in (1, 2)
    ]
    try:
        for worker in workers:
            worker.start()
        # Both join the group before the traffic starts, so both take partitions.
        for worker in workers:
            asyncio.run(worker.wait_progress(lambda p: True, timeout_s=90))
        asyncio.run(produce_events(services, topics, events))
        for worker in workers:
            asyncio.run(worker.wait_progress(lambda p: p["consumed"] > 0, timeout_s=90))

        async def drained() -> int:
            total = 0
            for worker in workers:
                line = worker.last_progress()
                total += int(line["consumed"]) if line else 0
            return total

        deadline = time.monotonic() + 120
        while asyncio.run(drained()) < len(events) and time.monotonic() < deadline:
            time.sleep(1)
        assert asyncio.run(drained()) == len(events), workers[0].tail() + workers[1].tail()
    finally:
        codes = [worker.stop() for worker in workers]
    assert codes == [0, 0], workers[0].tail() + workers[1].tail()

    decisions = asyncio.run(read_topic(services, topics.decisions))
    offers = {o["offer_id"] for o in asyncio.run(read_topic(services, topics.offers))}
    granted_cost = 0
    for decision in decisions:
        if decision["offer_id"] is not None:
            assert decision["offer_id"] in offers
            granted_cost += offer_cost_cents(
                decision["discount_pct"],
                order_value(campaign, by_id[decision["trigger_event_id"]], decision["features"]),
            )
    denied_costs = [
        offer_cost_cents(10, order_value(campaign, by_id[d["trigger_event_id"]], d["features"]))
        for d in decisions
        if "denied:budget" in d["rules"]
    ]

    async def spent() -> int:
        client = services.redis()
        try:
            ledger = RedisLedger(
                client, prefix=isolation.redis_prefix, config=LedgerConfig(attribution_window_ms=1)
            )
            return await ledger.budget_spent_cents("race", event_day(start_ms))
        finally:
            await client.aclose()

    budget_cents = round(BUDGET * 100)
    counter = asyncio.run(spent())
    try:
        assert denied_costs, "the budget should run out with this much traffic"
        assert granted_cost == counter
        assert granted_cost <= budget_cents
        # The remaining budget only shrinks, so every denial was right: at the end there is
        # still not enough left for any offer that was denied.
        assert budget_cents - counter < min(denied_costs)
        consumed = [int((w.last_progress() or {}).get("consumed", 0)) for w in workers]
        assert all(c > 0 for c in consumed), f"both workers must take part, consumed {consumed}"
    finally:
        asyncio.run(clean_up(services, isolation))
