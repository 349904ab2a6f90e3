"""Shared fixtures: real Kafka and Redis for integration and e2e tests, isolated per test.

Service resolution, in order: ``DEALSTREAM_KAFKA_BOOTSTRAP`` / ``DEALSTREAM_REDIS_URL`` when
set; else the local services started by ``deploy/services.sh`` (the same script as
``make services``); else testcontainers when a Docker engine answers. Never a mock.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.adapters.pseudonyms import Pseudonyms

REPO = Path(__file__).resolve().parents[1]
TEST_PSEUDONYM_KEY = "test-pseudonym-key-0123456789abcdef"
"""The pseudonym key every test process runs with (``DEALSTREAM_PSEUDONYM_KEY``)."""


def worker_pseudonyms() -> Pseudonyms:
    """The pseudonyms a worker started with ``Isolation.env`` stores user ids under."""
    return Pseudonyms(TEST_PSEUDONYM_KEY.encode())


@dataclass(frozen=True)
class Services:
    kafka_bootstrap: str
    redis_url: str


@dataclass(frozen=True)
class Isolation:
    """Names no other test uses: topic prefix, Redis key prefix, consumer group."""

    topic_prefix: str
    redis_prefix: str
    group_id: str

    def env(self, services: Services) -> dict[str, str]:
        return {
            "DEALSTREAM_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
            "DEALSTREAM_REDIS_URL": services.redis_url,
            "DEALSTREAM_TOPIC_PREFIX": self.topic_prefix,
            "DEALSTREAM_REDIS_PREFIX": self.redis_prefix,
            "DEALSTREAM_GROUP_ID": self.group_id,
            "DEALSTREAM_PSEUDONYM_KEY": TEST_PSEUDONYM_KEY,
        }


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    return result.returncode == 0


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    kafka = os.environ.get("DEALSTREAM_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("DEALSTREAM_REDIS_URL")
    if kafka and redis_url:
        yield Services(kafka, redis_url)
        return
    started = subprocess.run(
        ["bash", str(REPO / "deploy" / "services.sh"), "start"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if started.returncode == 0:
        yield Services(kafka or "127.0.0.1:9092", redis_url or "redis://127.0.0.1:6379/0")
        return
    if not _docker_answers():
        pytest.fail(
            "integration tests need Kafka and Redis: deploy/services.sh failed and no Docker "
            f"engine answers.\n{started.stdout}\n{started.stderr}"
        )
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with KafkaContainer("apache/kafka:4.1.1").with_kraft() as k, RedisContainer("redis:7") as r:
        host, port = r.get_container_host_ip(), r.get_exposed_port(6379)
        yield Services(k.get_bootstrap_server(), f"redis://{host}:{port}/0")


@pytest.fixture
def isolation() -> Isolation:
    tag = uuid.uuid4().hex[:10]
    return Isolation(topic_prefix=f"t{tag}.", redis_prefix=f"ds:t{tag}:", group_id=f"g{tag}")


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    return unused_port()
