"""Two outsized users (issue 13): each applied exactly once, and the partition keeps moving.

When features were computed in Lua, ``unpack`` failed past about 8,000 values: a user with
thousands of events in one batch, or with more than 8,000 stale category fields to delete, got
the state written but not the dedup set and the watermark, and the retry loop applied the
same increments again and again. Features are now computed in Python and each user's whole
record is written with one ``SET`` (``streams/adapters/commit_state.lua``), so nothing in a
script grows with a user's history. These tests hold that against real Kafka and Redis, the
worker a subprocess:

- one user's 5,000 events taken in a single batch, then a few more; then the whole partition
  read again by a fresh consumer group, every record of it recognised as redelivered;
- one user with 9,000 distinct categories 40 days ago (one field each), then fresh events:
  the first fresh batch drops all 9,000 stale fields, after a restart (the worker reads the
  large record back from Redis).

Each test prints the Redis record's size: the dedup set (9 bytes per event id within the
allowed lateness) makes a busy user's record large, whatever its categories.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine.features.catalogue import compute_features
from engine.features.record import decode_record
from engine.features.state import CATEGORY_SLOT, DAY_MS, State, parsed_field
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_store import RECORD_FIELD, RedisFeatureStore
from streams.settings import Topics
from tests.conftest import Isolation, Services, worker_pseudonyms
from tests.feature_reference import reference_states
from tests.worker_process import (
    WorkerProcess,
    accounted,
    clean_up,
    committed_offsets,
    poll_until,
    produce_events,
    worker_env,
)

pytestmark = pytest.mark.integration

ALLOWED_LATENESS_S = 3600
"""The worker's default, set explicitly: the reference uses the same."""
BIG_BATCH = 5_000
STALE_CATEGORIES = 9_000
FRESH = 5
TIMEOUT_S = 120.0
SEEN_ENTRY_BYTES = 9
"""A dedup-set entry in a record: a 5-byte digest and a 4-byte age (``feature_record.py``)."""
ACTIONS = ("view", "view", "cart", "favorite")


def browse(event_id: str, user: str, ts: int, category: str, action: str) -> dict[str, Any]:
    """A small browse event: 5,000 of them (about 650 KB in the topic) fit one fetch of the
    partition (aiokafka's ``max_partition_fetch_bytes``, 1 MiB), so one batch takes them all."""
    return {
        "event_id": event_id,
        "user_id": user,
        "type": "browse",
        "ts": ts,
        "item_id": "i1",
        "category": category,
        "price": 12.5,
        "action": action,
    }


class RedisRecords:
    """The test's view of the feature records in Redis: raw bytes and their size."""

    def __init__(self, services: Services, isolation: Isolation) -> None:
        self.client = aioredis.Redis.from_url(services.redis_url)
        self.store = RedisFeatureStore(
            self.client, prefix=isolation.redis_prefix, pseudonyms=worker_pseudonyms()
        )

    async def blob(self, user: str) -> bytes:
        blob = await self.client.hget(self.store.user_key(user), RECORD_FIELD)
        assert isinstance(blob, bytes), f"no record of {user} in Redis"
        return blob

    async def memory_usage(self, user: str) -> int:
        return int(await self.client.memory_usage(self.store.user_key(user), samples=0))

    async def state(self, user: str) -> State:
        return decode_record(await self.blob(user)).state

    async def close(self) -> None:
        await self.client.aclose()


async def wait_committed(
    services: Services, group: str, topic: str, end: int, worker: WorkerProcess
) -> int:
    """Until the group's committed offset of ``topic``'s partition 0 reaches ``end``."""
    committed = -1

    async def reached() -> bool:
        nonlocal committed
        committed = (await committed_offsets(services, group)).get((topic, 0), -1)
        return committed >= end

    if not await poll_until(reached, 30, interval_s=0.5):
        raise AssertionError(f"{group} committed {committed} of {end} on {topic}" + worker.tail())
    return committed


