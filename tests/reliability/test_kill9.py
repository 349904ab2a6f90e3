"""kill -9 and restart, three times, mid-stream: no event lost, none applied twice.

The worker applies a micro-batch to Redis (state, dedup set and per-partition offset watermarks
in one Lua call), waits until Kafka acknowledged its outputs, and only then commits the batch's
input offsets (``streams/worker/consumer.py``). A SIGKILL therefore leaves Redis ahead of the
committed offsets; on restart the records in between are consumed again and must be recognised
as redelivered. Afterwards every user's lifetime counts and feature vector must equal a
reference computed in-process with ``InMemoryFeatureStore`` from the same events.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from engine.analysis.simulation.world import open_loop
from engine.campaigns import load_campaigns
from engine.events import parse_event
from engine.features.catalogue import compute_features
from engine.features.state import KIND_CODE, State
from engine.features.store import InMemoryFeatureStore
from engine.importers.taobao import import_taobao
from engine.pipeline import DiscountEngine, EngineConfig, Incoming
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_store import RedisFeatureStore
from streams.settings import Topics
from tests.conftest import REPO, Isolation, Services
from tests.feature_reference import reference_states
from tests.worker_process import (
    WorkerProcess,
    clean_up,
    committed_offsets,
    produce_events,
    read_states,
    worker_env,
)

pytestmark = pytest.mark.reliability

EVENTS = 20_000
PARTITIONS = 4
KILL_AT = (0.20, 0.45, 0.70)
"""Fractions of the input applied (by the Redis watermarks) at which the worker is SIGKILLed."""
ALLOWED_LATENESS_S = 86_400
TAOBAO = REPO.parent / "shared" / "data" / "taobao-userbehavior-excerpt.csv.gz"
LIFETIME_FIELDS = tuple(f"n{code}" for code in KIND_CODE.values())

# The worker consumes twelve partitions (three topics x four) independently, and after each
# restart every partition resumes from its own committed offset: one partition can be minutes
# of event time ahead of another holding earlier events of the same users. With the default
# allowed lateness (1 h) such an event could then count as "late" and be skipped, which is
# correct behaviour but not what this test is about. A lateness of a day, far more than the
# input's two hours of event time, makes "late" impossible, so any difference from the
# reference is a lost or doubly applied event.
WORKER_SETTINGS: dict[str, object] = {
    "batch_max": 100,  # small batches, so that kills land mid-stream, between commits
    "allowed_lateness_s": ALLOWED_LATENESS_S,
}
# A SIGKILLed consumer never leaves its group: its partitions stay assigned to it until its
# session times out (DEALSTREAM_SESSION_TIMEOUT_S, default 10 s); 6 s is the broker's minimum
# (group.min.session.timeout.ms).
GROUP_SETTINGS = {"DEALSTREAM_SESSION_TIMEOUT_S": "6"}


def simulated_events() -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    events = list(
        open_loop(
            users=400, events=EVENTS, seed=99, start_ms=now_ms - 2 * 3600_000, mean_gap_ms=300
        )
    )
    assert max(int(str(e["ts"])) for e in events) < now_ms, "no event may be in the future"
    return events


def taobao_events() -> list[dict[str, Any]]:
    if not TAOBAO.exists():
        pytest.skip(f"the Taobao excerpt is absent ({TAOBAO}); see ../shared/data/README.md")

    def first(n: int) -> Iterator[dict[str, Any]]:
        for index, event in enumerate(import_taobao(TAOBAO)):
            if index == n:
                return
            yield event

    return list(first(EVENTS))


@dataclass(frozen=True)
class Kill:
    """What one SIGKILL left behind."""

    at_fraction: float
    run_seconds: float
    """How long the killed run lived (start-up and group join included)."""
    applied_positions: int
    """Records at or below the Redis watermarks: already applied (or skipped) in Redis."""
    committed_positions: int
    """Records below the consumer group's committed offsets."""
    last_progress: dict[str, Any] | None

    @property
    def to_redeliver(self) -> int:
        """Records the next run consumes again: applied in Redis, not committed in Kafka."""
        return self.applied_positions - self.committed_positions


async def applied_positions(client: aioredis.Redis, isolation: Isolation) -> int:
    marks = await RedisFeatureStore(client, prefix=isolation.redis_prefix).watermarks()
    return sum(offset + 1 for offset in marks.values())


