"""Against the secured services of ``deploy/secure-services.sh`` (``make test-secure``): Kafka
with a SASL_SSL + SCRAM-SHA-512 listener only, Redis with TLS only and the ACL users of
deploy/redis/acl/. Skipped against plaintext services; the rest of tests/e2e runs through the
same security settings there (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from streams.adapters.kafka_io import check_kafka
from streams.adapters.redis_client import redis_from_settings
from streams.adapters.sinks import RdKafkaSink
from streams.errors import ServiceUnavailable
from streams.settings import Secret, Settings
from tests.conftest import REPO, Isolation, Services

NOPERM = r"NOPERM|no permissions"
"""What Redis says when an ACL user lacks a key or command."""


@pytest.fixture
def secured(services: Services) -> Services:
    if not services.secured or "worker" not in services.redis_roles:
        pytest.skip("needs the secured services with ACL users (make test-secure)")
    return services


def dealstream(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams.cli", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tools_work_through_tls_and_sasl(secured: Services, isolation: Isolation) -> None:
    done = dealstream(isolation.env(secured), "topics")
    assert done.returncode == 0, done.stderr
    done = dealstream(isolation.env(secured, "readonly"), "features", "nobody", "--json")
    assert done.returncode == 0, done.stderr


def test_a_wrong_kafka_password_is_one_line_and_exit_2(
    secured: Services, isolation: Isolation
) -> None:
    env = {**isolation.env(secured), "DEALSTREAM_KAFKA_SASL_PASSWORD": "not-the-password"}
    for command in (["topics"], ["worker"]):
        done = dealstream(env, *command)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "refused the login of user 'dealstream' (SCRAM-SHA-512)" in lines[0]
        assert "not-the-password" not in done.stderr + done.stdout


def test_a_wrong_redis_password_is_one_line_and_exit_2(
    secured: Services, isolation: Isolation
) -> None:
    env = {**isolation.env(secured), "DEALSTREAM_REDIS_PASSWORD": "not-the-password"}
    for command in (["features", "u1"], ["worker"]):
        done = dealstream(env, *command)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "refused the login (wrong username or password)" in lines[0]
        assert "not-the-password" not in done.stderr + done.stdout


async def as_role(services: Services, role: str) -> aioredis.Redis:
    env = {
        **services.env(role),
        "DEALSTREAM_KAFKA_BOOTSTRAP": services.kafka_bootstrap,
        "DEALSTREAM_REDIS_URL": services.redis_url,
    }
    return redis_from_settings(Settings.from_env(env))


def test_the_worker_user_reads_but_cannot_write_model_snapshots(
    secured: Services, isolation: Isolation
) -> None:
    p = isolation.redis_prefix

    async def run() -> None:
        admin = secured.redis()
        worker = await as_role(secured, "worker")
        learner = await as_role(secured, "learner")
        try:
            await learner.set(f"{p}model:v1", b"snapshot")  # the learner may publish
            await learner.set(f"{p}model:latest", "v1")
            assert await worker.get(f"{p}model:latest") == b"v1"  # the worker may read
            assert await worker.get(f"{p}model:v1") == b"snapshot"
            writes = [
                worker.set(f"{p}model:v2", b"planted"),
                worker.set(f"{p}model:latest", "v2"),
                worker.zadd(f"{p}model:versions", {"v2": 2}),
                worker.delete(f"{p}model:v1"),
                worker.eval("return redis.call('SET', KEYS[1], 'v2')", 1, f"{p}model:latest"),
            ]
            for write in writes:
                with pytest.raises(aioredis.ResponseError, match=NOPERM):
                    await write
            assert await admin.get(f"{p}model:latest") == b"v1"
            assert await admin.exists(f"{p}model:v2") == 0
            # ... while its own keys are writable, by script as the batch commit does.
            await worker.eval("return redis.call('HSET', KEYS[1], 'x', 1)", 1, f"{p}wm")
            # and neither the learner nor the read-only tools may touch the features
            readonly = await as_role(secured, "readonly")
            try:
                for client in (learner, readonly):
                    with pytest.raises(aioredis.ResponseError, match=NOPERM):
                        await client.hset(f"{p}wm", "x", 2)
                assert await readonly.hget(f"{p}wm", "x") == b"1"
                with pytest.raises(aioredis.ResponseError, match=NOPERM):
                    await readonly.flushdb()
            finally:
                await readonly.aclose()
        finally:
            keys = [k async for k in admin.scan_iter(match=f"{p}*")]
            if keys:
                await admin.delete(*keys)
            for client in (admin, worker, learner):
                await client.aclose()

    asyncio.run(run())


def test_plaintext_clients_are_refused(secured: Services) -> None:
    async def run() -> None:
        # Kafka has no plaintext listener: a plaintext client gets no metadata ...
        admin = AIOKafkaAdminClient(
            bootstrap_servers=secured.kafka_bootstrap, request_timeout_ms=3000
        )
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(admin.start(), 30)
        await admin.close()
        # ... and our preflight says so in one line, without hanging.
        with pytest.raises(ServiceUnavailable, match="cannot reach Kafka"):
            await check_kafka(secured.kafka_bootstrap, timeout_s=10)
        # Redis has no plaintext port: redis:// on its TLS port is refused.
        plain = aioredis.Redis.from_url(
            secured.redis_url.replace("rediss://", "redis://"), socket_timeout=5
        )
        try:
            with pytest.raises((aioredis.ConnectionError, TimeoutError)):
                await plain.ping()
        finally:
            await plain.aclose()

    asyncio.run(run())


def test_an_untrusted_certificate_is_refused(secured: Services, isolation: Isolation) -> None:
    untrusted = Path(secured.security_env["DEALSTREAM_KAFKA_SSL_CAFILE"]).with_name("untrusted.pem")
    done = dealstream(
        {**isolation.env(secured), "DEALSTREAM_KAFKA_SSL_CAFILE": str(untrusted)}, "topics"
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "TLS certificate is not trusted" in done.stderr


def test_the_workers_producer_fails_its_start_on_a_refusal_without_hanging(
    secured: Services,
) -> None:
    """The preflight (aiokafka) catches these first; librdkafka's producer must not hang the
    start either should it be refused where aiokafka was let in."""
    security = secured.kafka_security
    untrusted = Path(secured.security_env["DEALSTREAM_KAFKA_SSL_CAFILE"]).with_name("untrusted.pem")
    refusals = {
        "SASL authentication error": replace(security, password=Secret("not-the-password")),
        "certificate verify failed": replace(security, tls=replace(security.tls, cafile=untrusted)),
    }

    async def run() -> None:
        sink = RdKafkaSink(secured.kafka_bootstrap, security=security)
        await sink.start(timeout_s=30)
        await sink.stop()
        for why, wrong in refusals.items():
            sink = RdKafkaSink(secured.kafka_bootstrap, security=wrong)
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable, match=why) as refused:
                await sink.start(timeout_s=30)
            assert time.monotonic() - started < 20, "waited for the timeout: not told at once"
            assert "\n" not in str(refused.value) and "not-the-password" not in str(refused.value)

    asyncio.run(run())
