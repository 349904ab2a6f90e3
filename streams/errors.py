"""Errors of the streams package: each says what to do about it."""

from __future__ import annotations

EXIT_INTERNAL_ERROR = 70
"""A process's exit status when it stops on an error it cannot handle (``EX_SOFTWARE``)."""


class StreamsError(Exception):
    """Root of every error raised by ``streams``; the CLI prints it as one line."""


class ConfigError(StreamsError):
    """A setting that cannot be used."""


class ServiceUnavailable(StreamsError):
    """Kafka or Redis did not answer."""


class SinkError(StreamsError):
    """A record that cannot be produced as asked (the message says why)."""
