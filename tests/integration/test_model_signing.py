"""Signed snapshots in real Redis: a worker's store cannot sign, workers never go back to an
older signature, and ``dealstream model rollback`` is the one way back."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from engine.model.purchase_model import PurchaseModel
from streams.adapters.model_store import CannotSign, ModelReloader, ModelStore
from streams.settings import model_verify_key_from_env
from tests.conftest import REPO, Isolation, Services
from tests.integration.conftest import delete_prefix
from tests.model_keys import SIGNING_KEY, learner_key_env, worker_key_env

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(services: Services, isolation: Isolation) -> AsyncIterator[aioredis.Redis]:
    redis = services.redis()
    try:
        yield redis
    finally:
        await delete_prefix(redis, isolation.redis_prefix)
        await redis.aclose()


def trained(examples: int) -> PurchaseModel:
    model = PurchaseModel()
    for i in range(examples):
        model.learn_one({"cart_count_24h": float(i % 3)}, 10.0, i % 2)
    return model


def cli(services: Services, isolation: Isolation, *args: str, signing: bool) -> tuple[int, str]:
    # Rollback runs where the learner's key is, as the learner's Redis user when there are
    # ACL users (the worker's may not write model snapshots).
    role = "learner" if signing else "worker"
    env = {**os.environ, **isolation.env(services, role), **worker_key_env()}
    env.pop("DEALSTREAM_MODEL_SIGNING_KEY", None)
    if signing:
        env.update(learner_key_env())
    done = subprocess.run(
        [sys.executable, "-m", "streams.cli", "model", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


async def test_a_workers_store_verifies_but_cannot_sign(
    client: aioredis.Redis, isolation: Isolation
) -> None:
    """What a worker builds from its environment: the public key only."""
    verify_key = model_verify_key_from_env(worker_key_env())
    learner = ModelStore(client, prefix=isolation.redis_prefix, signing_key=SIGNING_KEY)
    worker = ModelStore(client, prefix=isolation.redis_prefix, verify_key=verify_key)
    await learner.publish(trained(4))
    loaded = await worker.load_latest()
    assert loaded is not None and loaded.model.version == "lr-4"
    assert not worker.can_sign
    with pytest.raises(CannotSign, match="no model signing key"):
        await worker.publish(trained(9))
    with pytest.raises(CannotSign):
        await worker.rollback("lr-4")
    assert await worker.versions() == ["lr-4"]  # nothing was written


async def test_workers_never_go_back_unless_rolled_back_by_the_command(
    client: aioredis.Redis, services: Services, isolation: Isolation
) -> None:
    prefix = isolation.redis_prefix
    learner = ModelStore(client, prefix=prefix, signing_key=SIGNING_KEY)
    await learner.publish(trained(4))
    await learner.publish(trained(8))
    worker = ModelStore(client, prefix=prefix, verify_key=SIGNING_KEY.public_key())
    reloader = ModelReloader(worker)
    served = await reloader.poll(None)
    assert served is not None and served.version == "lr-8"

    # Someone with write access to Redis points model:latest back at the older, genuinely
    # signed, version: the worker keeps what it serves.
    await client.set(learner.latest_key, "lr-4")
    assert await reloader.poll("lr-8") is None
    assert [(v, "not after the model served" in r) for (v, _), r in reloader.refused.items()] == [
        ("lr-4", True)
    ]
    assert await reloader.poll("lr-8") is None  # refused once, not reread at every poll
    await client.set(learner.latest_key, "lr-8")

    # Listed, refused without the signing key and while a learner holds the lease.
    code, out = cli(services, isolation, "list", signing=False)
    assert code == 0 and "lr-4" in out and "lr-8" in out and "lr-8  signed_at_ms=" in out, out
    assert out.strip().endswith("<- latest"), out
    code, out = cli(services, isolation, "rollback", "--to", "lr-4", signing=False)
    assert code == 2 and "DEALSTREAM_MODEL_SIGNING_KEY" in out, out
    assert await learner.acquire_lease("a-running-learner", 30.0)
    code, out = cli(services, isolation, "rollback", "--to", "lr-4", signing=True)
    assert code == 2 and "stop the learner" in out, out
    await learner.release_lease("a-running-learner")
    code, out = cli(services, isolation, "rollback", "--to", "lr-99", signing=True)
    assert code == 2 and "lr-99 is not retained" in out, out
    assert await learner.latest_version() == "lr-8"

    # The command signs lr-4 anew: the running worker moves to it.
    code, out = cli(services, isolation, "rollback", "--to", "lr-4", signing=True)
    assert code == 0 and "lr-4 is the latest" in out, out
    rolled = await reloader.poll("lr-8")
    assert rolled is not None and rolled.version == "lr-4"
    assert await learner.versions() == ["lr-8", "lr-4"]  # lr-4 is now the newest kept
    # A learner that starts later resumes from it and publishes after it.
    restarted = ModelStore(client, prefix=prefix, signing_key=SIGNING_KEY)
    resumed = await restarted.load_latest()
    assert resumed is not None and resumed.model.version == "lr-4"
    await restarted.publish(trained(6))
    newer = await reloader.poll("lr-4")
    assert newer is not None and newer.version == "lr-6"
