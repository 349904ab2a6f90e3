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

Options in the URL's query string (``?socket_timeout=...``) take precedence, as in redis-py.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streams.settings import Settings

HEALTH_CHECK_INTERVAL_S = 30.0
"""A connection idle this long is PINGed before its next command."""


def redis_from_settings(settings: Settings) -> aioredis.Redis:
    """A client of ``settings.redis_url`` with the options above; connects on first use."""
    timeout = settings.redis_timeout_s
    return aioredis.Redis.from_url(
        settings.redis_url.reveal(),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        retry=Retry(NoBackoff(), 0),
    )
