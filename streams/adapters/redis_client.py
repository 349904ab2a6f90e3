"""The one way our processes build a Redis client: the same timeouts and retries everywhere.

- ``socket_timeout`` and ``socket_connect_timeout``: ``Settings.redis_timeout_s``
  (``DEALSTREAM_REDIS_TIMEOUT_S``, default 5 s), so that a hung Redis (stopped, swapping, behind
  a dead network path) fails the call with a ``TimeoutError`` instead of holding the process.
  The slowest script of 2,000-event batches took 27 ms in Redis (docs/delivery.md, "Redis
  errors"): the default leaves a wide margin for a loaded server.
- No retries inside the client: a command whose reply was lost may still have run (a
  timed-out script runs once a stopped server continues), so redis-py must not send it again
  on its own. The worker retries the whole batch instead, up to
  ``DEALSTREAM_REDIS_RETRY_DEADLINE_S`` (the feature watermark recognises the events of a
  write that did run); the other processes report the failure.
- ``health_check_interval``: a connection idle longer than ``HEALTH_CHECK_INTERVAL_S`` (closed
  by a proxy or a server ``timeout`` meanwhile) is checked with a PING before a command is sent
  on it, so that the failure, if any, comes before the command and not after.

- TLS and the ACL user (``Settings.redis_security``): a ``rediss://`` URL is verified against
  ``DEALSTREAM_REDIS_SSL_CAFILE`` (else the system's CAs), shows the client certificate of
  ``DEALSTREAM_REDIS_SSL_CERTFILE``/``_KEYFILE`` when set and checks the server's name unless
  ``DEALSTREAM_REDIS_SSL_CHECK_HOSTNAME=false``; ``DEALSTREAM_REDIS_USERNAME`` and
  ``DEALSTREAM_REDIS_PASSWORD`` win over the URL's user and password, so the password need
  not sit in a URL (docs/security-transport.md).

Options in the URL's query string (``?socket_timeout=...``) take precedence, as in redis-py.

Redis Cluster (``DEALSTREAM_REDIS_CLUSTER``): ``redis.asyncio.cluster.RedisCluster`` from the
one node in the URL (it learns the others), with the same timeouts, TLS and ACL options. Its
own retries are off too (``retry`` with 0 retries: ``cluster_error_retry_attempts`` is the
deprecated spelling of the same): after a connection error or a timeout it would send the
command again to the slot's new owner, and the command may have run. It still follows
``MOVED`` and ``ASK`` redirections (and waits out ``TRYAGAIN``) by itself: those are refusals,
nothing ran. After a connection error it re-reads the slot map before its next command, so a
failover ends once the replica is promoted. Every key of a deployment hashes to the slot of
the prefix's hash tag (``redis_cluster_tag``), so each script call and ``MULTI`` stays on the
one primary of that slot (``deployment_node``); keyless commands are sent there too where the
answer matters (``ping``), instead of to the client's default node.

Commands are packed by hiredis's ``pack_command`` in C (``CPackedConnection`` and its TLS and
Unix-socket siblings). redis-py's asyncio connection packs in Python, growing one buffer by
copying it for every argument: the batch commit's script call of about 1,000 arguments took
about 550 µs to pack, hiredis about 100 µs, byte for byte the same (``tests/unit/
test_redis_client.py``). An argument hiredis refuses (a ``bytearray``, a ``bool``, ``None``) is
left to redis-py's own packer, which packs it or raises its ``DataError`` as before. A Redis
Cluster client keeps redis-py's packer: it builds its nodes' connections itself.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streams.settings import RedisSecurity, Secret, Settings

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
"""What ``redis_from_settings`` builds: one Redis (or a primary), or a Redis Cluster."""

HEALTH_CHECK_INTERVAL_S = 30.0
"""A connection idle this long is PINGed before its next command."""


def redis_from_settings(settings: Settings) -> RedisClient:
    """A client of ``settings.redis_url`` with the options above (a ``RedisCluster`` with
    ``settings.redis_cluster``); connects on first use."""
    timeout = settings.redis_timeout_s
    url = settings.redis_url.reveal()
    security = settings.redis_security
    parts = urlsplit(url)
    if (security.username is not None or security.password is not None) and "@" in parts.netloc:
        # redis-py lets the URL's user and password win over arguments: take them out of the
        # URL, keeping whichever of the two the settings do not set.
        security = replace(
            security,
            username=security.username or _unquoted(parts.username),
            password=security.password or _secret(_unquoted(parts.password)),
        )
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": Retry(NoBackoff(), 0),
        **_security_options(security, tls=urlsplit(url).scheme == "rediss"),
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **options)
    pool = ConnectionPool.from_url(url, **options)
    pool.connection_class = C_PACKED[pool.connection_class]
    return aioredis.Redis.from_pool(pool)


def c_packed(args: tuple[Any, ...]) -> list[bytes] | None:
    """``args`` as one command in the Redis protocol, packed by hiredis; None when hiredis
    refuses an argument's type. The first argument is split at spaces as redis-py does
    (``"CONFIG GET"`` is two words)."""
    name = args[0]
    if isinstance(name, str):
        args = (*name.encode().split(), *args[1:])
    elif b" " in name:
        args = (*name.split(), *args[1:])
    try:
        return [hiredis.pack_command(args)]
    except TypeError:
        return None


class _CPacked(AbstractConnection):
    """Packs commands with hiredis; placed before a redis-py connection class, whose own packer
    takes what hiredis refuses."""

    __slots__ = ()

    def pack_command(self, *args: Any) -> list[bytes]:
        return c_packed(args) or super().pack_command(*args)


class CPackedConnection(_CPacked, Connection):
    """A TCP connection whose commands hiredis packs."""

    __slots__ = ()


class CPackedSSLConnection(_CPacked, SSLConnection):
    """A TLS connection whose commands hiredis packs."""

    __slots__ = ()


class CPackedUnixConnection(_CPacked, UnixDomainSocketConnection):
    """A Unix-socket connection whose commands hiredis packs."""

    __slots__ = ()


C_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: CPackedConnection,
    SSLConnection: CPackedSSLConnection,
    UnixDomainSocketConnection: CPackedUnixConnection,
}
"""The connection class redis-py chose for the URL's scheme -> the same with hiredis packing."""


