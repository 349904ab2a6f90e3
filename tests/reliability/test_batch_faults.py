"""The worker stopped dead at each step of a batch: nothing lost, nothing charged twice.

A batch's Redis effect (features, ledger, outbox entry) is one atomic call; its outputs are
then sent, acknowledged by Kafka, and its offsets committed (``streams/worker/consumer.py``).
``DEALSTREAM_CRASH_AT`` (``streams/worker/crash_points.py``) makes the worker exit like a
SIGKILL right after the call, after the sends, after Kafka acknowledged them, or after the
batch's commit (its granted offers not yet in their users' state). The restarted worker
publishes the batch's outputs again from the outbox and stores its offers, and then every
decision and offer of the reference is on its topic, every training example too, each budget
charged exactly the cost of the offers delivered, and every user's feature state holds each
event and each offer exactly once.

The other half, a call whose reply is lost, is tested against Redis in
tests/integration/test_redis_ledger.py (``test_a_call_whose_reply_is_lost_...``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine.analysis.simulation.world import open_loop
from engine.campaigns import load_campaigns
from engine.decisions import offer_cost_cents, order_value
from engine.events import parse_event
from engine.features.state import LAST_OFFER_FIELD, State
from engine.features.store import InMemoryFeatureStore
from engine.pipeline import DiscountEngine, EngineConfig, Incoming
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from streams.worker.crash_points import EXIT_CRASHED, STEPS
from tests.conftest import Isolation, Services, worker_pseudonyms
from tests.feature_reference import reference_states
from tests.reliability.test_kill9 import (
    ALLOWED_LATENESS_S,
    differences,
    kill9_worker,
    output_ids,
)
from tests.worker_process import (
    clean_up,
    committed_offsets,
    produce_events,
    read_states,
    read_topic,
)

pytestmark = pytest.mark.reliability

PARTITIONS = 4
OFFERS = LAST_OFFER_FIELD
"""The prefix of every state field an offer writes (``offer_ops``)."""
CRASH_AT_BATCH = 6
CAMPAIGN = "faults-everyone"
CAMPAIGNS = f"""
[[campaign]]
name = "{CAMPAIGN}"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 0
daily_budget = 1000000.0
"""


def fault_events() -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    return list(
        open_loop(users=150, events=3000, seed=7, start_ms=now_ms - 2 * 3600_000, mean_gap_ms=500)
    )


def closing_purchases(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One purchase per user after everything else: produced once the worker has committed
    the rest, they make batches without trigger events, which apply the offers granted last
    (a batch's offers join their users' state with the next batch)."""
    last = max(int(str(e["ts"])) for e in events)
    template = next(e for e in events if e["type"] == "purchase")
    users = sorted({str(e["user_id"]) for e in events})
    return [
        {**template, "event_id": f"closing-{u}", "order_id": f"o-closing-{u}", "user_id": u}
        | {"ts": last + 1000}
        for u in users
    ]


async def wait_committed(services: Services, isolation: Isolation, total: int) -> int:
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline:
        offsets = await committed_offsets(services, isolation.group_id)
        done = sum(offset for offset in offsets.values() if offset > 0)
        if done >= total:
            return done
        await asyncio.sleep(0.5)
    raise AssertionError(f"only {done} of {total} records committed within 120 s")


async def spent_cents(services: Services, isolation: Isolation) -> int:
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{isolation.redis_prefix}b:{CAMPAIGN}:*")]
        values = await client.mget(keys) if keys else []
        return sum(int(value) for value in values if value is not None)
    finally:
        await client.aclose()


async def outbox_entries(services: Services, isolation: Isolation) -> int:
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        return int(await client.hlen(f"{isolation.redis_prefix}ob"))
    finally:
        await client.aclose()


def _without_offers(state: State) -> State:
    return {field: value for field, value in state.items() if not field.startswith(OFFERS)}


def _offers_in(state: State) -> int:
    return int(sum(v for f, v in state.items() if f.startswith(OFFERS) and f != LAST_OFFER_FIELD))


@dataclass(frozen=True)
class Wanted:
    """What the in-order reference engine publishes for the events and the closing purchases."""

    campaigns: Path
    events: list[dict[str, Any]]
    closing: list[dict[str, Any]]
    offers: set[str]
    decisions: set[str]
    training: set[str]
    states: dict[str, State]
    cost: int
    """The reference's spend (the worker's may differ a little: features at decision time
    depend on how the three topics interleave in its batches)."""


