"""Readiness follows Redis: false within 30 s of Redis stopping, true again once it is back.

The shared Redis is never stopped: the worker gets a private ``redis-server`` of its own on a
free port (Debian's package, the one ``deploy/services.sh`` installs).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streams.adapters.kafka_io import ensure_topics
from streams.settings import Topics
from tests.conftest import Isolation, Services, without_redis_security
from tests.model_keys import publish_trained, worker_key_env
from tests.private_redis import REDIS_SERVER, PrivateRedis
from tests.worker_process import WorkerProcess, clean_up, worker_env

pytestmark = pytest.mark.e2e

READINESS_DEADLINE_S = 30.0
"""The issue's bound: readiness turns false within this long after Redis stops."""
START_TIMEOUT_S = 90.0


def ready(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return None


def wait_ready(port: int, want: bool, timeout_s: float, worker: WorkerProcess) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = ready(port)
        if last is not None and last[1]["ready"] is want:
            assert last[0] == (200 if want else 503), last
            return last[1]
        assert worker.alive(), "the worker exited" + worker.tail()
        time.sleep(0.5)
    raise AssertionError(
        f"ready={want} not within {timeout_s:.0f} s (last: {last})" + worker.tail()
    )


@pytest.fixture
def private_redis(tmp_path: Path, free_port: int) -> Iterator[PrivateRedis]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = PrivateRedis(tmp_path, port=free_port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def another_port(*taken: int) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            return port


def test_readiness_turns_false_when_redis_stops_and_true_when_it_returns(
    services: Services, isolation: Isolation, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    topics = Topics(isolation.topic_prefix)
    asyncio.run(
        ensure_topics(
            services.kafka_bootstrap, topics.all, partitions=1, security=services.kafka_security
        )
    )
    http_port = another_port(private_redis.port)
    env = {
        **without_redis_security(worker_env(services, isolation, http_port=http_port)),
        **worker_key_env(),
    }
    env["DEALSTREAM_REDIS_URL"] = private_redis.url
    # A learner's model, without which the worker would not be ready at all.
    plain = aioredis.Redis.from_url(private_redis.url)
    asyncio.run(publish_trained(plain, isolation.redis_prefix))
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start()
    try:
        body = wait_ready(http_port, True, START_TIMEOUT_S, worker)
        assert body["checks"]["redis"]["ok"] is True

        private_redis.stop()
        stopped = time.monotonic()
        body = wait_ready(http_port, False, READINESS_DEADLINE_S, worker)
        assert time.monotonic() - stopped <= READINESS_DEADLINE_S
        assert body["checks"]["redis"]["ok"] is False
        assert any(reason.startswith("redis: ") for reason in body["reasons"]), body
        assert body["checks"]["partitions"]["ok"] is True  # only Redis is the matter

        private_redis.start()
        body = wait_ready(http_port, True, READINESS_DEADLINE_S, worker)
        assert body["reasons"] == []
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
            assert r.status == 200  # alive all along
    finally:
        worker.stop()
        asyncio.run(clean_up(services, isolation))
