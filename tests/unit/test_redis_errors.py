"""Redis failures classified (streams/adapters/redis_errors.py), the worker's retry of a batch
(``retry_on_redis``) and the options of every Redis client we build. No server: the
exceptions are redis-py's own, with the messages Redis sends (tests/reliability/
test_redis_failures.py gets the same replies from a real server)."""

from __future__ import annotations

import logging

import pytest
from redis import exceptions as rx
from redis.asyncio.cluster import RedisCluster

from streams.adapters.redis_client import HEALTH_CHECK_INTERVAL_S, redis_from_settings
from streams.adapters.redis_errors import (
    DETAIL_MAX_CHARS,
    FailureKind,
    RedisBatchFailed,
    ReplicationShortfall,
    SlotMoved,
    classify_redis_error,
    retry_on_redis,
)
from streams.errors import EXIT_REDIS_REFUSED, EXIT_REDIS_UNAVAILABLE
from streams.settings import Secret, Settings


def cluster_error(cause: BaseException) -> rx.RedisClusterException:
    """redis-py's cluster client's error when no startup node answered, with its cause."""
    try:
        raise rx.RedisClusterException(f"Redis Cluster cannot be connected: {cause}") from cause
    except rx.RedisClusterException as exc:
        return exc


SCRIPT = "script: 3f204980c96dccec13a9d5869f6c5edfff098f55, on @user_script:1."
WRAPPED = "Error running script (call to f_3f204980c96dccec): @user_script:1: @user_script: 1: "
PIPELINE = "Command # 2 (HMGET ds:wm events.browse:0) of pipeline caused error: "
READONLY = "You can't write against a read only replica."
OOM = "command not allowed when used memory > 'maxmemory'."
SCRIPT_NOPERM = "The user executing the script can't run this command or subcommand"
WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "unreachable"),
        (
            rx.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
            "unreachable",
        ),
        (rx.ConnectionError("max number of clients reached"), "unreachable"),
        (rx.MaxConnectionsError("Too many connections"), "unreachable"),
        (rx.TimeoutError("Timeout reading from 127.0.0.1:6379"), "timeout"),
        (TimeoutError(), "timeout"),
        (rx.BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
        (rx.ReadOnlyError(f"{READONLY} {SCRIPT}"), "readonly"),
        (rx.OutOfMemoryError(OOM), "oom"),
        (rx.ResponseError("BUSY Redis is busy running a script."), "busy"),
        (rx.ResponseError("MISCONF Redis is configured to save RDB snapshots"), "misconf"),
        (rx.ResponseError("NOREPLICAS Not enough good replicas to write."), "noreplicas"),
        (rx.ClusterDownError("The cluster is down"), "cluster_down"),
        (rx.TryAgainError("Multiple keys request during rehashing of slot"), "cluster_down"),
        (rx.ResponseError(f"{WRAPPED}-READONLY {READONLY}"), "readonly"),
        (rx.ResponseError(f"{WRAPPED}-OOM {OOM}"), "oom"),
        (rx.ResponseError(f"{PIPELINE}('BUSY Redis is busy running a script.',)"), "busy"),
        (rx.InvalidResponse("Protocol Error: b'H'"), "protocol"),
        (ReplicationShortfall(0, 1, "batch call w:1"), "replication"),
        (SlotMoved("the deployment's slot moved"), "cluster_down"),
        (rx.ClusterError("TTL exhausted."), "cluster_down"),
        (rx.SlotNotCoveredError('Slot "42" is not covered by the cluster.'), "cluster_down"),
        (cluster_error(rx.ConnectionError("Error 111 connecting")), "unreachable"),
    ],
)
def test_failures_that_can_heal_are_transient(exc: BaseException, code: str) -> None:
    failure = classify_redis_error(exc)
    assert failure is not None
    assert (failure.kind, failure.code) == (FailureKind.TRANSIENT, code)
    assert failure.transient
    assert failure.advice


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (rx.AuthenticationError("invalid username-password pair or user is disabled."), "auth"),
        (rx.AuthenticationError("Authentication required."), "auth"),
        (
            rx.NoPermissionError("this user has no permissions to run the 'evalsha' command"),
            "noperm",
        ),
        (rx.NoPermissionError("this user has no permissions to access one of the keys"), "noperm"),
        (rx.ResponseError(f"{SCRIPT_NOPERM} {SCRIPT}"), "noperm"),
        (rx.ResponseError(WRAPPED + SCRIPT_NOPERM), "noperm"),
        (rx.ResponseError(f"{WRONGTYPE} {SCRIPT}"), "wrongtype"),
        (rx.ResponseError(f"{WRAPPED}-{WRONGTYPE}"), "wrongtype"),
        (rx.ResponseError(f"{PIPELINE}('{WRONGTYPE}',)"), "wrongtype"),
        (rx.NoScriptError("No matching script. Please use EVAL."), "noscript"),
        (rx.MovedError("3999 127.0.0.1:6381"), "cluster_node"),
        (rx.ClusterCrossSlotError(), "cluster_node"),
        (
            rx.ResponseError("ledger: op 3: has_offer must be 0 or 1; nothing was written"),
            "refused",
        ),
        (
            rx.ResponseError(f"user_script:1: attempt to compare nil with number {SCRIPT}"),
            "refused",
        ),
        (rx.ResponseError(WRAPPED + "attempt to compare nil with number"), "refused"),
        (rx.ExecAbortError("Transaction discarded because of previous errors."), "refused"),
        (rx.DataError("Invalid input of type: 'dict'."), "client"),
        (cluster_error(rx.AuthenticationError("invalid username-password pair")), "auth"),
        (
            cluster_error(rx.RedisClusterException("Cluster mode is not enabled on this node")),
            "not_cluster",
        ),
    ],
)
def test_failures_no_retry_fixes_are_deterministic(exc: BaseException, code: str) -> None:
    failure = classify_redis_error(exc)
    assert failure is not None
    assert (failure.kind, failure.code) == (FailureKind.DETERMINISTIC, code)
    assert failure.needs_operator
    assert failure.advice


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("x"), RuntimeError("loop closed")])
def test_what_is_no_redis_failure_is_not_classified(exc: BaseException) -> None:
    assert classify_redis_error(exc) is None


