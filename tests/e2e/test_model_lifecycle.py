"""Worker + learner on real Kafka and Redis: labels flow to the learner, snapshots flow back,
and restarts of either keep the model version."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from engine.analysis.simulation.world import open_loop
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.model_store import ModelStore
from streams.settings import Settings, Topics
from tests.conftest import REPO, Isolation, Services
from tests.model_keys import SIGNING_PEM, learner_key_env, worker_key_env
from tests.worker_process import WorkerProcess, clean_up, produce_events, read_topic, worker_env

pytestmark = pytest.mark.e2e


def version_number(version: str) -> int:
    return int(version.split("-")[-1])


async def latest_version(services: Services, isolation: Isolation) -> str | None:
    client = services.redis()
    try:
        return await ModelStore(client, prefix=isolation.redis_prefix).latest_version()
    finally:
        await client.aclose()


async def wait_for_version(
    services: Services, isolation: Isolation, at_least: int, timeout_s: float
) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        version = await latest_version(services, isolation)
        if version is not None and version_number(version) >= at_least:
            return version
        await asyncio.sleep(0.5)
    raise AssertionError(f"no model version >= {at_least} within {timeout_s:.0f} s")


async def decisions_after(services: Services, topic: str, after_ts: int) -> list[dict]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka_bootstrap,
        **services.kafka_options(),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[dict] = []
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < 4:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                idle_since = time.monotonic()
                out.extend(
                    d for d in (orjson.loads(r.value) for r in records) if d["ts"] >= after_ts
                )
    finally:
        await consumer.stop()
    return out


class Learner:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "learner"],
                env={**os.environ, **self.env},
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=60)

    def tail(self) -> str:
        return "\n--- learner log ---\n" + self.log_path.read_text(errors="replace")[-3000:]


def test_labels_train_the_learner_and_restarts_keep_the_model_version(
    services: Services, isolation: Isolation, tmp_path: Path, free_port: int
) -> None:
    topics = Topics(isolation.topic_prefix)
    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap, topics.all, partitions=4, security=services.kafka_security
        )
    )
    env = worker_env(
        services,
        isolation,
        attribution_window_s=120,
        learner_snapshot_every=100,
        learner_snapshot_interval_s=1,
        http_port=free_port,
    )
    now = int(time.time() * 1000)
    first = list(
        open_loop(users=100, events=3000, seed=5, start_ms=now - 3 * 3600_000, mean_gap_ms=1500)
    )
    # Later in event time than ``first`` (which ends about 1 h 45 min ago), and not in the future.
    second = list(
        open_loop(users=100, events=300, seed=6, start_ms=now - 1800_000, mean_gap_ms=100)
    )
    # The learner holds the private key, the worker only the public one; the learner runs as
    # its own Redis ACL user when the services have them (make test-secure).
    worker = WorkerProcess({**env, **worker_key_env()}, tmp_path / "worker.log")
    learner = Learner(
        {**env, **services.env("learner"), **learner_key_env()}, tmp_path / "learner.log"
    )
    try:
        learner.start()
        worker.start()
        asyncio.run(produce_events(services, topics, first))
        published = asyncio.run(wait_for_version(services, isolation, 100, 120))
        assert worker.stop() == 0, worker.tail()
        # Worker and learner share the delayed-feedback method (dfm by default, its wait half
        # of this short window): the training topic carries what it learns from, the label
        # after the wait (elapsed) and the final one (closed).
        kinds = {t["kind"] for t in asyncio.run(read_topic(services, topics.training, 2.0))}
        assert Settings.from_env(env).feedback.method.value == "dfm"
        assert {"elapsed", "closed"} <= kinds <= {"elapsed", "converted", "closed"}, kinds

        # A restarted worker scores with the newest published model from its first batch on.
        worker.start()
        asyncio.run(worker.wait_progress(lambda p: True, timeout_s=60))
        assert learner.stop() == 0, learner.tail()
        kept = asyncio.run(latest_version(services, isolation))
        assert kept is not None and version_number(kept) >= version_number(published)
        asyncio.run(produce_events(services, topics, second))
        asyncio.run(worker.wait_progress(lambda p: p["consumed"] >= len(second), 90))
        late_decisions = asyncio.run(
            decisions_after(services, topics.decisions, int(second[0]["ts"]))  # type: ignore[call-overload]
        )
        assert late_decisions, worker.tail()
        versions = {d["model_version"] for d in late_decisions}
        assert versions == {kept}, (versions, kept, worker.tail())

        # A restarted learner resumes from its last snapshot: the version never goes back.
        learner.start()
        resumed = asyncio.run(wait_for_version(services, isolation, version_number(kept), 60))
        assert version_number(resumed) >= version_number(kept)
    finally:
        if learner.process is not None and learner.process.poll() is None:
            learner.stop()
        worker.stop()
        asyncio.run(clean_up(services, isolation))
    assert "scoring with model lr-" in worker.log_text()
    logs = worker.log_text() + learner.log_path.read_text()
    assert SIGNING_PEM.splitlines()[1] not in logs
    assert "MODEL_SIGNING_KEY is set in the worker" not in logs