async def wanted(campaigns: Path, events: list[dict[str, Any]]) -> Wanted:
    closing = closing_purchases(events)
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=load_campaigns(campaigns),
        config=EngineConfig(allowed_lateness_ms=ALLOWED_LATENESS_S * 1000),
    )
    expected = await engine.process([Incoming(parse_event(e)) for e in events + closing])
    return Wanted(
        campaigns=campaigns,
        events=events,
        closing=closing,
        offers={o.offer_id for o in expected.offers},
        decisions={d.decision_id for d in expected.decisions},
        training={t.decision_id for t in expected.training},
        states=await reference_states(
            events + closing, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000
        ),
        cost=sum(d.cost_cents or 0 for d in expected.decisions if d.offer_id),
    )


@dataclass(frozen=True)
class Published:
    """What the worker left on the output topics and in Redis."""

    offers: Counter[str]
    decisions: Counter[str]
    decision_messages: list[dict[str, Any]]
    training: Counter[str]
    spent: int
    states: dict[str, State]

    @classmethod
    async def read(
        cls, services: Services, isolation: Isolation, want: Wanted, partitions: int = PARTITIONS
    ) -> Published:
        topics = Topics(isolation.topic_prefix)
        return cls(
            offers=await output_ids(services, topics.offers, "offer_id", 30, partitions),
            decisions=await output_ids(services, topics.decisions, "decision_id", 30, partitions),
            decision_messages=await read_topic(services, topics.decisions),
            training=await output_ids(services, topics.training, "decision_id", 30, partitions),
            spent=await spent_cents(services, isolation),
            states=await read_states(services, isolation, want.states),
        )

    def delivered_cost(self, want: Wanted) -> int:
        """What the ledger should have charged: each delivered offer's cost, from the features
        its decision published (the order value depends on them: ``order_value``)."""
        campaign = load_campaigns(want.campaigns)[0]
        triggers = {parse_event(e).event_id: parse_event(e) for e in want.events}
        costs = {
            m["offer_id"]: offer_cost_cents(
                m["discount_pct"],
                order_value(campaign, triggers[m["trigger_event_id"]], m["features"]),
            )
            for m in self.decision_messages
            if m["offer_id"] is not None
        }
        assert set(costs) == want.offers
        return sum(costs.values())

    def report(self, want: Wanted) -> str:
        twice = sum(n - 1 for n in self.offers.values())
        return (
            f"offers: {len(want.offers)} expected, {len(want.offers - set(self.offers))} lost, "
            f"{twice} published twice; spent {self.spent} cents for offers costing "
            f"{self.delivered_cost(want)} (the reference's: {want.cost})"
        )

    def check(self, want: Wanted) -> None:
        """Nothing lost, nothing unexpected, charged exactly once, every event and offer once."""
        assert not want.offers - set(self.offers), "offers lost"
        assert not set(self.offers) - want.offers, "offers for events that should trigger none"
        assert not want.decisions - set(self.decisions), "decisions lost"
        assert not set(self.decisions) - want.decisions, "unexpected decisions"
        assert set(self.training) == want.training, "training examples lost or unexpected"
        assert self.spent == self.delivered_cost(want), "budget charged other than the offers' cost"
        # the events' part of every user's state is exact; each delivered offer is in it once
        events_only = {user: _without_offers(state) for user, state in self.states.items()}
        assert not differences(events_only, want.states, None), "users' event counts differ"
        granted_to = {m["offer_id"]: m["user_id"] for m in self.decision_messages if m["offer_id"]}
        offers_by_user = Counter(granted_to.values())
        in_state = {user: _offers_in(state) for user, state in self.states.items()}
        # decisions name users by pseudonym (docs/privacy.md)
        pseudonym = worker_pseudonyms().of
        assert in_state == {user: offers_by_user.get(pseudonym(user), 0) for user in self.states}, (
            "offers applied to the users' state other than once each"
        )


async def finish_with_closing_purchases(
    services: Services, isolation: Isolation, want: Wanted, total: int
) -> None:
    """Once the worker committed ``total`` records, the closing purchases (``closing_purchases``),
    then until it committed those too."""
    topics = Topics(isolation.topic_prefix)
    await wait_committed(services, isolation, total)
    total += await produce_events(services, topics, want.closing)
    await wait_committed(services, isolation, total)


