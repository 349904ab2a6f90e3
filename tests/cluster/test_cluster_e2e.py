"""dealstream end to end on the local cluster (issue 15): three brokers, a Redis Cluster of
three primaries with a replica each, three workers and the learner, all as real processes.

Every key of the deployment carries the prefix's hash tag (``DEALSTREAM_REDIS_PREFIX`` of the
cluster's env file, ``ds:{ds}:``), so each batch call runs on the primary of that one slot and
is followed by ``WAIT 1`` (``streams/adapters/replica_wait.py``). The test drains simulated
traffic, checks every user's features against the engine's in-memory store run in process on
the same events, and the outputs (each decision once, each offer with its decision, a budget
never overspent). Then it SIGKILLs the primary of the deployment's slot while events flow,
lets its replica take over, restarts the old primary (it rejoins as the new one's replica:
until then ``WAIT 1`` holds the batches back) and checks all of it again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from engine.analysis.simulation.world import open_loop
from engine.decisions import offer_cost_cents, order_value
from engine.events import parse_event
from engine.ledger import event_day
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_client import deployment_node
from streams.settings import Topics
from tests.cluster.conftest import Cluster
from tests.cluster.deployment import (
    Deployment,
    primary_pid,
    read_records,
    role,
    try_committed_and_lag,
    wait_until,
)
from tests.cluster.test_topology import cluster_nodes
from tests.feature_reference import reference_states

pytestmark = pytest.mark.cluster

USERS = 300
EVENTS_BEFORE = 3000
"""Drained and checked before the failover."""
EVENTS_ACROSS = 3000
"""Produced while the primary of the deployment's slot is killed and replaced."""
WORKERS = 3
PARTITIONS = 6
ALLOWED_LATENESS_S = 86_400
"""Far beyond the input's event-time span: nothing is late, so any difference from the
reference is an event lost or applied twice."""
BUDGET = 150.0
CAMPAIGNS = f"""
[[campaign]]
name = "cl-everyone"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 0

[[campaign]]
name = "cl-budget"
policy = "threshold"
threshold = 0.0
discount_pct = 20
decision_interval_s = 0
daily_budget = {BUDGET}
"""
DRAIN_TIMEOUT_S = 240


def simulated(seed: int, count: int, start_ms: int) -> list[dict[str, Any]]:
    return list(open_loop(users=USERS, events=count, seed=seed, start_ms=start_ms, mean_gap_ms=400))


async def produce(bootstrap: str, topics: Topics, events: list[dict[str, Any]]) -> None:
    """As a shop would: idempotent, acks=all, key = user id, topic by type; paced a little
    (about 1,000 events/s) so that the failover falls while events flow."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        for start in range(0, len(events), 100):
            pending = [
                await producer.send(
                    f"{topics.prefix}events.{event['type']}",
                    orjson.dumps(event),
                    key=str(event["user_id"]).encode(),
                )
                for event in events[start : start + 100]
            ]
            await asyncio.gather(*pending)
            await asyncio.sleep(0.1)
    finally:
        await producer.stop()


async def read_values(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every JSON value on ``topic``, up to its end offsets now."""
    return [
        orjson.loads(record.value) for record in await read_records(bootstrap, topic, PARTITIONS)
    ]