def test_transient_failures_that_wait_for_an_operator_are_marked() -> None:
    def needs_operator(exc: BaseException) -> bool:
        failure = classify_redis_error(exc)
        assert failure is not None
        return failure.needs_operator

    assert needs_operator(rx.OutOfMemoryError("command not allowed"))
    assert needs_operator(rx.ResponseError("MISCONF Redis is configured to save RDB snapshots"))
    assert needs_operator(ReplicationShortfall(0, 1, "a batch call"))
    assert not needs_operator(rx.TimeoutError("Timeout reading"))
    assert not needs_operator(rx.BusyLoadingError("loading"))


def test_the_detail_names_the_class_and_is_cut() -> None:
    failure = classify_redis_error(rx.ResponseError("ledger: " + "x" * 1000))
    assert failure is not None
    assert failure.detail.startswith("ResponseError: ledger: xxx")
    assert len(failure.detail) == len("ResponseError: ") + DETAIL_MAX_CHARS
    bare = classify_redis_error(TimeoutError())
    assert bare is not None and bare.detail == "TimeoutError"


# -- the client ----------------------------------------------------------------------------------


async def test_every_client_gets_the_timeouts_and_no_retries_of_its_own() -> None:
    settings = Settings(redis_url=Secret("redis://app:hunter2@cache:6380/2"), redis_timeout_s=1.5)
    client = redis_from_settings(settings)
    try:
        connection = client.connection_pool.make_connection()
        assert connection.socket_timeout == 1.5
        assert connection.socket_connect_timeout == 1.5
        assert connection.health_check_interval == HEALTH_CHECK_INTERVAL_S
        assert connection.retry.get_retries() == 0
        assert (connection.host, connection.port, connection.db) == ("cache", 6380, 2)
        assert connection.password == "hunter2"
    finally:
        await client.aclose()


