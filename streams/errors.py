"""Errors of the streams package: each says what to do about it."""

from __future__ import annotations

EXIT_INTERNAL_ERROR = 70
"""A process's exit status when it stops on an error it cannot handle (``EX_SOFTWARE``)."""
EXIT_REDIS_UNAVAILABLE = 69
"""The worker's exit status when Redis failed its batch for longer than
``DEALSTREAM_REDIS_RETRY_DEADLINE_S`` in ways that can heal (unreachable, timeouts, loading,
read-only, out of memory): ``EX_UNAVAILABLE``."""
EXIT_STOP_TIMEOUT = 75
"""The worker's exit status when its graceful stop took longer than
``DEALSTREAM_STOP_TIMEOUT_S`` and it exited without finishing it (``EX_TEMPFAIL``): nothing is
lost (the uncommitted batches are read again, their outputs published again from the outbox),
as after a SIGKILL."""
EXIT_REDIS_REFUSED = 78
"""The worker's exit status when Redis refused its batch for a reason no retry fixes (a
permission, the password, a key of another type, a script error): ``EX_CONFIG``, as most of
them are fixed in the configuration of Redis or of the worker."""


class StreamsError(Exception):
    """Root of every error raised by ``streams``; the CLI prints it as one line."""


class ConfigError(StreamsError):
    """A setting that cannot be used."""


class ServiceUnavailable(StreamsError):
    """Kafka or Redis did not answer."""


class SinkError(StreamsError):
    """A record that cannot be produced as asked (the message says why)."""
