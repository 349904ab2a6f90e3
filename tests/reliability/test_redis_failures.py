"""Redis failing under the worker (issue 13): a hung Redis times out, what can heal is retried up
to a deadline, what cannot stops the worker at once, saying why.

A PRIVATE redis-server per test (own port, temporary dir; the shared one is never touched),
stopped with SIGSTOP to hang it:

- the replies of a real server (ACL refusals, WRONGTYPE, a script's own error, OOM, READONLY,
  a wrong password, a stopped or absent server) are classified as
  streams/adapters/redis_errors.py says;
- hung: a client call raises a timeout instead of waiting, and the batch retry gives up at
  its deadline; the batch, read again as after the restart, is applied once;
- stopped for a while then continued: the batch is retried and applied exactly once (in
  process, and in a worker process that keeps running and commits everything);
- refused for good (an ACL user without EVALSHA): the worker process exits 78 at once with the
  reason and what to do in its log, commits nothing, and never logs the password; a WRONGTYPE
  planted on a key the batch reads stops the retry at the first attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from redis import exceptions as rx

from engine.analysis.simulation.world import open_loop
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.adapters.kafka_io import ensure_topics
from streams.adapters.redis_client import redis_from_settings
from streams.adapters.redis_errors import (
    FailureKind,
    RedisBatchFailed,
    RedisFailure,
    classify_redis_error,
    retry_on_redis,
)
from streams.adapters.redis_store import state_epoch_key
from streams.errors import EXIT_REDIS_REFUSED, EXIT_REDIS_UNAVAILABLE
from streams.settings import Secret, Settings, Topics
from streams.worker.batch_worker import BatchWorker
from streams.worker.faust_app import Runtime, bootstrap
from tests.conftest import TEST_PSEUDONYM_KEY, Isolation, Services, unused_port
from tests.feature_reference import reference_states
from tests.private_redis import REDIS_SERVER, PrivateRedis
from tests.reliability.test_kill9 import ALLOWED_LATENESS_S, differences
from tests.reliability.test_redis_behind import (
    applied_total,
    wait_committed,
)
from tests.sinks import ListSink
from tests.worker_process import (
    WorkerProcess,
    clean_up,
    committed_offsets,
    log_entries,
    produce_events,
    read_states,
    worker_env,
)

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

TIMEOUT_S = 0.5
"""The clients' DEALSTREAM_REDIS_TIMEOUT_S in these tests: a hung server is noticed fast."""
HANG_GUARD_S = 60.0
"""Only against a test hanging for good: nothing here should take near as long."""
RETRYING = "batch failed on Redis; retrying"
STOPPING = "Redis failed the batch; stopping the worker"