def differences(got: State, want: State) -> list[str]:
    names = sorted(set(got) | set(want))
    return [
        f"{n}: got {got.get(n)}, want {want.get(n)}" for n in names if got.get(n) != want.get(n)
    ]


async def test_a_5000_event_batch_of_one_user_is_applied_once_and_read_again_as_redelivered(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    topics = Topics(isolation.topic_prefix)
    user = "u-batch"
    now_ms = int(time.time() * 1000)
    start = now_ms - 50 * 60_000  # 5,000 events 0.5 s apart: all within the allowed lateness
    big = [
        browse(f"b{i:05d}", user, start + 500 * i, f"c{i % 7}", ACTIONS[i % len(ACTIONS)])
        for i in range(BIG_BATCH)
    ]
    extra = [browse(f"x{i}", user, now_ms - 5_000 + i, "books", "cart") for i in range(FRESH)]
    want = (await reference_states(big + extra, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000))[
        user
    ]
    total = BIG_BATCH + FRESH
    settings: dict[str, object] = {
        "partitions": 1,
        "batch_max": 2 * BIG_BATCH,
        "allowed_lateness_s": ALLOWED_LATENESS_S,
    }
    first = WorkerProcess(
        worker_env(services, isolation, http_port=free_port, **settings), tmp_path / "first.log"
    )
    # A consumer group that never read the topic: it reads the whole partition again.
    replay_group = f"{isolation.group_id}-replay"
    again = WorkerProcess(
        worker_env(services, isolation, http_port=free_port, group_id=replay_group, **settings),
        tmp_path / "again.log",
    )
    redis = RedisRecords(services, isolation)
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=1)
        # Everything is in the topic before the worker starts: its first fetch takes it all.
        await produce_events(services, topics, big)
        first.start()
        batch = await first.wait_progress(lambda line: line["consumed"] >= BIG_BATCH, TIMEOUT_S)
        big_blob = await redis.blob(user)
        big_memory = await redis.memory_usage(user)
        await produce_events(services, topics, extra)
        done = await first.wait_progress(lambda line: line["consumed"] >= total, TIMEOUT_S)
        committed = await wait_committed(services, isolation.group_id, topics.browse, total, first)
        got = await redis.state(user)
        blob = await redis.blob(user)
        assert first.stop() == 0, "the worker did not stop cleanly" + first.tail()

        again.start()
        replayed = await again.wait_progress(lambda line: line["consumed"] >= total, TIMEOUT_S)
        replay_committed = await wait_committed(services, replay_group, topics.browse, total, again)
        got_after_replay = await redis.state(user)
        assert again.stop() == 0, "the replaying worker did not stop cleanly" + again.tail()
    finally:
        for worker in (first, again):
            if worker.alive():
                worker.stop()
        await redis.close()
        await clean_up(services, isolation)
    seen = decode_record(big_blob).seen
    print(
        f"\none user's {BIG_BATCH} events: batch line {batch}; record after the batch "
        f"{len(big_blob):,} B (MEMORY USAGE {big_memory:,} B; dedup set {len(seen)} x "
        f"{SEEN_ENTRY_BYTES} B), after {FRESH} more {len(blob):,} B; committed {committed}; "
        f"replay by a fresh group: {replayed}"
    )

    # One batch held the 5,000 events, and it was applied whole.
    assert batch["consumed"] == BIG_BATCH and batch["batches"] == 1, batch
    assert batch["applied"] == BIG_BATCH and accounted(batch) == BIG_BATCH, batch
    assert len(seen) == BIG_BATCH, "the dedup set must hold every event id of the batch"
    # Its size is the dedup set plus a few hundred bytes of state, nothing more.
    assert len(big_blob) < BIG_BATCH * SEEN_ENTRY_BYTES + 1_000, len(big_blob)
    # Every event applied exactly once; the partition moved on to its end.
    assert done["consumed"] == done["applied"] == total and accounted(done) == total, done
    assert done["dead_lettered"] == {}, done
    assert committed == total
    assert not differences(got, want), differences(got, want)[:10]
    assert compute_features(got) == compute_features(want)
    # Read again from offset 0: all 5,005 records recognised, none applied a second time.
    assert replayed["consumed"] == replayed["redelivered"] == total, replayed
    assert replayed["applied"] == 0 and accounted(replayed) == total, replayed
    assert replay_committed == total
    assert got_after_replay == got


