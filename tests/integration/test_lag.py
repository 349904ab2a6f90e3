"""Consumer lag against a real broker: ``dealstream lag``, the worker's gauge, rebalances.

With the worker stopped, N produced events are N records of lag for ``dealstream lag --json``
and for the gauge the worker exports (the same ``WorkerStatus.refresh`` code, run in-process);
once a worker runs, the lag drains to 0 in both, and stays right when a second worker joins and
leaves (every worker reports the whole group's lag from the broker, so both agree).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from engine.analysis.simulation.world import open_loop
from engine.features.store import InMemoryFeatureStore
from engine.pipeline import DiscountEngine, EngineConfig
from streams.adapters.decode import DecodeLimits
from streams.adapters.kafka_io import ensure_topics
from streams.operations.lag import LagProbe, consumer_lag
from streams.operations.metrics import WorkerMetrics
from streams.settings import Topics
from streams.worker.batch_worker import BatchWorker
from streams.worker.http_endpoints import WorkerStatus
from tests.conftest import REPO, Isolation, Services
from tests.sinks import ListSink
from tests.worker_process import WorkerProcess, clean_up, worker_env

pytestmark = pytest.mark.integration

PARTITIONS = 4
AGE_MS = 600_000
"""The produced records carry Kafka timestamps this far in the past: a known minimum time lag."""
GROUP_SETTINGS = {"DEALSTREAM_SESSION_TIMEOUT_S": "6"}
"""The event consumer's session (6 s, the broker's minimum): quick group joins and leaves."""
DRAIN_TIMEOUT_S = 120.0
SCRAPE_TIMEOUT_S = 60.0


@pytest.fixture
def cleanup(services: Services, isolation: Isolation) -> Iterator[None]:
    yield
    asyncio.run(clean_up(services, isolation))


def events(count: int, seed: int) -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    return list(
        open_loop(users=50, events=count, seed=seed, start_ms=now_ms - 3_600_000, mean_gap_ms=500)
    )


async def produce(services: Services, topics: Topics, batch: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        stamp = int(time.time() * 1000) - AGE_MS
        for event in batch:
            await producer.send(
                f"{topics.prefix}events.{event['type']}",
                orjson.dumps(event),
                key=str(event["user_id"]).encode(),
                timestamp_ms=stamp,
            )
        await producer.flush()
    finally:
        await producer.stop()


def lag_cli(services: Services, isolation: Isolation, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "streams.cli", "lag", "--json", *args],
        env={**os.environ, **isolation.env(services)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Scrape:
    """The worker's /metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def lag_gauge(sampled: Scrape) -> dict[str, float]:
    return {
        f"{dict(labels)['topic']}[{dict(labels)['partition']}]": value
        for (name, labels), value in sampled.items()
        if name == "dealstream_consumer_lag"
    }


def gauge(sampled: Scrape, name: str) -> float:
    return sampled.get((name, ()), -1.0)


