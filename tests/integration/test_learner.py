"""The learner against real Kafka and Redis: learn, publish, crash, resume exactly once, reload.

Each test uses its own topic prefix, Redis key prefix and consumer group (``isolation``) and
deletes its Redis keys at the end (``SCAN MATCH prefix*``); nothing is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.errors import ModelSnapshotError
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.model_store import ModelReloader, ModelStore
from streams.learner.process import Learner
from streams.settings import LearnerSettings, Secret, Settings
from tests.conftest import REPO, Isolation, Services
from tests.model_keys import SIGNING_PEM, VERIFY_KEY, learner_key_env
from tests.synthetic_training import SYNTHETIC_FEEDBACK, training_examples
from tests.worker_process import log_entries

pytestmark = pytest.mark.integration

PARTITIONS = 3
POISON = (b"not json at all", orjson.dumps({"decision_id": "bad", "features": {}}))


@pytest.fixture
async def redis_client(services: Services, isolation: Isolation) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{isolation.redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def settings(services: Services, isolation: Isolation) -> AsyncIterator[Settings]:
    value = Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        topic_prefix=isolation.topic_prefix,
        redis_prefix=isolation.redis_prefix,
        group_id=isolation.group_id,
        partitions=PARTITIONS,
        feedback=SYNTHETIC_FEEDBACK,
    )
    await ensure_topics(value.kafka_bootstrap, [value.topics.training], partitions=PARTITIONS)
    yield value
    admin = AIOKafkaAdminClient(bootstrap_servers=value.kafka_bootstrap)
    await admin.start()
    try:
        with contextlib.suppress(Exception):
            await admin.delete_topics([value.topics.training])
    finally:
        await admin.close()


async def produce(settings: Settings, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        futures = [
            await producer.send(settings.topics.training, key=str(i).encode(), value=value)
            for i, value in enumerate(values)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def encoded(n: int, *, seed: int, start: int = 0) -> list[bytes]:
    return [orjson.dumps(d.example) for d in training_examples(n, seed=seed, start=start)]


def check_alive(task: asyncio.Task[None] | None) -> None:
    if task is not None and task.done():
        task.result()  # raises the learner's exception, if any
        pytest.fail("the learner returned early")


async def wait_until(
    condition: Callable[[], bool], what: str, task: asyncio.Task[None] | None = None
) -> None:
    """Poll ``condition``; a generous timeout only turns a hang into a readable failure."""
    deadline = asyncio.get_running_loop().time() + 90.0
    while not condition():
        check_alive(task)
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_for_version(
    store: ModelStore, version: str, task: asyncio.Task[None] | None = None
) -> None:
    deadline = asyncio.get_running_loop().time() + 90.0
    latest = await store.latest_version()
    while latest != version:
        check_alive(task)
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for model {version}; latest is {latest}")
        await asyncio.sleep(0.05)
        latest = await store.latest_version()


async def committed_total(settings: Settings) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{settings.group_id}-learner",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        total = 0
        for partition in range(PARTITIONS):
            offset = await consumer.committed(TopicPartition(settings.topics.training, partition))
            total += offset or 0
        return total
    finally:
        await consumer.stop()


async def stop_task(task: asyncio.Task[None], stop: asyncio.Event | None = None) -> None:
    """Graceful stop with ``stop``; without it, cancel the task (the learner's crash path)."""
    if stop is not None:
        stop.set()
        await asyncio.wait_for(task, 60)
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def probe_predictions(learner_model: object) -> list[float]:
    from engine.model.purchase_model import PurchaseModel

    assert isinstance(learner_model, PurchaseModel)
    rows = [d.example for d in training_examples(20, seed=99)]
    return [
        learner_model.predict_one(r["features"], r["discount_pct"])  # type: ignore[arg-type]
        for r in rows
    ]


async def test_learn_publish_crash_resume_exactly_once_and_reload(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    config = LearnerSettings(
        signing_key=Secret(SIGNING_PEM),
        snapshot_every=700,
        snapshot_interval_s=3600.0,  # phase 1: only count-based snapshots
        keep_versions=3,
        metrics_window=1000,
        lease_ttl_s=5.0,
    )
    store = ModelStore(redis_client, prefix=settings.redis_prefix, keep=3, verify_key=VERIFY_KEY)
    first = encoded(3000, seed=7)
    await produce(settings, [*first[:1000], POISON[0], *first[1000:2000], POISON[1], *first[2000:]])

    # Phase 1: learn everything, publish every 700 records, then "crash" (no final snapshot).
    learner = Learner(settings, config, redis=redis_client)
    task = asyncio.create_task(learner.run(asyncio.Event()))
    await wait_until(lambda: learner.counters.consumed == 3002, "3,002 records consumed", task)
    await wait_until(lambda: learner.counters.snapshots == 4, "4 snapshots", task)
    assert learner.counters.invalid == 2
    assert learner.online is not None and learner.online.model.examples_learned == 3000
    crashed_at = await store.latest_version()
    assert crashed_at is not None and crashed_at != "lr-3000"
    published_learned = int(crashed_at.removeprefix("lr-"))
    assert 2797 <= published_learned <= 2800  # 2,800 records, up to 2 of them poison
    kept = await store.versions()
    assert len(kept) == 3 and kept[-1] == crashed_at
    stored = [k async for k in redis_client.scan_iter(match=store.snapshot_key("lr-*"))]
    assert len(stored) == 3  # the oldest of the 4 snapshots was trimmed
    await stop_task(task)
    assert await committed_total(settings) == 2800  # committed only what a snapshot includes

    # Phase 2: restart; resume from the snapshot, relearn only the 202 records after it.
    learner2 = Learner(settings, replace(config, snapshot_interval_s=0.2), redis=redis_client)
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(learner2.run(stop2))
    await wait_for_version(store, "lr-3000", task2)
    await stop_task(task2, stop2)
    assert learner2.counters.consumed == 202
    assert learner2.counters.learned == 3000 - published_learned
    assert learner2.online is not None and learner2.online.model.examples_learned == 3000
    assert await committed_total(settings) == 3002
    metrics = learner2.online.metrics
    assert metrics.seen == 3000  # the window was restored with the snapshot, not restarted
    assert metrics.auc is not None and metrics.auc > 0.75
    print(f"\nafter 3,000: {orjson.dumps(metrics.as_dict()).decode()}")

    # A worker's reloader picks the model up, and only when it changes.
    reloader = ModelReloader(store)
    served = await reloader.poll(None)
    assert served is not None and served.version == "lr-3000"
    assert await reloader.poll(served.version) is None
    assert probe_predictions(served) == probe_predictions(learner2.online.model)

    # Phase 3: a graceful restart keeps the version and learns only the new examples;
    # a second learner meanwhile waits for the lease instead of publishing too.
    await produce(settings, encoded(500, seed=8, start=3000))
    learner3 = Learner(settings, replace(config, snapshot_interval_s=0.2), redis=redis_client)
    stop3 = asyncio.Event()
    task3 = asyncio.create_task(learner3.run(stop3))
    await wait_until(lambda: learner3.online is not None, "learner 3 to start", task3)
    rival = Learner(settings, config, redis=redis_client)
    stop_rival = asyncio.Event()
    rival_task = asyncio.create_task(rival.run(stop_rival))
    await wait_for_version(store, "lr-3500", task3)
    check_alive(rival_task)
    assert rival.online is None  # still waiting for the lease
    await stop_task(rival_task, stop_rival)
    await stop_task(task3, stop3)
    assert learner3.counters.consumed == 500
    assert learner3.online is not None and learner3.online.model.examples_learned == 3500
    metrics3 = learner3.online.metrics
    assert metrics3.auc is not None and metrics3.auc > 0.75
    print(f"after 3,500: prequential AUC {metrics3.auc:.4f}, log loss {metrics3.log_loss:.4f}")

    newer = await reloader.poll(served.version)
    assert newer is not None and newer.version == "lr-3500"
    assert probe_predictions(newer) == probe_predictions(learner3.online.model)

    checkpoint = await store.checkpoint()
    assert checkpoint is not None and checkpoint["version"] == "lr-3500"
    assert sum(checkpoint["offsets"].values()) == 3502


async def test_snapshots_that_do_not_verify_are_refused(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    config = LearnerSettings(
        signing_key=Secret(SIGNING_PEM), snapshot_interval_s=0.1, lease_ttl_s=5.0
    )
    store = ModelStore(redis_client, prefix=settings.redis_prefix, verify_key=VERIFY_KEY)
    await produce(settings, encoded(50, seed=1))
    learner = Learner(settings, config, redis=redis_client)
    stop = asyncio.Event()
    task = asyncio.create_task(learner.run(stop))
    await wait_for_version(store, "lr-50", task)
    await stop_task(task, stop)

    # Signed with another key: refused by the store, the reloader and a restarting learner.
    stranger = ModelStore(
        redis_client,
        prefix=settings.redis_prefix,
        verify_key=Ed25519PrivateKey.generate().public_key(),
    )
    other = ModelReloader(stranger)
    assert await other.poll(None) is None
    assert [version for version, _ in other.refused] == ["lr-50"]
    with pytest.raises(ModelSnapshotError):
        await stranger.load_latest()

    # Tampered in Redis (one byte): same.
    blob = await redis_client.get(store.snapshot_key("lr-50"))
    assert isinstance(blob, bytes)
    await redis_client.set(store.snapshot_key("lr-50"), blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ModelSnapshotError, match="does not verify"):
        await store.load_latest()
    reloader = ModelReloader(store)
    assert await reloader.poll("lr-0") is None
    assert [version for version, _ in reloader.refused] == ["lr-50"]
    with pytest.raises(ModelSnapshotError):
        await Learner(settings, config, redis=redis_client).run(asyncio.Event())

    # Another version's (genuine) snapshot stored under this name: refused too.
    await redis_client.set(store.snapshot_key("lr-50"), blob)
    await redis_client.set(store.snapshot_key("lr-60"), blob)
    with pytest.raises(ModelSnapshotError, match="holds model lr-50"):
        await store.load("lr-60")


async def test_run_learner_stops_on_sigterm_after_publishing(
    services: Services,
    isolation: Isolation,
    settings: Settings,
    redis_client: aioredis.Redis,
    free_port: int,
) -> None:
    await produce(settings, encoded(300, seed=3))
    env = {
        **os.environ,
        **isolation.env(services),
        "DEALSTREAM_PARTITIONS": str(PARTITIONS),
        **learner_key_env(),
        "DEALSTREAM_LEARNER_SNAPSHOT_EVERY": "100000",
        "DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S": "3600",
        "DEALSTREAM_LEARNER_HTTP_PORT": str(free_port),
        "DEALSTREAM_FEEDBACK": SYNTHETIC_FEEDBACK.method.value,
    }
    code = (
        "import sys\n"
        "from streams.operations.logs import configure_logging\n"
        "from streams.settings import LearnerSettings, Settings\n"
        "from streams.learner.process import run_learner\n"
        "configure_logging('INFO', 'json')\n"
        "sys.exit(run_learner(Settings.from_env(), LearnerSettings.from_env()))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = ModelStore(redis_client, prefix=settings.redis_prefix)
    try:
        # Nothing is published before the interval; wait for the learner to hold its lease
        # and the group to have consumed, then ask it to stop: it publishes on the way out.
        await wait_for_lease(redis_client, store)
        # Its /metrics counts what it learned; /ready says it holds the lease.
        base = f"http://127.0.0.1:{free_port}"
        learned = await wait_for_metric(base, 'dealstream_learner_records_total{result="learned"}')
        assert learned == 300
        ready, body = await asyncio.to_thread(http_get, base + "/ready")
        assert ready == 200 and json.loads(body)["checks"]["lease"]["ok"], body
        exposition = (await asyncio.to_thread(http_get, base + "/metrics"))[1]
        assert 'dealstream_learner_lag{partition="0"} 0.0' in exposition, exposition
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert await store.latest_version() == "lr-300"
    assert SIGNING_PEM.splitlines()[1] not in stderr
    snapshots = log_entries(stderr, "snapshot")
    assert snapshots and snapshots[-1]["status"]["model_version"] == "lr-300"


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def wait_for_metric(base: str, sample: str, timeout_s: float = 60.0) -> float:
    """The value of ``sample`` on the learner's /metrics once it stops changing upward."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: float | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            _, text = await asyncio.to_thread(http_get, base + "/metrics")
        except OSError:
            await asyncio.sleep(0.2)
            continue
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(sample)]
        if values and values[0] == last and last > 0:
            return last
        last = values[0] if values else None
        await asyncio.sleep(0.5)
    pytest.fail(f"{sample} did not settle on {base}/metrics (last value {last})")


async def wait_for_lease(client: aioredis.Redis, store: ModelStore) -> None:
    deadline = asyncio.get_running_loop().time() + 60.0
    while not await client.exists(store.lease_key):
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("the learner subprocess never took its lease")
        await asyncio.sleep(0.05)