async def test_9000_stale_category_fields_are_dropped_by_the_first_fresh_batch(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    topics = Topics(isolation.topic_prefix)
    user = "u-cats"
    now_ms = int(time.time() * 1000)
    old = now_ms - 40 * DAY_MS  # older than the longest window (30 days) and the retention (31)
    history = [
        browse(f"h{i:05d}", user, old + i, f"cat-{i:05d}", "view") for i in range(STALE_CATEGORIES)
    ]
    fresh = [browse(f"f{i}", user, now_ms - 5_000 + i, "books", "view") for i in range(FRESH)]
    want_old = (await reference_states(history, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000))[
        user
    ]
    want = (await reference_states(history + fresh, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000))[
        user
    ]
    total = STALE_CATEGORIES + FRESH
    env = worker_env(
        services,
        isolation,
        http_port=free_port,
        partitions=1,
        allowed_lateness_s=ALLOWED_LATENESS_S,
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    redis = RedisRecords(services, isolation)
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=1)
        await produce_events(services, topics, history)
        worker.start()
        loaded = await worker.wait_progress(
            lambda line: line["consumed"] >= STALE_CATEGORIES, TIMEOUT_S
        )
        await wait_committed(services, isolation.group_id, topics.browse, len(history), worker)
        got_old = await redis.state(user)
        old_size = len(await redis.blob(user))
        old_memory = await redis.memory_usage(user)
        # A restart: the next batch must start from the large record as Redis holds it.
        assert worker.stop() == 0, "the worker did not stop cleanly" + worker.tail()
        await produce_events(services, topics, fresh)
        worker.start()
        done = await worker.wait_progress(lambda line: line["consumed"] >= FRESH, TIMEOUT_S)
        committed = await wait_committed(services, isolation.group_id, topics.browse, total, worker)
        got = await redis.state(user)
        size = len(await redis.blob(user))
        memory = await redis.memory_usage(user)
        assert worker.stop() == 0, "the worker did not stop cleanly" + worker.tail()
    finally:
        if worker.alive():
            worker.stop()
        await redis.close()
        await clean_up(services, isolation)
    print(
        f"\n{STALE_CATEGORIES} categories 40 days old: record {old_size:,} B (MEMORY USAGE "
        f"{old_memory:,} B, {len(got_old)} fields); after {FRESH} fresh events {size:,} B "
        f"(MEMORY USAGE {memory:,} B, {len(got)} fields); first run {loaded}; second run {done}"
    )

    def category_fields(state: State) -> int:
        return sum(1 for name in state if parsed_field(name)[0] == CATEGORY_SLOT)

    assert loaded["applied"] == STALE_CATEGORIES and accounted(loaded) == STALE_CATEGORIES, loaded
    assert category_fields(got_old) == STALE_CATEGORIES
    assert got_old == want_old
    # The second run read the large record back and dropped every stale field in one batch.
    assert done["consumed"] == done["applied"] == FRESH and accounted(done) == FRESH, done
    assert done["redelivered"] == 0 and done["dead_lettered"] == {}, done
    assert committed == total
    assert category_fields(got) == 1, sorted(got)
    assert got.get("nv") == float(total), "every event counted exactly once"
    assert not differences(got, want), differences(got, want)[:10]
    assert compute_features(got) == compute_features(want)
    assert size < 200, f"the record kept {size} B after its stale fields went"