async def eventually(
    probe: Callable[[], Awaitable[Any]],
    accept: Callable[[Any], bool],
    timeout_s: float,
    what: str,
    worker: WorkerProcess | None = None,
) -> Any:
    """Poll ``probe`` until ``accept`` says yes; fail with the last value otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except OSError as exc:  # the worker's web server is not up yet
            last = exc
        else:
            if accept(last):
                return last
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker exited while waiting for {what}" + worker.tail())
        await asyncio.sleep(0.5)
    tail = worker.tail() if worker is not None else ""
    raise AssertionError(f"{what} not reached within {timeout_s:.0f} s (last: {last})" + tail)


def another_port(taken: int) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != taken:
            return port


async def exported_lag(
    services: Services, isolation: Isolation
) -> tuple[dict[str, float], dict[str, float]]:
    """What a worker exports right now (``WorkerStatus.refresh`` with a real ``LagProbe``):
    the lag and time-lag gauges by ``topic[partition]``."""
    metrics = WorkerMetrics()
    worker = BatchWorker(
        DiscountEngine(InMemoryFeatureStore(), config=EngineConfig(learn_inline=False)),
        ListSink(),
        topics=Topics(isolation.topic_prefix),
        limits=DecodeLimits(),
        metrics=metrics,
    )
    probe = LagProbe(services.kafka_bootstrap)
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        status = WorkerStatus(worker, redis=client, group=isolation.group_id, probe=probe)
        await status.refresh()
        assert status.lag_error is None, status.lag_error
    finally:
        await probe.close()
        await client.aclose()
    records: dict[str, float] = {}
    seconds: dict[str, float] = {}
    targets = {"dealstream_consumer_lag": records, "dealstream_consumer_lag_seconds": seconds}
    for family in metrics.registry.collect():
        target = targets.get(family.name)
        if target is None:
            continue
        for s in family.samples:
            target[f"{s.labels['topic']}[{s.labels['partition']}]"] = s.value
    return records, seconds


def scraper(port: int) -> Callable[[], Awaitable[Scrape]]:
    async def run() -> Scrape:
        return await asyncio.to_thread(scrape, port)

    return run


def test_lag_is_counted_with_the_worker_stopped_and_drains_to_zero_once_it_runs(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path, cleanup: None
) -> None:
    topics = Topics(isolation.topic_prefix)
    asyncio.run(ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS))
    produced = events(400, seed=11)
    asyncio.run(produce(services, topics, produced))
    n = len(produced)

    report = lag_cli(services, isolation)
    assert report["group"] == isolation.group_id
    assert report["total_lag"] == n
    assert len(report["partitions"]) == 3 * PARTITIONS
    assert all(p["committed"] is None for p in report["partitions"])
    nonempty = [p for p in report["partitions"] if p["end"] > 0]
    assert nonempty and all(p["lag_seconds"] >= AGE_MS / 1000 for p in nonempty)

    records, seconds = asyncio.run(exported_lag(services, isolation))
    assert len(records) == 3 * PARTITIONS
    assert sum(records.values()) == n
    assert {k: v for k, v in records.items() if v} == {
        f"{p['topic']}[{p['partition']}]": p["lag"] for p in nonempty
    }
    assert all(seconds[f"{p['topic']}[{p['partition']}]"] >= AGE_MS / 1000 for p in nonempty)

    worker = WorkerProcess(
        {**worker_env(services, isolation, http_port=free_port), **GROUP_SETTINGS},
        tmp_path / "worker.log",
    )
    worker.start()
    try:

        async def drained() -> None:
            await eventually(
                lambda: consumer_lag(services.kafka_bootstrap, isolation.group_id, topics.events),
                lambda rows: sum(r.lag for r in rows) == 0,
                DRAIN_TIMEOUT_S,
                "lag 0 on the broker",
                worker,
            )
            sampled = await eventually(
                scraper(free_port),
                lambda s: len(lag_gauge(s)) == 3 * PARTITIONS and sum(lag_gauge(s).values()) == 0,
                SCRAPE_TIMEOUT_S,
                "the worker's lag gauge at 0 on every partition",
                worker,
            )
            assert gauge(sampled, "dealstream_assigned_partitions") == 3 * PARTITIONS
            assert gauge(sampled, "dealstream_events_applied_total") == n

        asyncio.run(drained())
        report = lag_cli(services, isolation)
        assert report["total_lag"] == 0
        assert report["max_lag_seconds"] == 0.0
        assert all(p["lag"] == 0 and p["lag_seconds"] == 0 for p in report["partitions"])
        assert all(p["committed"] == p["end"] for p in report["partitions"] if p["end"] > 0)
    finally:
        worker.stop()


def test_a_partition_whose_log_start_moved_counts_from_it_when_never_committed(
    services: Services, isolation: Isolation, cleanup: None
) -> None:
    topics = Topics(isolation.topic_prefix)
    asyncio.run(ensure_topics(services.kafka_bootstrap, topics.events, partitions=1))

    async def scenario() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=services.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for _ in range(10):
                await producer.send_and_wait(topics.browse, b"{}", key=b"u", partition=0)
        finally:
            await producer.stop()
        admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_records({TopicPartition(topics.browse, 0): RecordsToDelete(4)})
        finally:
            await admin.close()

    asyncio.run(scenario())
    report = lag_cli(services, isolation, "--group", f"{isolation.group_id}-never")
    browse = next(p for p in report["partitions"] if p["topic"] == topics.browse)
    assert (browse["start"], browse["end"], browse["committed"], browse["lag"]) == (4, 10, None, 6)
    assert report["total_lag"] == 6


def test_the_lag_gauge_stays_right_when_a_second_worker_joins_and_leaves(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path, cleanup: None
) -> None:
    topics = Topics(isolation.topic_prefix)
    asyncio.run(ensure_topics(services.kafka_bootstrap, topics.all, partitions=PARTITIONS))
    all_partitions = 3 * PARTITIONS
    port_a, port_b = free_port, another_port(free_port)
    first = WorkerProcess(
        {**worker_env(services, isolation, http_port=port_a), **GROUP_SETTINGS},
        tmp_path / "worker-a.log",
    )
    second = WorkerProcess(
        {**worker_env(services, isolation, http_port=port_b), **GROUP_SETTINGS},
        tmp_path / "worker-b.log",
    )

    async def drained(ports: list[int], worker: WorkerProcess, what: str) -> None:
        await eventually(
            lambda: consumer_lag(services.kafka_bootstrap, isolation.group_id, topics.events),
            lambda rows: sum(r.lag for r in rows) == 0,
            DRAIN_TIMEOUT_S,
            f"lag 0 on the broker {what}",
            worker,
        )
        for port in ports:  # every worker reports every partition of the group
            await eventually(
                scraper(port),
                lambda s: len(lag_gauge(s)) == all_partitions and sum(lag_gauge(s).values()) == 0,
                SCRAPE_TIMEOUT_S,
                f"lag gauge 0 on port {port} {what}",
                worker,
            )

    async def assigned(port: int, expected: Callable[[float], bool], what: str) -> float:
        sampled = await eventually(
            scraper(port),
            lambda s: expected(gauge(s, "dealstream_assigned_partitions")),
            SCRAPE_TIMEOUT_S,
            what,
        )
        return gauge(sampled, "dealstream_assigned_partitions")

    first.start()
    try:
        asyncio.run(produce(services, topics, events(200, seed=21)))
        asyncio.run(drained([port_a], first, "with one worker"))
        assert asyncio.run(assigned(port_a, lambda v: v == all_partitions, "A owns all"))

        second.start()
        try:
            # After the rebalance the two split the partitions between them.
            share_b = asyncio.run(assigned(port_b, lambda v: 0 < v < all_partitions, "B joined"))
            share_a = asyncio.run(
                assigned(port_a, lambda v: v == all_partitions - share_b, "A gave some up")
            )
            assert share_a + share_b == all_partitions
            asyncio.run(produce(services, topics, events(300, seed=22)))
            asyncio.run(drained([port_a, port_b], second, "with two workers"))
            rebalances = scrape(port_a)[("dealstream_rebalances_total", ())]
            assert rebalances >= 2
        finally:
            second.stop()

        asyncio.run(assigned(port_a, lambda v: v == all_partitions, "A owns all again"))
        asyncio.run(produce(services, topics, events(200, seed=23)))
        asyncio.run(drained([port_a], first, "after the second worker left"))
        assert lag_cli(services, isolation)["total_lag"] == 0
        assert scrape(port_a)[("dealstream_rebalances_total", ())] >= rebalances + 1
    finally:
        first.stop()