async def deployment_node(client: RedisCluster, prefix: str) -> ClusterNode:
    """The primary that serves every key under ``prefix`` (the slot of its hash tag), as the
    client's slot map says; reads the map first when the client has none yet."""
    await client.initialize()
    node = client.get_node_from_key(prefix)
    if node is None:  # pragma: no cover - get_node_from_key raises when the slot is uncovered
        raise RuntimeError(f"no node serves the slot of {prefix!r}")
    return node


async def ping(client: RedisClient, prefix: str) -> None:
    """PING where the deployment's keys are: the one Redis, or in a cluster the primary of the
    prefix's slot (a PING of the client's default node says nothing about that one)."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=await deployment_node(client, prefix))
    else:
        await client.ping()


def _unquoted(part: str | None) -> str | None:
    return unquote(part) if part else None


def _secret(value: str | None) -> Secret | None:
    return Secret(value) if value is not None else None


def _security_options(security: RedisSecurity, *, tls: bool) -> dict[str, Any]:
    """redis-py keyword arguments for the ACL user and, on a ``rediss://`` URL, the TLS files."""
    options: dict[str, Any] = {}
    if security.username is not None:
        options["username"] = security.username
    if security.password is not None:
        options["password"] = security.password.reveal()
    if tls:
        files = security.tls
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = files.check_hostname
        if files.cafile is not None:
            options["ssl_ca_certs"] = str(files.cafile)
        if files.certfile is not None:
            options["ssl_certfile"] = str(files.certfile)
            if files.keyfile is not None:
                options["ssl_keyfile"] = str(files.keyfile)
            if files.key_password is not None:
                options["ssl_password"] = files.key_password.reveal()
    return options