@contextmanager
def stopped(server: PrivateRedis) -> Iterator[None]:
    """The server hung (SIGSTOP): connections are accepted by the kernel, nothing answers."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def private_settings(server: PrivateRedis, isolation: Isolation, **changes: Any) -> Settings:
    return Settings(
        redis_url=Secret(server.url),
        redis_prefix=isolation.redis_prefix,
        redis_timeout_s=TIMEOUT_S,
        allowed_lateness_s=ALLOWED_LATENESS_S,
        pseudonym_key=Secret(TEST_PSEUDONYM_KEY),
        **changes,
    )


def simulated(users: int, events: int, seed: int) -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    return list(
        open_loop(
            users=users, events=events, seed=seed, start_ms=now_ms - 2 * 3_600_000, mean_gap_ms=500
        )
    )


def raw_records(events: Sequence[dict[str, Any]], topics: Topics) -> list[RawRecord]:
    """The events as the consumer hands them over: one partition per topic, in order."""
    offsets = {"browse": 0, "search": 0, "purchase": 0}
    topic_of = {"browse": topics.browse, "search": topics.search, "purchase": topics.purchase}
    records = []
    for event in events:
        kind = str(event["type"])
        records.append(
            RawRecord(
                topic_of[kind],
                0,
                offsets[kind],
                str(event["user_id"]).encode(),
                orjson.dumps(event),
            )
        )
        offsets[kind] += 1
    return records


def batch_worker(runtime: Runtime) -> BatchWorker:
    topics = runtime.settings.topics
    return BatchWorker(runtime.engine, ListSink(), topics=topics, limits=DecodeLimits())


def chunks(records: Sequence[RawRecord], size: int) -> list[Sequence[RawRecord]]:
    return [records[start : start + size] for start in range(0, len(records), size)]


def classified(exc: BaseException) -> RedisFailure:
    failure = classify_redis_error(exc)
    assert failure is not None, f"{exc!r} was not classified"
    return failure


# -- real replies, classified --------------------------------------------------------------------


async def refusal(call: Any) -> RedisFailure:
    with pytest.raises(rx.RedisError) as raised:
        await call
    return classified(raised.value)


async def test_the_replies_of_a_real_server_are_classified(tmp_path: Path) -> None:
    primary = PrivateRedis(tmp_path / "primary")
    replica = PrivateRedis(tmp_path / "replica")
    primary.start()
    replica.start()
    admin = aioredis.Redis(port=primary.port, socket_timeout=5)
    clients: list[aioredis.Redis] = [admin]

    def client(url: str) -> aioredis.Redis:
        made = redis_from_settings(Settings(redis_url=Secret(url), redis_timeout_s=TIMEOUT_S))
        clients.append(made)
        return made

    try:
        await admin.execute_command(
            "ACL", "SETUSER", "noeval", "on", ">pw", "~*", "+@all", "-evalsha", "-eval"
        )
        await admin.execute_command("ACL", "SETUSER", "nohset", "on", ">pw", "~*", "+@all", "-hset")
        await admin.set("plain", "x")
        owner = client(primary.url)
        hset = "return redis.call('HSET', KEYS[1], 'f', '1')"
        codes: dict[str, tuple[FailureKind, str]] = {}

        def note(name: str, failure: RedisFailure) -> None:
            codes[name] = (failure.kind, failure.code)

        note("wrongtype", await refusal(owner.register_script(hset)(keys=["plain"])))
        note("error_reply", await refusal(owner.eval("return redis.error_reply('ledger: x')", 0)))
        note("lua_error", await refusal(owner.eval("return nil + 1", 0)))
        noeval = client(f"redis://noeval:pw@127.0.0.1:{primary.port}/0")
        note("noperm_evalsha", await refusal(noeval.register_script("return 1")(keys=[])))
        nohset = client(f"redis://nohset:pw@127.0.0.1:{primary.port}/0")
        note("noperm_in_script", await refusal(nohset.register_script(hset)(keys=["h"])))
        wrong = client(f"redis://noeval:wrong@127.0.0.1:{primary.port}/0")
        note("wrong_password", await refusal(wrong.ping()))
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        note("oom", await refusal(owner.register_script(hset)(keys=["h2"])))
        await admin.config_set("maxmemory", "0")
        await client(replica.url).execute_command("REPLICAOF", "127.0.0.1", str(primary.port))
        note("readonly", await refusal(client(replica.url).register_script(hset)(keys=["h3"])))
        absent = client(f"redis://127.0.0.1:{unused_port()}/0")
        note("refused_connection", await refusal(absent.ping()))
        hung = client(primary.url)
        await hung.ping()
        with stopped(primary):
            note("hung", await asyncio.wait_for(refusal(hung.ping()), HANG_GUARD_S))
    finally:
        for made in clients:
            await made.aclose()
        primary.kill9()
        replica.kill9()

    transient, deterministic = FailureKind.TRANSIENT, FailureKind.DETERMINISTIC
    assert codes == {
        "wrongtype": (deterministic, "wrongtype"),
        "error_reply": (deterministic, "refused"),
        "lua_error": (deterministic, "refused"),
        "noperm_evalsha": (deterministic, "noperm"),
        "noperm_in_script": (deterministic, "noperm"),
        "wrong_password": (deterministic, "auth"),
        "oom": (transient, "oom"),
        "readonly": (transient, "readonly"),
        "refused_connection": (transient, "unreachable"),
        "hung": (transient, "timeout"),
    }


# -- a hung Redis: timeouts, the deadline, the batch read again ----------------------------------


async def test_a_hung_redis_times_out_and_the_retry_stops_at_its_deadline(
    isolation: Isolation, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    settings = private_settings(server, isolation)
    events = simulated(users=40, events=1200, seed=3)
    first, failed, rest = chunks(raw_records(events, settings.topics), 400)
    runtime = bootstrap(settings)
    restarted: Runtime | None = None
    try:
        worker = batch_worker(runtime)
        await worker.handle(first)
        with stopped(server):
            with pytest.raises(rx.TimeoutError):
                await asyncio.wait_for(runtime.redis.ping(), HANG_GUARD_S)
            with pytest.raises(RedisBatchFailed) as gave_up:
                await asyncio.wait_for(
                    retry_on_redis(lambda: worker.handle(failed), deadline_s=1.0), HANG_GUARD_S
                )
        # What a restarted worker does: a new process reads the failed batch again.
        restarted = bootstrap(settings)
        again = batch_worker(restarted)
        for batch in (failed, rest):
            await again.handle(batch)
        users = sorted({str(e["user_id"]) for e in events})
        got = await read_states(Services("", server.url), isolation, users)
    finally:
        await runtime.redis.aclose()
        if restarted is not None:
            await restarted.redis.aclose()
        server.kill9()

    assert gave_up.value.exit_code == EXIT_REDIS_UNAVAILABLE
    assert gave_up.value.failure.code == "timeout"
    assert not differences(
        got, await reference_states(events, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000), None
    )
    assert again.counters.applied + again.counters.redelivered == len(failed) + len(rest)


async def test_a_redis_stopped_for_a_while_is_waited_for_and_the_batch_applied_once(
    isolation: Isolation, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    settings = private_settings(server, isolation)
    events = simulated(users=40, events=1200, seed=4)
    first, held, rest = chunks(raw_records(events, settings.topics), 400)
    runtime = bootstrap(settings)
    try:
        worker = batch_worker(runtime)
        await worker.handle(first)
        caplog.set_level(logging.INFO, logger="dealstream.worker")
        with stopped(server):
            retried = asyncio.create_task(
                retry_on_redis(lambda: worker.handle(held), deadline_s=HANG_GUARD_S)
            )
            while not [r for r in caplog.records if r.getMessage() == RETRYING]:
                assert not retried.done(), "the batch went through a stopped Redis"
                await asyncio.sleep(0.05)
        await asyncio.wait_for(retried, HANG_GUARD_S)
        await worker.handle(rest)
        users = sorted({str(e["user_id"]) for e in events})
        got = await read_states(Services("", server.url), isolation, users)
    finally:
        await runtime.redis.aclose()
        server.kill9()

    retries = [r for r in caplog.records if r.getMessage() == RETRYING]
    assert {getattr(r, "code", None) for r in retries} == {"timeout"}
    assert [r for r in caplog.records if r.getMessage() == "batch done after Redis failures"]
    assert not differences(
        got, await reference_states(events, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000), None
    )
    counters = worker.counters
    assert counters.consumed == len(events)
    assert counters.applied + counters.redelivered == len(events)


async def test_a_wrongtype_key_stops_the_retry_at_the_first_attempt(
    isolation: Isolation, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    settings = private_settings(server, isolation)
    records = raw_records(simulated(users=10, events=100, seed=5), settings.topics)
    planter = redis.Redis(port=server.port, socket_timeout=5)
    planter.hset(state_epoch_key(isolation.redis_prefix), "planted", "by another application")
    planter.close()
    runtime = bootstrap(settings)
    worker = batch_worker(runtime)
    attempts = 0

    async def attempt() -> None:
        nonlocal attempts
        attempts += 1
        await worker.handle(records)

    try:
        with pytest.raises(RedisBatchFailed) as refused:
            await asyncio.wait_for(retry_on_redis(attempt, deadline_s=60), HANG_GUARD_S)
    finally:
        await runtime.redis.aclose()
        server.kill9()

    assert attempts == 1
    assert refused.value.exit_code == EXIT_REDIS_REFUSED
    assert refused.value.failure.code == "wrongtype"
    assert "another application shares the prefix" in str(refused.value)


# -- the worker process --------------------------------------------------------------------------


async def test_a_worker_without_permission_for_its_scripts_stops_loudly_and_commits_nothing(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    password = "s3cret-not-in-logs"
    admin = redis.Redis(port=server.port, socket_timeout=5)
    admin.execute_command(
        "ACL", "SETUSER", "dealstream", "on", f">{password}", "~*", "+@all", "-evalsha", "-eval"
    )
    admin.close()
    url = f"redis://dealstream:{password}@127.0.0.1:{server.port}/0"
    private = Services(services.kafka_bootstrap, url)
    topics = Topics(isolation.topic_prefix)
    events = simulated(users=20, events=200, seed=6)
    worker = WorkerProcess(
        worker_env(private, isolation, http_port=free_port, partitions=1, batch_max=50),
        tmp_path / "worker.log",
    )
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=1)
        await produce_events(private, topics, events)
        worker.start()
        deadline = time.monotonic() + 90
        while worker.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert not worker.alive(), "the worker kept running without permission" + worker.tail()
        assert worker.process is not None
        code = worker.process.returncode
        committed = await committed_offsets(private, isolation.group_id)
        log_text = worker.log_text()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(private, isolation)
        server.kill9()

    assert code == EXIT_REDIS_REFUSED, f"exit status {code}" + worker.tail()
    [line] = log_entries(log_text, STOPPING)
    assert line["level"] == "CRITICAL"
    assert line["code"] == "noperm"
    assert "no permissions to run the 'evalsha' command" in line["reason"]
    assert "ACL user lacks a command or key" in line["reason"]
    assert not log_entries(log_text, RETRYING), "a refusal was retried"
    assert all(offset <= 0 for offset in committed.values()), committed
    assert password not in log_text


def worker_acl(prefix: str, password: str) -> list[str]:
    """The ACL rule docs/delivery.md gives for the worker's Redis user (no more than it needs)."""
    categories = ["-@all", "+@read", "+@write", "+@scripting", "+@transaction", "+@connection"]
    return ["on", f">{password}", "resetkeys", f"~{prefix}*", "resetchannels", *categories]