@pytest.mark.parametrize("step", STEPS)
async def test_a_worker_stopped_dead_at_a_step_of_a_batch_loses_and_doubles_nothing(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path, step: str
) -> None:
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS)
    want = await wanted(campaigns, fault_events())
    assert want.offers and want.cost > 0

    topics = Topics(isolation.topic_prefix)
    log_path = tmp_path / "worker.log"
    settings = {"campaigns": campaigns, "batch_max": 100}
    crashing = kill9_worker(
        services, isolation, free_port, log_path, crash_at=f"{step}:{CRASH_AT_BATCH}", **settings
    )
    worker = kill9_worker(services, isolation, free_port, log_path, **settings)
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS)
        total = await produce_events(services, topics, want.events)
        crashing.start()
        assert crashing.process is not None
        code = await asyncio.to_thread(crashing.process.wait, 120)
        assert code == EXIT_CRASHED, f"exit status {code}" + crashing.tail()
        assert f"crash point {step} reached" in crashing.run_log_text()
        left = await outbox_entries(services, isolation)

        worker.start()
        await finish_with_closing_purchases(services, isolation, want, total)
        final = await worker.wait_progress(lambda line: line["batches"] > 0, 30)
        published = await Published.read(services, isolation, want)
        assert worker.stop() == 0, worker.tail()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    print(
        f"\n{step} at batch {CRASH_AT_BATCH}: {left} outbox entr(ies) left by the crash; "
        f"republished {final['republished']} outputs; {published.report(want)}"
    )
    assert left >= 1, "the crash should leave the batch's outbox entry"
    if step != "after_commit":  # after it, the next batch's call may not have run yet
        assert "again from the outbox" in worker.run_log_text(), worker.tail()
    published.check(want)
    # the batches not yet committed (the crashed one, the one before it, and those whose
    # commit request was still in flight) are published a second time, each once
    assert max(published.decisions.values()) <= 2


async def test_a_worker_killed_while_idle_leaves_its_last_offers_to_the_next_one(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    """A batch's granted offers join their users' state with the worker's next batch. Killed
    once everything is committed (no next batch came), the worker leaves them in the batch's
    outbox entry, committed in Kafka: the next worker stores them from there."""
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS)
    want = await wanted(campaigns, fault_events())
    topics = Topics(isolation.topic_prefix)
    log_path = tmp_path / "worker.log"
    settings = {"campaigns": campaigns, "batch_max": 100}
    killed = kill9_worker(services, isolation, free_port, log_path, **settings)
    worker = kill9_worker(services, isolation, free_port, log_path, **settings)
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS)
        total = await produce_events(services, topics, want.events)
        killed.start()
        await wait_committed(services, isolation, total)
        await killed.wait_progress(lambda line: line["consumed"] >= total, 30)
        assert killed.process is not None
        killed.process.kill()
        assert killed.process.wait(30) == -9
        left = await outbox_entries(services, isolation)

        worker.start()
        await finish_with_closing_purchases(services, isolation, want, total)
        await worker.wait_progress(lambda line: line["batches"] > 0, 30)
        published = await Published.read(services, isolation, want)
        assert worker.stop() == 0, worker.tail()
    finally:
        for process in (killed, worker):
            if process.alive():
                process.stop()
        await clean_up(services, isolation)
    print(f"\nkilled while idle: {left} outbox entr(ies) left; {published.report(want)}")
    assert left >= 1, "the last batches' entries wait for the next call"
    published.check(want)


async def test_a_stopped_worker_stores_the_offers_its_last_batch_granted(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    """Stopped (SIGTERM) with nothing left to read, the worker has no next batch to carry the
    offers its last batch granted: it stores them as it stops."""
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS)
    events = fault_events()
    want = await wanted(campaigns, events)
    topics = Topics(isolation.topic_prefix)
    worker = kill9_worker(
        services, isolation, free_port, tmp_path / "worker.log", campaigns=campaigns, batch_max=100
    )
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS)
        total = await produce_events(services, topics, events)
        worker.start()
        await wait_committed(services, isolation, total)
        await worker.wait_progress(lambda line: line["consumed"] >= total, 30)
        assert worker.stop() == 0, worker.tail()
        decisions = await read_topic(services, topics.decisions)
        states = await read_states(services, isolation, want.states)
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
    pseudonym = worker_pseudonyms().of
    offers_by_user = Counter(m["user_id"] for m in decisions if m["offer_id"])
    in_state = {user: _offers_in(state) for user, state in states.items()}
    assert sum(offers_by_user.values()) > 0
    assert in_state == {user: offers_by_user.get(pseudonym(user), 0) for user in states}