async def check_everything(
    deployment: Deployment, events: list[dict[str, Any]], days: set[int]
) -> Mapping[str, Any]:
    """Features exact, every decision once, offers only with their decision, budgets kept.
    Returns figures for the report."""
    want = await reference_states(events, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000)
    got, spent = await deployment.stored(want, campaign="cl-budget", days=days)
    # Granted offers join a user's state too (od<day> buckets, od: the latest), with the
    # user's next batch: compared below against the offers published.
    received = {
        user: {k: v for k, v in state.items() if k.startswith("od")} for user, state in got.items()
    }
    got = {
        user: {k: v for k, v in state.items() if not k.startswith("od")}
        for user, state in got.items()
    }
    differ = [user for user, state in want.items() if got.get(user) != state]
    example = ""
    if differ:
        mine, theirs = got.get(differ[0], {}), want[differ[0]]
        fields = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        example = f"; {differ[0]}: " + ", ".join(
            f"{k} got {mine.get(k)} want {theirs.get(k)}" for k in fields[:8]
        )
    assert not differ, f"{len(differ)} of {len(want)} users' features differ{example}"

    bootstrap = deployment.settings.kafka_bootstrap
    decisions = await read_values(bootstrap, deployment.topics.decisions)
    offers = await read_values(bootstrap, deployment.topics.offers)
    twice = [d for d, n in Counter(d["decision_id"] for d in decisions).items() if n > 1]
    assert not twice, f"{len(twice)} decisions published more than once, e.g. {twice[:3]}"
    offered = {d["offer_id"]: d for d in decisions if d["offer_id"] is not None}
    offer_ids = [o["offer_id"] for o in offers]
    assert len(offer_ids) == len(set(offer_ids)), "an offer was published twice"
    assert set(offer_ids) == set(offered), "every offer with its decision, and only those"

    published = Counter(str(o["user_id"]) for o in offers)
    twice_in_state = {
        user: (n, published[user])
        for user, fields in received.items()
        if (n := sum(v for k, v in fields.items() if k != "od")) > published[user]
    }
    assert not twice_in_state, (
        f"offers counted in users' state more often than published: {twice_in_state}"
    )
    in_state = sum(sum(v for k, v in fields.items() if k != "od") for fields in received.values())

    by_id = {str(e["event_id"]): parse_event(e) for e in events}
    (_, budgeted) = deployment.campaigns
    granted = sum(
        offer_cost_cents(
            d["discount_pct"], order_value(budgeted, by_id[d["trigger_event_id"]], d["features"])
        )
        for d in offered.values()
        if d["campaign"] == "cl-budget"
    )
    budget_cents = round(BUDGET * 100)
    assert granted == sum(spent.values()), (granted, spent)
    assert all(cents <= budget_cents for cents in spent.values()), spent
    denied = sum(1 for d in decisions if "denied:budget" in d["rules"])
    return {
        "decisions": len(decisions),
        "offers": len(offers),
        "offers_in_state": in_state,
        "budget_spent_cents": spent,
        "budget_denials": denied,
    }


