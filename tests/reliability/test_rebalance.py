"""Partitions move between two live workers mid-stream: every user's features stay exact.

Each worker holds the feature records of the partitions it owns in memory and writes them to
Redis with the batch (``streams/adapters/redis_store.py``). When a partition moves away and
comes back, what its first owner held went stale meanwhile; it must have been dropped on the
revoke, or the first owner would write old counts over the second owner's. The scenario:

1. worker A consumes the first third of the input alone;
2. worker B joins; once the group has split the partitions, the second third is produced and
   both consume it (B must apply some);
3. B leaves (SIGTERM): its partitions go back to A, and the last third is produced.

The input is produced in thirds so that each owner surely has work, however fast the workers.

Afterwards every user's raw state and feature vector must equal the in-order reference.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engine.features.catalogue import compute_features
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import Isolation, Services, unused_port
from tests.feature_reference import reference_states
from tests.reliability.test_kill9 import (
    ALLOWED_LATENESS_S,
    LIFETIME_FIELDS,
    PARTITIONS,
    differences,
    kill9_worker,
    simulated_events,
    wait_applied,
)
from tests.worker_process import WorkerProcess, clean_up, produce_events, read_states

pytestmark = pytest.mark.reliability


async def wait_assigned(worker: WorkerProcess, timeout_s: float) -> None:
    """Until the worker logs that the group gave it some event partitions."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in worker.run_log_text().splitlines():
            if '"msg":"assigned ' in line and '"msg":"assigned 0 ' not in line:
                return
        if not worker.alive():
            raise AssertionError("the worker exited before it was assigned" + worker.tail())
        await asyncio.sleep(0.2)
    raise AssertionError(f"no partitions assigned within {timeout_s:.0f} s" + worker.tail())


async def test_partitions_moving_between_two_workers_keep_every_users_features_exact(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    events = simulated_events()
    want = await reference_states(events, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000)
    topics = Topics(isolation.topic_prefix)
    first = kill9_worker(services, isolation, free_port, tmp_path / "a.log")
    second = kill9_worker(services, isolation, unused_port(), tmp_path / "b.log")
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS)
        third = len(events) // 3
        total = await produce_events(services, topics, events[:third])
        first.start()
        await wait_applied(client, isolation, first, total, 90)
        second.start()
        await wait_assigned(second, 90)
        total += await produce_events(services, topics, events[third : 2 * third])
        joined = await second.wait_progress(lambda line: line["applied"] > 0, 90)
        await wait_applied(client, isolation, first, total, 90)
        assert first.alive(), "worker A exited" + first.tail()
        assert second.stop() == 0, "worker B did not stop cleanly" + second.tail()
        total += await produce_events(services, topics, events[2 * third :])
        await wait_applied(client, isolation, first, total, 90)
        got = await read_states(services, isolation, want)
        final = first.last_progress()
        assert first.stop() == 0, "worker A did not stop cleanly" + first.tail()
    finally:
        for worker in (first, second):
            if worker.alive():
                worker.stop()
        await client.aclose()
        await clean_up(services, isolation)
    print(f"\nrebalance: B applied {joined['applied']}+ while it owned partitions; A: {final}")
    assert final is not None and final["dead_lettered"] == {}, final

    lost_or_twice = differences(got, want, LIFETIME_FIELDS)
    assert not lost_or_twice, (
        f"{len(lost_or_twice)} users' lifetime counts differ: {lost_or_twice[:5]}"
        + first.tail()
        + second.tail()
    )
    features = [
        user
        for user, state in want.items()
        if compute_features(got[user]) != compute_features(state)
    ]
    assert not features, f"{len(features)} feature vectors differ, e.g. {features[:3]}"
    assert not differences(got, want, None), "raw feature states differ from the reference"
