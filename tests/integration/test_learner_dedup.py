"""The learner learns each training example once, against real Kafka and Redis: a training
topic with copies interleaved (as a worker's outbox re-publishes them after a crash) gives the
model learned from each example once, across a learner crash and restart too.

Each test uses its own topic prefix, Redis key prefix and consumer group (``isolation``) and
deletes its Redis keys at the end; nothing is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from engine.model.prequential import OnlineLearner
from engine.model.purchase_model import PurchaseModel
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.model_store import ModelStore
from streams.learner.process import Learner
from streams.settings import LearnerSettings, Secret, Settings
from tests.conftest import Isolation, Services
from tests.model_keys import SIGNING_PEM, VERIFY_KEY
from tests.synthetic_training import SYNTHETIC_FEEDBACK, training_examples

pytestmark = pytest.mark.integration


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


@contextlib.asynccontextmanager
async def training_topic(
    services: Services, isolation: Isolation, partitions: int
) -> AsyncIterator[Settings]:
    settings = Settings(
        kafka_bootstrap=services.kafka_bootstrap,
        topic_prefix=isolation.topic_prefix,
        redis_prefix=isolation.redis_prefix,
        group_id=isolation.group_id,
        partitions=partitions,
        feedback=SYNTHETIC_FEEDBACK,
    )
    await ensure_topics(settings.kafka_bootstrap, [settings.topics.training], partitions=partitions)
    try:
        yield settings
    finally:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            with contextlib.suppress(Exception):
                await admin.delete_topics([settings.topics.training])
        finally:
            await admin.close()


async def produce(settings: Settings, values: list[bytes]) -> None:
    """Keyed by decision id with the default partitioner, as the worker publishes them."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                settings.topics.training,
                key=orjson.loads(value)["decision_id"].encode(),
                value=value,
            )
            for value in values
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def with_copies(
    values: list[bytes], *, seed: int, share: float, lag: int
) -> tuple[list[bytes], list[int]]:
    """``values`` in order with a copy of about ``share`` of them 0 to ``lag`` values later;
    also the position in the result of each copy's original."""
    rng = random.Random(seed)
    stream: list[bytes] = []
    originals: list[int] = []
    due: list[tuple[int, int]] = []  # (index of the value after which it comes, original)
    for index, value in enumerate(values):
        stream.append(value)
        if rng.random() < share:
            due.append((index + rng.randint(0, lag), len(stream) - 1))
        for item in [d for d in due if d[0] <= index]:
            stream.append(stream[item[1]])
            originals.append(item[1])
        due = [d for d in due if d[0] > index]
    for _, original in due:
        stream.append(stream[original])
        originals.append(original)
    return stream, originals


async def wait_until(condition: Callable[[], bool], what: str, task: asyncio.Task[None]) -> None:
    """Poll ``condition``; a generous timeout only turns a hang into a readable failure."""
    deadline = asyncio.get_running_loop().time() + 90.0
    while not condition():
        if task.done():
            task.result()
            pytest.fail(f"the learner returned before {what}")
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def parameters(model: PurchaseModel) -> list[tuple[object, ...]]:
    """Every learned number of the purchase model and the two auxiliary ones: the scalers'
    counts, means and variances, the weights, intercepts and optimiser steps. (Their pickles
    are not compared: a snapshot's restore pickles the same numbers to other bytes.)"""
    found = []
    mine = model.river_pipelines()
    for pipeline in (mine.purchase, mine.late, mine.never):
        scaler, classifier = pipeline.steps.values()
        found.append(
            (
                dict(scaler.counts),
                dict(scaler.means),
                dict(scaler.vars),
                dict(classifier._weights),
                classifier.intercept,
                classifier.optimizer.n_iterations,
            )
        )
    return found