async def test_a_worker_waits_for_a_stopped_redis_and_applies_every_event_once(
    services: Services, isolation: Isolation, free_port: int, tmp_path: Path
) -> None:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    admin = redis.Redis(port=server.port, socket_timeout=5)
    admin.execute_command("ACL", "SETUSER", "worker", *worker_acl(isolation.redis_prefix, "pw"))
    admin.close()
    # The worker runs as the user docs/delivery.md describes: the rule is enough.
    url = f"redis://worker:pw@127.0.0.1:{server.port}/0"
    private = Services(services.kafka_bootstrap, url)
    topics = Topics(isolation.topic_prefix)
    events = simulated(users=100, events=4000, seed=8)
    want = await reference_states(events, allowed_lateness_ms=ALLOWED_LATENESS_S * 1000)
    worker = WorkerProcess(
        worker_env(
            private,
            isolation,
            http_port=free_port,
            partitions=1,
            batch_max=100,
            allowed_lateness_s=ALLOWED_LATENESS_S,
            redis_timeout_s=TIMEOUT_S,
        ),
        tmp_path / "worker.log",
    )
    try:
        await ensure_topics(services.kafka_bootstrap, topics.all, partitions=1)
        await produce_events(private, topics, events)
        worker.start()
        deadline = time.monotonic() + HANG_GUARD_S
        while await applied_total(server, isolation) < len(events) // 4:
            assert worker.alive() and time.monotonic() < deadline, "no progress" + worker.tail()
            await asyncio.sleep(0.05)
        with stopped(server):
            deadline = time.monotonic() + HANG_GUARD_S
            while not log_entries(worker.run_log_text(), RETRYING):
                assert time.monotonic() < deadline, "no retry logged" + worker.tail()
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)  # a few more retries against the stopped server
        await wait_committed(private, isolation.group_id, len(events))
        got = await read_states(private, isolation, sorted(want))
        assert worker.alive(), "the worker stopped with Redis" + worker.tail()
        code = worker.stop()
        log_text = worker.run_log_text()
    finally:
        if worker.alive():
            worker.stop()
        await clean_up(private, isolation)
        server.kill9()

    assert code == 0, worker.tail()
    assert {line["code"] for line in log_entries(log_text, RETRYING)} == {"timeout"}
    assert log_entries(log_text, "batch done after Redis failures")
    assert not log_entries(log_text, STOPPING)
    assert not differences(got, want, None), "features differ from the reference" + worker.tail()