async def test_in_cluster_mode_the_client_is_a_redis_cluster_with_the_same_options() -> None:
    settings = Settings.from_env(
        {
            "DEALSTREAM_REDIS_URL": "redis://app:hunter2@node1:7001/0",
            "DEALSTREAM_REDIS_CLUSTER": "1",
            "DEALSTREAM_REDIS_PREFIX": "ds:{ds}:",
            "DEALSTREAM_REDIS_TIMEOUT_S": "1.5",
        }
    )
    client = redis_from_settings(settings)
    try:
        assert isinstance(client, RedisCluster)
        assert client.retry.get_retries() == 0  # no resend after a lost reply
        [node] = client.startup_nodes
        assert (node.host, node.port) == ("node1", 7001)
        kwargs = client.get_connection_kwargs()
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 1.5
        assert kwargs["health_check_interval"] == HEALTH_CHECK_INTERVAL_S
        assert (kwargs["username"], kwargs["password"]) == ("app", "hunter2")
        # Every key of the deployment hashes to the prefix's slot, the users' tags after it
        # notwithstanding.
        slots = {client.keyslot(f"ds:{{ds}}:{k}") for k in ("own", "s1:{k1.abc}", "p:{u2}")}
        assert slots == {client.keyslot("ds:{ds}:")}
    finally:
        await client.aclose()


# -- the worker's retry --------------------------------------------------------------------------


class Attempts:
    """An attempt that raises the given exceptions in turn, then succeeds."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)


async def test_a_transient_failure_is_retried_until_the_attempt_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempt = Attempts(rx.ConnectionError("Connection refused"))
    with caplog.at_level(logging.INFO, logger="dealstream.worker"):
        await retry_on_redis(attempt, deadline_s=60)
    assert attempt.calls == 2
    [retry] = [r for r in caplog.records if r.getMessage() == "batch failed on Redis; retrying"]
    assert (retry.levelno, getattr(retry, "code", None)) == (logging.WARNING, "unreachable")
    [done] = [r for r in caplog.records if r.getMessage() == "batch done after Redis failures"]
    assert getattr(done, "count", None) == 1


async def test_an_operators_failure_is_logged_as_an_error_while_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempt = Attempts(rx.OutOfMemoryError(OOM))
    with caplog.at_level(logging.INFO, logger="dealstream.worker"):
        await retry_on_redis(attempt, deadline_s=60)
    [retry] = [r for r in caplog.records if r.getMessage() == "batch failed on Redis; retrying"]
    assert retry.levelno == logging.ERROR
    assert "maxmemory" in getattr(retry, "reason", "")


async def test_a_deterministic_failure_stops_at_the_first_attempt() -> None:
    attempt = Attempts(rx.NoPermissionError("this user has no permissions to run 'evalsha'"))
    with pytest.raises(RedisBatchFailed) as stopped:
        await retry_on_redis(attempt, deadline_s=60)
    assert attempt.calls == 1
    assert stopped.value.exit_code == EXIT_REDIS_REFUSED
    assert stopped.value.failure.code == "noperm"
    assert "ACL user" in str(stopped.value)
    assert isinstance(stopped.value.__cause__, rx.NoPermissionError)


async def test_transient_failures_stop_once_past_the_deadline() -> None:
    attempt = Attempts(*(rx.TimeoutError("Timeout reading") for _ in range(100)))
    with pytest.raises(RedisBatchFailed) as stopped:
        await retry_on_redis(attempt, deadline_s=0.3)
    assert 2 <= attempt.calls < 100
    assert stopped.value.exit_code == EXIT_REDIS_UNAVAILABLE
    assert stopped.value.failure.code == "timeout"
    assert "DEALSTREAM_REDIS_RETRY_DEADLINE_S=0.3" in str(stopped.value)


async def test_what_is_no_redis_failure_propagates_unchanged() -> None:
    attempt = Attempts(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await retry_on_redis(attempt, deadline_s=60)
    assert attempt.calls == 1