async def committed_positions(services: Services, isolation: Isolation, topics: Topics) -> int:
    offsets = await committed_offsets(services, isolation.group_id)
    return sum(
        offset for (topic, _), offset in offsets.items() if topic in topics.events and offset > 0
    )


async def wait_applied(
    client: aioredis.Redis,
    isolation: Isolation,
    worker: WorkerProcess,
    at_least: int,
    timeout_s: float,
) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = await applied_positions(client, isolation)
        if done >= at_least:
            return done
        if not worker.alive():
            raise AssertionError("the worker exited on its own" + worker.tail())
        await asyncio.sleep(0.05)
    done = await applied_positions(client, isolation)
    raise AssertionError(
        f"only {done} of the {at_least} records wanted applied within {timeout_s:.0f} s"
        + worker.tail()
    )


def differences(
    got: dict[str, State], want: dict[str, State], fields: tuple[str, ...] | None
) -> list[str]:
    out = []
    for user, expected in want.items():
        actual = got.get(user, {})
        if fields is not None:
            expected = {f: expected.get(f, 0.0) for f in fields}
            actual = {f: actual.get(f, 0.0) for f in fields}
        if actual != expected:
            out.append(f"{user}: got {actual}, want {expected}")
    return out


@dataclass
class KilledRuns:
    """The outcome of ``run_with_kills``."""

    kills: list[Kill]
    final: dict[str, Any]
    """The last progress line of the run that finished the input."""
    to_consume: int
    """How many records the last run had to consume (from the committed offsets on)."""
    alive: bool
    exit_code: int
    seconds: float

    def report(self, title: str) -> str:
        lines = [f"{title}, {self.seconds:.1f} s with {len(self.kills)} kills"]
        for kill in self.kills:
            lines.append(
                f"  kill at >= {kill.at_fraction:.0%} after {kill.run_seconds:.1f} s: "
                f"{kill.applied_positions} applied in Redis, {kill.committed_positions} "
                f"committed in Kafka -> {kill.to_redeliver} to redeliver; "
                f"the run's last progress: {kill.last_progress}"
            )
        lines.append(f"  final run: {self.final}")
        lines.append(
            f"  redelivered across the restarts: {sum(k.to_redeliver for k in self.kills)}"
        )
        return "\n".join(lines)


async def run_with_kills(
    services: Services,
    isolation: Isolation,
    worker: WorkerProcess,
    total: int,
    on_done: Callable[[], Awaitable[None]] | None = None,
) -> KilledRuns:
    """Start the worker, SIGKILL and restart it at each of ``KILL_AT``, let the last run
    finish all ``total`` records, call ``on_done`` (while the worker still runs), SIGTERM it."""
    topics = Topics(isolation.topic_prefix)
    client = aioredis.Redis.from_url(services.redis_url)
    kills: list[Kill] = []
    started = time.monotonic()
    try:
        worker.start()
        for fraction in KILL_AT:
            run_started = time.monotonic()
            await wait_applied(client, isolation, worker, int(total * fraction), 90)
            worker.kill9()
            kill = Kill(
                fraction,
                time.monotonic() - run_started,
                await applied_positions(client, isolation),
                await committed_positions(services, isolation, topics),
                worker.last_progress(),
            )
            assert kill.applied_positions < total, (
                f"the worker finished before the kill at {fraction:.0%}: use more events"
            )
            kills.append(kill)
            worker.start()
        await wait_applied(client, isolation, worker, total, 90)
        # The last run started at the committed offsets: it consumes everything from there.
        to_consume = total - kills[-1].committed_positions
        final = await worker.wait_progress(lambda line: line["consumed"] >= to_consume, 30)
        if on_done is not None:
            await on_done()
        alive = worker.alive()
        code = worker.stop()
    finally:
        if worker.alive():
            worker.stop()
        await client.aclose()
    return KilledRuns(kills, final, to_consume, alive, code, time.monotonic() - started)


def kill9_worker(
    services: Services, isolation: Isolation, port: int, log_path: Path, **settings: object
) -> WorkerProcess:
    env = {
        **worker_env(services, isolation, http_port=port, **{**WORKER_SETTINGS, **settings}),
        **GROUP_SETTINGS,
    }
    return WorkerProcess(env, log_path)


