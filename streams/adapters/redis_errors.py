"""Which Redis failures a retry can fix.

redis-py raises one hierarchy for a Redis that is away and for one that refuses what we ask.
The worker retries a batch only when retrying can help (up to a deadline) and stops at once
otherwise, saying why and what to do (``streams/worker/faust_app.py``). A refused call wrote
nothing: a command is refused before it runs, and our scripts validate before their first write.

Transient (it can heal without touching the worker):

- ``unreachable``: connection refused or reset, too many clients, a network error;
- ``timeout``: no reply within ``DEALSTREAM_REDIS_TIMEOUT_S`` (a hung or overloaded server);
- ``loading``: Redis is loading its data set after a restart;
- ``busy``: another client's script runs past ``lua-time-limit``;
- ``readonly``: a replica answered, as during a failover; it heals once the URL leads to the new
  primary (Sentinel, a proxy, DNS), and never when it names a replica: the deadline ends that;
- ``oom``: ``maxmemory`` reached under ``noeviction``: writes are refused until memory is freed
  or ``maxmemory`` raised, which takes an operator but not a worker restart;
- ``misconf``: Redis refuses writes because it cannot persist (``stop-writes-on-bgsave-error``);
- ``noreplicas``: fewer replicas than ``min-replicas-to-write``;
- ``cluster_down``: ``CLUSTERDOWN``, ``MASTERDOWN``, ``TRYAGAIN``; in a Redis Cluster, a slot
  that moved under a call sent to its old primary (``SlotMoved``: nothing ran), a slot map the
  client cannot read (no node answers, slots not covered) or redirections that never end;
- ``replication``: fewer replicas acknowledged a batch's call than
  ``DEALSTREAM_REDIS_WAIT_REPLICAS`` (``ReplicationShortfall``): a replica down or behind, or a
  failover whose new primary has no replica yet;
- ``protocol``: a reply that is not Redis's protocol (the connection is dropped and opened again;
  a URL naming another kind of server ends at the deadline).

Deterministic (the same call fails the same way until someone changes something):

- ``auth``: the user name or password of ``DEALSTREAM_REDIS_URL`` is refused;
- ``noperm``: the ACL user lacks a command or key the worker needs;
- ``wrongtype``: a key the worker writes holds another type (another application shares the
  key prefix);
- ``noscript``: a script vanished again right after it was loaded;
- ``cluster_node``: ``MOVED``, ``ASK``, ``CROSSSLOT``: the URL names a Redis Cluster node but
  ``DEALSTREAM_REDIS_CLUSTER`` is off (a cluster client follows ``MOVED`` and ``ASK`` itself,
  and keys under a prefix with a hash tag share one slot);
- ``not_cluster``: ``DEALSTREAM_REDIS_CLUSTER`` is on but the URL names a Redis without
  cluster mode;
- ``refused``: any other error reply, such as a script's own (``ledger: ...``) or a Lua error:
  a bug to report with the message;
- ``client``: redis-py refused the call before sending it (a value it cannot encode): a bug.

Redis 7 passes an error raised inside a script on with its own code; Redis 6 wraps it in
``ERR Error running script ...: -CODE message``: both are read.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from redis import exceptions as rx

from streams.errors import EXIT_REDIS_REFUSED, EXIT_REDIS_UNAVAILABLE, StreamsError

log = logging.getLogger("dealstream.worker")
T = TypeVar("T")

DETAIL_MAX_CHARS = 300
"""Redis's message is kept to this length in a failure's ``detail`` (and so in logs)."""


class FailureKind(Enum):
    TRANSIENT = "transient"
    """A retry may succeed: retried with backoff up to the deadline."""
    DETERMINISTIC = "deterministic"
    """Every retry would fail alike: stop and tell the operator."""


@dataclass(frozen=True, slots=True)
class RedisFailure:
    """One failed Redis call, classified."""

    kind: FailureKind
    code: str
    """A short stable name (module docstring), for logs and alerts."""
    detail: str
    """The exception's class and Redis's message (cut to ``DETAIL_MAX_CHARS``)."""
    advice: str
    """What to do about it."""

    @property
    def transient(self) -> bool:
        return self.kind is FailureKind.TRANSIENT

    @property
    def needs_operator(self) -> bool:
        """Whether someone must act (deterministic, or a transient failure that waits for an
        operator: memory, disk, replicas): logged as an error, not a warning, while retried."""
        return not self.transient or self.code in _OPERATOR_CODES


_TRANSIENT_ADVICE = {
    "unreachable": "check that Redis runs and DEALSTREAM_REDIS_URL reaches it",
    "timeout": (
        "Redis did not answer within DEALSTREAM_REDIS_TIMEOUT_S: check that it is not hung, "
        "swapping or blocked by a long command (SLOWLOG GET)"
    ),
    "loading": "Redis is loading its data after a restart; wait",
    "busy": "a script of another client runs too long; SCRIPT KILL it if it never ends",
    "readonly": (
        "a replica answered (failover?): point DEALSTREAM_REDIS_URL at the primary, or at "
        "what follows it (Sentinel, a proxy)"
    ),
    "oom": (
        "Redis is at maxmemory and refuses writes (noeviction): raise maxmemory or free "
        "memory; see the bytes per user in docs/performance.md"
    ),
    "misconf": "Redis cannot write its snapshot or AOF: fix its disk (see the Redis log)",
    "noreplicas": "fewer replicas are connected than min-replicas-to-write asks",
    "cluster_down": "the Redis cluster is down, failing over or resharding; wait",
    "replication": (
        "fewer Redis replicas acknowledged the batch than DEALSTREAM_REDIS_WAIT_REPLICAS: "
        "a replica is down or behind, or a failover left the new primary without one; "
        "bring the replica back (the batch is not committed meanwhile)"
    ),
    "protocol": "the server at DEALSTREAM_REDIS_URL does not speak Redis's protocol",
}
_DETERMINISTIC_ADVICE = {
    "auth": "the user or password in DEALSTREAM_REDIS_URL is refused: fix them",
    "noperm": (
        "the Redis ACL user lacks a command or key the worker needs: grant it the commands of "
        "docs/delivery.md ('Redis errors') on the keys under DEALSTREAM_REDIS_PREFIX"
    ),
    "wrongtype": (
        "a key under DEALSTREAM_REDIS_PREFIX holds another type than the worker writes: "
        "another application shares the prefix; give the worker its own prefix or database"
    ),
    "noscript": (
        "a script vanished from Redis right after it was loaded: is something running SCRIPT "
        "FLUSH, or a proxy spreading calls over several servers?"
    ),
    "cluster_node": (
        "DEALSTREAM_REDIS_URL names a Redis Cluster node: set DEALSTREAM_REDIS_CLUSTER=1 and a "
        "hash tag in DEALSTREAM_REDIS_PREFIX (docs/cluster.md)"
    ),
    "not_cluster": (
        "DEALSTREAM_REDIS_CLUSTER is on but DEALSTREAM_REDIS_URL names a Redis without cluster "
        "mode: unset DEALSTREAM_REDIS_CLUSTER"
    ),
    "refused": "Redis refused the batch's command: report it with this message (a bug)",
    "client": "the client could not send the command: report it with this message (a bug)",
}
_OPERATOR_CODES = frozenset({"oom", "misconf", "noreplicas", "replication"})
_TRANSIENT_CODES = {
    "BUSY": "busy",
    "LOADING": "loading",
    "READONLY": "readonly",
    "OOM": "oom",
    "MISCONF": "misconf",
    "NOREPLICAS": "noreplicas",
    "CLUSTERDOWN": "cluster_down",
    "MASTERDOWN": "cluster_down",
    "TRYAGAIN": "cluster_down",
}
_DETERMINISTIC_CODES = {
    "NOPERM": "noperm",
    "WRONGTYPE": "wrongtype",
    "NOSCRIPT": "noscript",
    "MOVED": "cluster_node",
    "ASK": "cluster_node",
    "CROSSSLOT": "cluster_node",
}
_REPLY_CODE = re.compile(r"(?:^|of pipeline caused error: \(?['\"]?|: -)([A-Z]+) ")
"""Where an error reply's code is: first; after redis-py's note on a pipeline's command
(``Command # 2 (HMGET ...) of pipeline caused error: ('CODE message',)``); after the ``-`` of
an error inside a script on Redis 6 (``Error running script ...: @user_script: 1: -CODE ...``)."""
_KNOWN_CODES = _TRANSIENT_CODES.keys() | _DETERMINISTIC_CODES.keys()
_SCRIPT_NOPERM = "can't run this command or subcommand"
"""A script's call that the ACL refuses (Redis 7 sends it without a code)."""


class ReplicationShortfall(StreamsError):
    """Fewer replicas acknowledged a write than asked within the WAIT's timeout
    (``replica_wait.py``). The write may be lost in a failover: nothing that depends on it is
    committed until a later WAIT covers it."""

    def __init__(self, acked: int, wanted: int, what: str) -> None:
        super().__init__(f"{acked} of {wanted} replica(s) acknowledged {what} in time")
        self.acked = acked
        self.wanted = wanted


class SlotMoved(StreamsError):
    """A Redis Cluster answered ``MOVED`` or ``ASK`` to commands sent to the node the client's
    slot map named (``replica_wait.py`` sends them so, on one connection): nothing ran, and the
    client reads the slot map again before the next attempt."""


_NOT_CLUSTER = "Cluster mode is not enabled"
"""redis-py's message when the URL of a cluster client names a Redis without cluster mode."""


def classify_redis_error(exc: BaseException) -> RedisFailure | None:
    """What ``exc`` says about Redis; None when it is no Redis or network failure (a bug).

    >>> classify_redis_error(rx.NoPermissionError("no permissions to run 'evalsha'")).code
    'noperm'
    >>> classify_redis_error(rx.ResponseError("BUSY Redis is busy running a script")).kind
    <FailureKind.TRANSIENT: 'transient'>
    >>> classify_redis_error(ValueError("a bug")) is None
    True
    """
    if isinstance(exc, ReplicationShortfall):
        return _transient("replication", exc)
    if isinstance(exc, SlotMoved):
        return _transient("cluster_down", exc)
    if isinstance(exc, rx.RedisClusterException):
        # Not a RedisError: the cluster client could not read the slot map (no node answered,
        # slots not covered), or the URL's node is no cluster node. A cause says which.
        cause = exc.__cause__
        if cause is not None and (found := classify_redis_error(cause)) is not None:
            return found
        if _NOT_CLUSTER in str(exc):
            return _deterministic("not_cluster", exc)
        if isinstance(exc, rx.SlotNotCoveredError) or "cannot be connected" in str(exc):
            return _transient("cluster_down", exc)
        return _deterministic("client", exc)
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return _deterministic("auth", exc)  # before ConnectionError: they derive from it
    if isinstance(exc, rx.BusyLoadingError):
        return _transient("loading", exc)
    if isinstance(exc, rx.TimeoutError | TimeoutError):
        return _transient("timeout", exc)  # before OSError: TimeoutError derives from it
    if isinstance(exc, rx.ConnectionError | OSError):
        return _transient("unreachable", exc)
    if isinstance(exc, rx.NoPermissionError):
        return _deterministic("noperm", exc)
    if isinstance(exc, rx.ReadOnlyError):
        return _transient("readonly", exc)
    if isinstance(exc, rx.OutOfMemoryError):
        return _transient("oom", exc)
    if isinstance(exc, rx.NoScriptError):
        return _deterministic("noscript", exc)
    if isinstance(exc, rx.TryAgainError | rx.ClusterDownError):
        return _transient("cluster_down", exc)
    if isinstance(exc, rx.AskError | rx.ClusterCrossSlotError):
        return _deterministic("cluster_node", exc)
    if isinstance(exc, rx.ClusterError):
        return _transient("cluster_down", exc)  # "TTL exhausted": redirections that never end
    if isinstance(exc, rx.ResponseError):
        return _from_reply(exc)
    if isinstance(exc, rx.InvalidResponse):
        return _transient("protocol", exc)
    if isinstance(exc, rx.RedisError):
        return _deterministic("client", exc)
    return None


def _from_reply(exc: rx.ResponseError) -> RedisFailure:
    """An error reply redis-py has no class for, by its code (``_REPLY_CODE``)."""
    message = str(exc)
    code = next((c for c in _REPLY_CODE.findall(message) if c in _KNOWN_CODES), "")
    if code in _TRANSIENT_CODES:
        return _transient(_TRANSIENT_CODES[code], exc)
    if code in _DETERMINISTIC_CODES or _SCRIPT_NOPERM in message:
        return _deterministic(_DETERMINISTIC_CODES.get(code, "noperm"), exc)
    return _deterministic("refused", exc)


def _detail(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    if len(message) > DETAIL_MAX_CHARS:
        message = message[: DETAIL_MAX_CHARS - 1] + "…"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _transient(code: str, exc: BaseException) -> RedisFailure:
    return RedisFailure(FailureKind.TRANSIENT, code, _detail(exc), _TRANSIENT_ADVICE[code])


def _deterministic(code: str, exc: BaseException) -> RedisFailure:
    return RedisFailure(FailureKind.DETERMINISTIC, code, _detail(exc), _DETERMINISTIC_ADVICE[code])


REDIS_RETRY_FIRST_S = 0.5
REDIS_RETRY_MAX_S = 10.0
"""The wait before the first retry of a batch that failed on Redis, doubled up to this."""


class RedisBatchFailed(StreamsError):
    """A batch failed on Redis for good: refused (``failure`` is deterministic), or failing
    past the retry deadline. The worker stops with ``exit_code``."""

    def __init__(self, failure: RedisFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.exit_code = EXIT_REDIS_UNAVAILABLE if failure.transient else EXIT_REDIS_REFUSED


async def retry_on_redis(
    attempt: Callable[[], Awaitable[T]],
    *,
    deadline_s: float,
) -> T:
    """Run ``attempt`` until it succeeds and return its result, retrying it while Redis fails
    it in a way that can heal (above). The worker retries whole batches with it; the ledger, a
    batch call whose reply was lost (``RedisLedger``).

    Waits 0.5 s before the first retry, doubled up to ``REDIS_RETRY_MAX_S``; the last wait is
    cut so that one attempt falls on the deadline. Raises ``RedisBatchFailed`` at once on a
    deterministic failure, and when an attempt fails ``deadline_s`` or more after the first
    failure (``deadline_s`` 0: never). Any other exception propagates unchanged.
    """
    delay = REDIS_RETRY_FIRST_S
    first_failure: float | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            result = await attempt()
        except Exception as exc:
            failure = classify_redis_error(exc)
            if failure is None:
                raise
            if not failure.transient:
                raise RedisBatchFailed(
                    failure, f"Redis refused the batch ({failure.detail}): {failure.advice}"
                ) from exc
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            failing_s = now - first_failure
            if deadline_s > 0 and failing_s >= deadline_s:
                raise RedisBatchFailed(
                    failure,
                    f"Redis failed the batch for {failing_s:.0f} s ({attempts} attempts, "
                    f"DEALSTREAM_REDIS_RETRY_DEADLINE_S={deadline_s:g}); last: "
                    f"{failure.detail}: {failure.advice}",
                ) from exc
            wait = delay if deadline_s <= 0 else min(delay, deadline_s - failing_s)
            log.log(
                logging.ERROR if failure.needs_operator else logging.WARNING,
                "batch failed on Redis; retrying",
                extra={
                    "code": failure.code,
                    "reason": f"{failure.detail}: {failure.advice}; retry in {wait:.1f} s",
                },
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, REDIS_RETRY_MAX_S)
        else:
            if first_failure is not None:
                log.info("batch done after Redis failures", extra={"count": attempts - 1})
            return result