async def test_copies_across_a_learner_crash_are_learned_once(
    services: Services, isolation: Isolation, redis_client: aioredis.Redis
) -> None:
    """One partition (one reading order), so the model must equal the reference exactly."""
    examples = [d.example for d in training_examples(1200, seed=21)]
    stream, originals = with_copies([orjson.dumps(e) for e in examples], seed=4, share=0.3, lag=60)
    resume_at = 800  # the checkpoint learner 1 publishes last (snapshots every 400 records)
    pairs = list(zip(originals, copy_offsets(stream, originals), strict=True))
    assert max(copy - at for at, copy in pairs) <= 200  # within the window (dedup_window)
    straddling = sum(1 for at, copy in pairs if at < resume_at <= copy)
    assert straddling >= 5, "the stream must hold copies on both sides of the checkpoint"
    reference = OnlineLearner(window=1000, feedback=SYNTHETIC_FEEDBACK)
    for example in examples:
        reference.learn(example)

    config = LearnerSettings(
        signing_key=Secret(SIGNING_PEM),
        snapshot_every=400,
        snapshot_interval_s=3600.0,  # only count-based snapshots: the checkpoint is at 800
        metrics_window=1000,
        lease_ttl_s=5.0,
        dedup_window=200,
    )
    store = ModelStore(redis_client, prefix=isolation.redis_prefix, verify_key=VERIFY_KEY)
    async with training_topic(services, isolation, partitions=1) as settings:
        await produce(settings, stream[:1000])
        first = Learner(settings, config, redis=redis_client)
        task = asyncio.create_task(first.run(asyncio.Event()))
        await wait_until(lambda: first.counters.consumed == 1000, "1,000 records read", task)
        await wait_until(lambda: first.counters.snapshots == 2, "2 snapshots", task)
        task.cancel()  # a crash: records 800-999 are learned again after the restart
        with contextlib.suppress(asyncio.CancelledError):
            await task
        checkpoint = await store.checkpoint()
        assert checkpoint is not None and sum(checkpoint["offsets"].values()) == resume_at
        assert first.counters.duplicates == sum(
            1 for c in copy_offsets(stream, originals) if c < 1000
        )

        await produce(settings, stream[1000:])
        second = Learner(settings, replace(config, snapshot_interval_s=0.2), redis=redis_client)
        stop = asyncio.Event()
        task = asyncio.create_task(second.run(stop))
        tail = len(stream) - resume_at
        await wait_until(lambda: second.counters.consumed == tail, f"{tail} records read", task)
        stop.set()
        await asyncio.wait_for(task, 60)

    counters = second.counters
    assert counters.duplicates == sum(1 for c in copy_offsets(stream, originals) if c >= resume_at)
    assert counters.learned + counters.duplicates == tail and counters.invalid == 0
    assert second.online is not None
    learned = second.online
    assert learned.model.version == reference.model.version == f"lr-{len(examples)}"
    assert parameters(learned.model) == parameters(reference.model)
    assert learned.metrics.to_state() == reference.metrics.to_state()
    published = await store.load_latest()
    assert published is not None and parameters(published.model) == parameters(reference.model)
    assert second.status()["duplicates"] == counters.duplicates


def copy_offsets(stream: list[bytes], originals: list[int]) -> list[int]:
    """The offset of each copy (in ``originals`` order): the values seen again, in order."""
    seen: set[bytes] = set()
    offsets = []
    for offset, value in enumerate(stream):
        if value in seen:
            offsets.append(offset)
        seen.add(value)
    assert len(offsets) == len(originals)
    return offsets


async def test_copies_on_several_partitions_are_learned_once(
    services: Services, isolation: Isolation, redis_client: aioredis.Redis
) -> None:
    """Three partitions: the reading order across them varies, so the test checks what does
    not depend on it (every example learned once, every copy counted)."""
    examples = [d.example for d in training_examples(900, seed=23)]
    stream, originals = with_copies([orjson.dumps(e) for e in examples], seed=5, share=0.4, lag=100)
    config = LearnerSettings(
        signing_key=Secret(SIGNING_PEM), snapshot_interval_s=0.2, lease_ttl_s=5.0, dedup_window=500
    )
    async with training_topic(services, isolation, partitions=3) as settings:
        await produce(settings, stream)
        learner = Learner(settings, config, redis=redis_client)
        stop = asyncio.Event()
        task = asyncio.create_task(learner.run(stop))
        await wait_until(
            lambda: learner.counters.consumed == len(stream), "every record read", task
        )
        stop.set()
        await asyncio.wait_for(task, 60)
    assert (learner.counters.learned, learner.counters.duplicates) == (
        len(examples),
        len(originals),
    )
    assert learner.online is not None and learner.online.model.version == f"lr-{len(examples)}"
