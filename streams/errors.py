"""Errors of the streams package: each says what to do about it."""

from __future__ import annotations


class StreamsError(Exception):
    """Root of every error raised by ``streams``; the CLI prints it as one line."""


class ConfigError(StreamsError):
    """A setting that cannot be used."""


class ServiceUnavailable(StreamsError):
    """Kafka or Redis did not answer."""