@pytest.mark.parametrize("source", ["simulated", "taobao"])
async def test_kill9_three_times_loses_nothing_and_applies_nothing_twice(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path, source: str
) -> None:
    events = simulated_events() if source == "simulated" else taobao_events()
    want = await reference_states(events, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000)
    topics = Topics(isolation.topic_prefix)
    got: dict[str, State] = {}

    async def read_redis() -> None:
        got.update(await read_states(services, isolation, want))

    worker = kill9_worker(services, isolation, free_port, tmp_path / "worker.log")
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS)
        total = await produce_events(services, topics, events)
        runs = await run_with_kills(services, isolation, worker, total, read_redis)
    finally:
        await clean_up(services, isolation)
    tail = worker.tail()
    print("\n" + runs.report(f"{source}: {total} events, {len(want)} users"))

    final, last_kill = runs.final, runs.kills[-1]
    assert runs.alive, "the worker died on its own after the last restart" + tail
    assert runs.exit_code == 0, f"exit status {runs.exit_code} on SIGTERM" + tail
    assert final["consumed"] == runs.to_consume, final
    assert final["redelivered"] == last_kill.to_redeliver, (
        f"the last run skipped {final['redelivered']} records, {last_kill.to_redeliver} expected"
    )
    assert final["applied"] == runs.to_consume - last_kill.to_redeliver, final
    assert (final["duplicates"], final["late"], final["dead_lettered"]) == (0, 0, {}), final

    lost_or_twice = differences(got, want, LIFETIME_FIELDS)
    assert not lost_or_twice, (
        f"{len(lost_or_twice)} users' lifetime counts differ: {lost_or_twice[:5]}" + tail
    )
    features = [
        f"{user}: {compute_features(got[user])} != {compute_features(state)}"
        for user, state in want.items()
        if compute_features(got[user]) != compute_features(state)
    ]
    assert not features, f"{len(features)} feature vectors differ: {features[:3]}"
    assert not differences(got, want, None), "raw feature states differ from the reference"


EVERYONE = """
[[campaign]]
name = "kill9-everyone"
policy = "threshold"
threshold = 0.0
discount_pct = 10
decision_interval_s = 0
"""


async def output_ids(
    services: Services, topic: str, field: str, timeout_s: float, partitions: int = PARTITIONS
) -> Counter[str]:
    """How often each id appears on an output topic (``partitions`` of them), read to its end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=services.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    ids: Counter[str] = Counter()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        end = await consumer.end_offsets(assigned)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in assigned]
            if all(pos >= end[tp] for pos, tp in zip(positions, assigned, strict=True)):
                return ids
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                ids.update(str(orjson.loads(r.value)[field]) for r in records)
    finally:
        await consumer.stop()
    raise AssertionError(f"could not read {topic} to its end within {timeout_s:.0f} s")


async def test_kill9_loses_no_offers(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(EVERYONE)
    events = simulated_events()
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=load_campaigns(campaigns),
        config=EngineConfig(allowed_lateness_ms=ALLOWED_LATENESS_S * 1000),
    )
    expected = await engine.process([Incoming(parse_event(e)) for e in events])
    want_offers = {o.offer_id for o in expected.offers}
    want_decisions = {d.decision_id for d in expected.decisions}
    assert want_offers, "the campaign should make an offer for every trigger event"

    topics = Topics(isolation.topic_prefix)
    worker = kill9_worker(
        services, isolation, free_port, tmp_path / "worker.log", campaigns=campaigns
    )
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS)
        total = await produce_events(services, topics, events)
        runs = await run_with_kills(services, isolation, worker, total)
        offers = await output_ids(services, topics.offers, "offer_id", 30)
        decisions = await output_ids(services, topics.decisions, "decision_id", 30)
    finally:
        await clean_up(services, isolation)
    lost_offers = want_offers - set(offers)
    lost_decisions = want_decisions - set(decisions)
    twice = sum(n - 1 for n in offers.values())
    print("\n" + runs.report(f"offers: {total} events"))
    print(
        f"  offers: {len(want_offers)} expected, {len(lost_offers)} lost, {twice} duplicated, "
        f"{len(set(offers) - want_offers)} unexpected; decisions: {len(want_decisions)} "
        f"expected, {len(lost_decisions)} lost"
    )
    assert runs.exit_code == 0, worker.tail()
    assert not set(offers) - want_offers, "offers for events that should trigger none"
    assert not lost_offers, f"{len(lost_offers)} of {len(want_offers)} offers lost"
