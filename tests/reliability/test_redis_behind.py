"""Redis killed under a running worker (issue 13): nothing lost, never a silent skip.

A PRIVATE redis-server (own port, temporary dir; the shared one is never touched), the worker
as a subprocess, the shared Kafka:

- with the shipped ``deploy/redis/redis.conf`` (AOF, ``appendfsync everysec``): SIGKILLed
  mid-stream and restarted from its AOF, nothing is lost: every decision, offer and training
  example of the reference is published, the budget spent equals the cost of the delivered
  offers (never more), and every event and offer is in the users' state exactly once
  (``everysec`` suffices against a killed process, whose writes the kernel still holds; a lost
  machine needs ``always``);
- without an AOF, Redis comes back behind Kafka's committed offsets:
  1. restored from an older snapshot (SAVE after the first half of the events, SIGKILL after
     the second, restart from the snapshot): the worker rewinds to the watermarks and the
     features end as they were before the kill, every event applied once;
  2. restarted empty (SIGKILL, no snapshot, no AOF): the worker stops (exit 70) with an error
     naming the partitions, the committed offsets and what to do.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from engine.analysis.simulation.world import open_loop
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services
from tests.private_redis import REDIS_SERVER, PrivateRedis
from tests.reliability.test_batch_faults import (
    CAMPAIGNS,
    Published,
    finish_with_closing_purchases,
    wanted,
)
from tests.reliability.test_kill9 import ALLOWED_LATENESS_S
from tests.worker_process import (
    WorkerProcess,
    clean_up,
    committed_offsets,
    log_entries,
    produce_events,
    read_states,
    worker_env,
)

pytestmark = pytest.mark.reliability

TIMEOUT_S = 90.0


async def committed_total(services: Services, group: str) -> int:
    offsets = await committed_offsets(services, group)
    return sum(max(0, offset) for offset in offsets.values())


async def wait_committed(services: Services, group: str, total: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if await committed_total(services, group) >= total:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"the group did not commit {total} records in {TIMEOUT_S:.0f} s")


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
async def test_redis_behind_kafka_is_caught_up_or_stops_the_worker(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    private = Services(services.kafka_bootstrap, server.url)
    topics = Topics(isolation.topic_prefix)
    now_ms = int(time.time() * 1000)
    events: list[dict[str, Any]] = list(
        open_loop(users=20, events=400, seed=5, start_ms=now_ms - 2 * 3_600_000, mean_gap_ms=5000)
    )
    first, second = events[:200], events[200:]
    users = sorted({str(e["user_id"]) for e in events})
    worker = WorkerProcess(
        worker_env(private, isolation, http_port=free_port, partitions=1, batch_max=50),
        tmp_path / "worker.log",
    )
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=1)
        await produce_events(private, topics, first)
        worker.start()
        await wait_committed(private, isolation.group_id, len(first))
        server.save()  # the snapshot Redis will come back from: the first half only
        await produce_events(private, topics, second)
        await wait_committed(private, isolation.group_id, len(events))
        before = await read_states(private, isolation, users)
        assert worker.stop() == 0, worker.tail()

        server.kill9()
        server.start()  # from dump.rdb: behind the group's committed offsets
        assert await read_states(private, isolation, users) != before
        worker.start()
        final = await worker.wait_progress(lambda line: line["consumed"] >= len(second), TIMEOUT_S)
        await wait_committed(private, isolation.group_id, len(events))
        after = await read_states(private, isolation, users)
        assert worker.stop() == 0, worker.tail()
        run_log = worker.run_log_text()

        server.kill9()
        (server.workdir / "dump.rdb").unlink()
        server.start()  # empty: no snapshot, no append-only file
        worker.start()
        deadline = time.monotonic() + TIMEOUT_S
        while worker.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert not worker.alive(), "the worker carried on over an empty Redis" + worker.tail()
        assert worker.process is not None
        code = worker.process.returncode
        empty_log = worker.run_log_text()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(private, isolation)
        server.kill9()

    assert after == before, "features differ from those before Redis lost its writes"
    assert final["consumed"] == len(second), final
    rewound = [line for line in run_log.splitlines() if "Redis is behind Kafka" in line]
    assert rewound, "no rewind logged" + worker.tail()
    assert code == 70, f"exit status {code}" + worker.tail()
    [failure] = log_entries(empty_log, "event consumer failed; stopping the worker")
    assert "Redis holds no feature watermark" in failure["exc"]
    assert f"{topics.browse}[0] committed at" in failure["exc"]


async def applied_total(server: PrivateRedis, isolation: Isolation) -> int:
    client = redis.Redis(port=server.port, socket_timeout=1)
    try:
        marks = client.hvals(f"{isolation.redis_prefix}wm")
    except redis.RedisError:
        return -1
    finally:
        client.close()
    return sum(int(float(mark)) + 1 for mark in marks)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
async def test_redis_killed_mid_stream_comes_back_from_its_aof_with_nothing_lost(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis", conf=REPO / "deploy" / "redis" / "redis.conf")
    server.start()
    private = Services(services.kafka_bootstrap, server.url)
    topics = Topics(isolation.topic_prefix)
    now_ms = int(time.time() * 1000)
    events: list[dict[str, Any]] = list(
        open_loop(users=200, events=8000, seed=7, start_ms=now_ms - 2 * 3_600_000, mean_gap_ms=800)
    )
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS)  # an offer for every trigger event, from a budget
    want = await wanted(campaigns, events)
    worker = WorkerProcess(
        worker_env(
            private,
            isolation,
            http_port=free_port,
            partitions=1,
            batch_max=100,
            allowed_lateness_s=ALLOWED_LATENESS_S,
            campaigns=campaigns,
        ),
        tmp_path / "worker.log",
    )
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=1)
        await produce_events(private, topics, events)
        worker.start()
        deadline = time.monotonic() + TIMEOUT_S
        applied = 0
        while applied < len(events) // 4 and time.monotonic() < deadline:
            applied = await applied_total(server, isolation)
            await asyncio.sleep(0.02)
        server.kill9()  # mid-stream: the worker retries its batch until Redis answers again
        killed_at = applied
        await asyncio.sleep(2)
        server.start()  # replays the AOF
        await finish_with_closing_purchases(private, isolation, want, len(events))
        published = await Published.read(private, isolation, want, partitions=1)
        assert worker.alive(), "the worker died with Redis" + worker.tail()
        code = worker.stop()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(private, isolation)
        server.kill9()

    print(f"\nRedis SIGKILLed after {killed_at} records applied; {published.report(want)}")
    assert 0 < killed_at < len(events), f"Redis was not killed mid-stream ({killed_at} applied)"
    published.check(want)
    assert code == 0, worker.tail()
