"""Shared fixtures: real Kafka and Redis for integration and e2e tests, isolated per test.

Service resolution, in order: ``DEALSTREAM_KAFKA_BOOTSTRAP`` / ``DEALSTREAM_REDIS_URL`` when
set; else the local services started by ``deploy/services.sh`` (the same script as
``make services``); else testcontainers when a Docker engine answers. Never a mock.

With the first, the security settings in the environment (``DEALSTREAM_KAFKA_SECURITY_PROTOCOL``,
``DEALSTREAM_KAFKA_SASL_*``/``_SSL_*``, ``DEALSTREAM_REDIS_USERNAME``/``_PASSWORD``/``_SSL_*``)
come along: ``make test-secure`` runs tests/e2e against the TLS/SASL services of
``deploy/secure-services.sh`` that way. Tests build their clients with ``services.redis()`` and
``services.kafka_options()``; processes get ``Isolation.env(services, role)``, whose Redis
user is the role's ACL user when ``DEALSTREAM_SECURE_REDIS_<ROLE>_PASSWORD`` is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streams.adapters.kafka_io import kafka_client_options
from streams.adapters.pseudonyms import Pseudonyms
from streams.adapters.redis_client import redis_from_settings
from streams.settings import KafkaSecurity, Settings

REPO = Path(__file__).resolve().parents[1]
TEST_PSEUDONYM_KEY = "test-pseudonym-key-0123456789abcdef"
"""The pseudonym key every test process runs with (``DEALSTREAM_PSEUDONYM_KEY``)."""


def worker_pseudonyms() -> Pseudonyms:
    """The pseudonyms a worker started with ``Isolation.env`` stores user ids under."""
    return Pseudonyms(TEST_PSEUDONYM_KEY.encode())


SECURITY_SETTINGS = (
    "DEALSTREAM_KAFKA_SECURITY_PROTOCOL",
    "DEALSTREAM_KAFKA_SASL_",
    "DEALSTREAM_KAFKA_SSL_",
    "DEALSTREAM_REDIS_USERNAME",
    "DEALSTREAM_REDIS_PASSWORD",
    "DEALSTREAM_REDIS_SSL_",
)
"""Environment variables (or their prefixes) that say how to reach secured services."""
REDIS_ROLES = ("worker", "learner", "readonly")
"""The ACL users of deploy/redis/acl/ (``dealstream-<role>``)."""


@dataclass(frozen=True)
class Services:
    kafka_bootstrap: str
    redis_url: str
    security_env: Mapping[str, str] = field(default_factory=dict)
    """The security settings (``SECURITY_SETTINGS``) every client and process uses; the Redis
    user here is the tests' own (all rights: they read, seed and delete their keys)."""
    redis_roles: Mapping[str, str] = field(default_factory=dict, repr=False)
    """ACL role -> password, when the Redis has the users of deploy/redis/acl/."""

    @property
    def settings(self) -> Settings:
        """The settings a process of ours would read with ``env()``."""
        return Settings.from_env(
            {
                **self.security_env,
                "DEALSTREAM_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                "DEALSTREAM_REDIS_URL": self.redis_url,
            }
        )

    @property
    def secured(self) -> bool:
        return bool(self.security_env)

    @property
    def kafka_security(self) -> KafkaSecurity:
        return self.settings.kafka_security

    def kafka_options(self) -> dict[str, Any]:
        """Security keyword arguments for a plain aiokafka client of a test."""
        return kafka_client_options(self.kafka_security).kwargs()

    def redis(self) -> aioredis.Redis:
        """A client with the tests' own (all-rights) user."""
        return redis_from_settings(self.settings)

    def env(self, role: str | None = None) -> dict[str, str]:
        """The security settings of a process; with ``role``, Redis as that ACL user."""
        env = dict(self.security_env)
        if role is not None and role in self.redis_roles:
            env["DEALSTREAM_REDIS_USERNAME"] = f"dealstream-{role}"
            env["DEALSTREAM_REDIS_PASSWORD"] = self.redis_roles[role]
        return env


def security_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(SECURITY_SETTINGS) and v}


def without_redis_security(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a test's own plaintext Redis: no Redis user, password or TLS files (set
    empty, which reads as unset, so that the environment of the test run cannot add them)."""
    redis_security = ("DEALSTREAM_REDIS_USERNAME", "DEALSTREAM_REDIS_PASSWORD")
    files = ("CAFILE", "CERTFILE", "KEYFILE", "KEY_PASSWORD", "CHECK_HOSTNAME")
    blank = {name: "" for name in (*redis_security, *(f"DEALSTREAM_REDIS_SSL_{f}" for f in files))}
    return {**env, **blank}


@dataclass(frozen=True)
class Isolation:
    """Names no other test uses: topic prefix, Redis key prefix, consumer group."""

    topic_prefix: str
    redis_prefix: str
    group_id: str

    def env(self, services: Services, role: str | None = "worker") -> dict[str, str]:
        """A process's settings: these names, the services and their security (Redis as the
        ACL user of ``role`` when the services have them)."""
        return {
            **services.env(role),
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
        roles = {
            role: password
            for role in REDIS_ROLES
            if (password := os.environ.get(f"DEALSTREAM_SECURE_REDIS_{role.upper()}_PASSWORD"))
        }
        yield Services(kafka, redis_url, security_env(os.environ), roles)
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
