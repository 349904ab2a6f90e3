"""Privacy end to end (docs/privacy.md): a running worker stores no raw user id in Redis or on
``decisions``/``training``; ``dealstream forget U`` leaves nothing of U in Redis but a tombstone
keyed by U's pseudonym, and U's later events do not rebuild the profile while it lives."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from engine.analysis.simulation.world import open_loop
from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services, worker_pseudonyms
from tests.worker_process import (
    WorkerProcess,
    accounted,
    clean_up,
    produce_events,
    read_states,
    worker_env,
)

pytestmark = pytest.mark.e2e

TIMEOUT_S = 120.0
CAMPAIGNS = """
[[campaign]]
name = "privacy-everyone"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 0
"""


async def read_raw(services: Services, topic: str, idle_s: float = 3.0) -> list[bytes]:
    """Every record's key and value bytes on a topic, read until nothing new for ``idle_s``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka_bootstrap,
        auto_offset_reset="earliest",
        **services.kafka_options(),
    )
    await consumer.start()
    found: list[bytes] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    found.append((record.key or b"") + b"\n" + (record.value or b""))
                    last = time.monotonic()
    finally:
        await consumer.stop()
    return found


async def redis_dump(services: Services, prefix: str) -> dict[bytes, list[bytes]]:
    """Every key under the prefix with every byte string it holds (members, fields, values)."""
    client = services.redis()
    dump: dict[bytes, list[bytes]] = {}
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = (await client.type(key)).decode()
            if kind == "string":
                values = [await client.get(key)]
            elif kind == "hash":
                values = [part for pair in (await client.hgetall(key)).items() for part in pair]
            elif kind == "zset":
                values = list(await client.zrange(key, 0, -1))
            elif kind == "set":
                values = list(await client.smembers(key))
            elif kind == "list":
                values = list(await client.lrange(key, 0, -1))
            else:
                values = [str(await client.dump(key)).encode()]
            dump[key] = [v for v in values if v is not None]
    finally:
        await client.aclose()
    return dump


def naming(blobs: dict[bytes, list[bytes]], needles: set[bytes]) -> list[str]:
    """The keys whose name or contents hold any of ``needles``."""
    return sorted(
        key.decode(errors="replace")
        for key, values in blobs.items()
        if any(n in key or any(n in v for v in values) for n in needles)
    )


def forget(env: dict[str, str], user: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "forget", user],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_forget_leaves_no_raw_id_and_a_tombstone_stops_the_rebuild(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    topics = Topics(isolation.topic_prefix)
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS)
    start_ms = int(time.time() * 1000) - 3600 * 1000
    events = list(
        open_loop(
            users=12,
            events=400,
            seed=5,
            start_ms=start_ms,
            mean_gap_ms=6000,
            user_prefix="mail-of-person-",
        )
    )
    users = {str(e["user_id"]) for e in events}
    # The user with most browse/search events: decisions, pending labels and guard state.
    forgotten = Counter(str(e["user_id"]) for e in events if e["type"] != "purchase")
    target = forgotten.most_common(1)[0][0]
    raw_ids = {user.encode() for user in users}
    pseudonym = worker_pseudonyms().of(target).encode()

    await ensure_topics(
        services.kafka_bootstrap, topics.all, partitions=2, security=services.kafka_security
    )
    env = worker_env(
        services,
        isolation,
        http_port=free_port,
        campaigns=campaigns,
        attribution_window_s=60,  # labels close within the hour of events: training examples
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start()
    try:
        produced = await produce_events(services, topics, events)
        await worker.wait_progress(lambda c: c["consumed"] >= produced, TIMEOUT_S)
        before = await redis_dump(services, isolation.redis_prefix)
        decisions = await read_raw(services, topics.decisions)
        training = await read_raw(services, topics.training)
        assert decisions and training, "the campaign decides and labels close"
        assert any(pseudonym in d for d in decisions), "the target was decided for"
        assert naming(before, {pseudonym}), "the target has Redis state before the forget"
        # No raw id anywhere in Redis, on decisions or training (offers keep it: the shop's).
        assert naming(before, raw_ids) == []
        assert [d for d in decisions + training if any(r in d for r in raw_ids)] == []

        # An operator runs `forget` (the worker's ACL user may not delete a user's state or
        # write a tombstone): the tests' own Redis user.
        said = forget(isolation.env(services, role=None), target)
        assert "tombstone" in said
        after = await redis_dump(services, isolation.redis_prefix)
        assert naming(after, raw_ids) == []
        tombstone = f"{isolation.redis_prefix}f:{{{pseudonym.decode()}}}".encode()
        # The pseudonym stays in the tombstone, and in the outbox entries of the last batches
        # (their label events) until Kafka commits them: the next calls delete them.
        outbox = f"{isolation.redis_prefix}ob"
        left = set(naming(after, {pseudonym}))
        assert tombstone.decode() in left and left <= {tombstone.decode(), outbox}, left

        # U comes back: events after everything so far, which must not rebuild the profile.
        last_ts = max(int(str(e["ts"])) for e in events)
        later = [
            {
                "event_id": f"after-forget-{n}",
                "user_id": target,
                "type": "browse",
                "ts": last_ts + 1000 * (n + 1),
                "item_id": f"i{n}",
                "category": "c1",
                "price": 20.0,
            }
            for n in range(5)
        ]
        total = produced + await produce_events(services, topics, later)
        final = await worker.wait_progress(lambda c: c["consumed"] >= total, TIMEOUT_S)
        assert final["forgotten"] == len(later), final
        assert accounted(final) == final["consumed"] == total, final
        states = await read_states(services, isolation, [target])
        assert states[target] == {}, "the profile was rebuilt"
        again = await redis_dump(services, isolation.redis_prefix)
        assert set(naming(again, {pseudonym})) <= {tombstone.decode(), outbox}
        assert naming(again, raw_ids) == []
        decided_after = [
            d for d in await read_raw(services, topics.decisions) if b"after-forget-" in d
        ]
        assert decided_after == [], "a forgotten user's event was decided for"
        training = await read_raw(services, topics.training)
        assert [t for t in training if any(r in t for r in raw_ids)] == []
        assert worker.stop() == 0, worker.tail()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(services, isolation)