def metric_total(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.fixture
def deployment(cluster: Cluster, tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment(
        cluster,
        tmp_path,
        env={
            "DEALSTREAM_TOPIC_PREFIX": "cl.",
            "DEALSTREAM_GROUP_ID": "cl-workers",
            "DEALSTREAM_PARTITIONS": str(PARTITIONS),
            "DEALSTREAM_BATCH_MAX": "200",
            "DEALSTREAM_ALLOWED_LATENESS_S": str(ALLOWED_LATENESS_S),
            "DEALSTREAM_SESSION_TIMEOUT_S": "10",
        },
        workers=WORKERS,
        campaigns=CAMPAIGNS,
    )
    assert deployment.settings.redis_cluster and deployment.settings.redis_wait_replicas == 1
    try:
        yield deployment
    finally:
        deployment.stop()


def test_workers_on_the_redis_cluster_exact_through_a_primary_failover(
    cluster: Cluster, deployment: Deployment
) -> None:
    settings = deployment.settings
    bootstrap, topics = settings.kafka_bootstrap, deployment.topics
    now_ms = int(time.time() * 1000)
    before = simulated(21, EVENTS_BEFORE, now_ms - 3 * 3600_000)
    across = simulated(22, EVENTS_ACROSS, max(int(e["ts"]) for e in before) + 1000)
    assert max(int(e["ts"]) for e in across) < now_ms
    days = {event_day(now_ms), event_day(now_ms + 30 * 60_000)}  # budgets go by the wall clock

    asyncio.run(
        ensure_topics(
            bootstrap, topics.all, partitions=PARTITIONS, replication=settings.replication
        )
    )
    started = time.monotonic()
    deployment.start()
    for worker in deployment.workers:
        asyncio.run(worker.wait_progress(lambda p: True, timeout_s=120))
    joined_s = time.monotonic() - started

    # Phase 1: drain, then check.
    produced_at = time.monotonic()
    asyncio.run(produce(bootstrap, topics, before))
    took = asyncio.run(
        wait_until(
            "lag 0 before the failover",
            lambda: lag_is_zero(bootstrap, settings.group_id, topics),
            DRAIN_TIMEOUT_S,
        )
    )
    drained_s = time.monotonic() - produced_at
    consumed = [int((w.last_progress() or {}).get("consumed", 0)) for w in deployment.workers]
    assert all(consumed), f"every worker takes part: consumed {consumed}" + deployment.tails()
    first = asyncio.run(check_everything(deployment, before, days))
    print(
        f"\ncluster e2e: {WORKERS} workers joined in {joined_s:.1f} s; {EVENTS_BEFORE} events "
        f"produced and drained in {drained_s:.1f} s (lag 0 {took:.1f} s after the last was "
        f"acknowledged); per worker consumed {consumed}; {first}"
    )

    # Phase 2: kill the slot's primary while events flow.
    async def slot_port() -> int:
        client = deployment.redis()
        try:
            return int((await deployment_node(client, settings.redis_prefix)).port)
        finally:
            await client.aclose()

    old_port = asyncio.run(slot_port())

    nodes = asyncio.run(cluster_nodes(old_port))
    [new_port] = [n.port for n in nodes.values() if n.primary_id == nodes[old_port].id]

    async def flow_and_kill() -> float:
        producing = asyncio.create_task(produce(bootstrap, topics, across))
        await asyncio.sleep(1.5)
        os.kill(await asyncio.to_thread(primary_pid, old_port), signal.SIGKILL)
        killed = time.monotonic()

        async def promoted() -> bool:
            return await asyncio.to_thread(role, new_port) == "master"

        await wait_until("the replica promoted", promoted, 60)
        promoted_s = time.monotonic() - killed
        await producing
        return promoted_s

    promoted_s = asyncio.run(flow_and_kill())
    restarted = time.monotonic()
    cluster.start()  # the old primary rejoins as the replica of the promoted one
    restart_s = time.monotonic() - restarted
    took = asyncio.run(
        wait_until(
            "lag 0 after the failover",
            lambda: lag_is_zero(bootstrap, settings.group_id, topics),
            DRAIN_TIMEOUT_S,
        )
    )
    alive = [worker.alive() for worker in deployment.workers]
    assert all(alive), f"workers alive after the failover: {alive}" + deployment.tails()
    second = asyncio.run(check_everything(deployment, before + across, days))
    shortfalls = sum(
        metric_total(port, "dealstream_redis_replication_shortfalls_total")
        for port in deployment.ports
    )
    logs = "".join(worker.log_text() for worker in deployment.workers)
    print(
        f"cluster e2e: primary {old_port} SIGKILLed, {new_port} promoted {promoted_s:.1f} s "
        f"later; old primary restarted in {restart_s:.1f} s, lag 0 {took:.1f} s after that; "
        f"WAIT shortfalls {shortfalls:g}; log lines: "
        f"{logs.count('batch call not replicated')} not replicated, "
        f"{logs.count('batch call lost its reply')} lost replies, "
        f"{logs.count('batch failed on Redis; retrying')} batch retries; {second}"
    )
    codes = deployment.stop()
    assert codes == [0] * WORKERS, f"exit statuses {codes}" + deployment.tails()


async def lag_is_zero(bootstrap: str, group: str, topics: Topics) -> bool:
    found = await try_committed_and_lag(bootstrap, group, topics, PARTITIONS)
    return found is not None and found[1] == 0
