"""Exceptions raised by the engine: one root, :class:`EngineError`, for every failure.

Catch :class:`EngineError` to handle anything the engine raises on purpose; catch a subclass
to handle one kind. Bad input is reported with an exception, never a crash of the caller.
"""

from __future__ import annotations

__all__ = ["INVALID_EVENT_CODES", "EngineError", "InvalidEvent"]

#: Every ``InvalidEvent.code`` in use. A closed set so that codes can serve as metric labels
#: and DLQ reasons; add a code here when you add a new reason.
INVALID_EVENT_CODES: frozenset[str] = frozenset(
    {
        "invalid_json",  # bytes are not UTF-8 JSON (or the value is empty / a tombstone)
        "not_an_object",  # valid JSON, but not an object
        "missing_field",  # a required field is absent
        "wrong_type",  # a field has the wrong JSON type
        "out_of_range",  # a number (or a list length) is outside its bounds
        "too_short",  # a string is shorter than allowed (an empty id)
        "too_long",  # a string is longer than allowed
        "invalid_choice",  # a string is not one of the allowed values (e.g. browse action)
        "unknown_type",  # ``type`` is not browse, search or purchase
        "unsupported_version",  # ``schema_version`` is not one this engine reads
        "type_topic_mismatch",  # the event's ``type`` does not match the topic it came from
        "too_large",  # the raw message is bigger than the configured limit
        "missing_key",  # the Kafka message has no key (user_id)
        "clock_skew",  # event time is too far from the processing clock
        "key_mismatch",  # the Kafka record key is not the event's user_id
        "wrong_partition",  # the key's default partition is not the record's partition
    }
)


class EngineError(Exception):
    """Root of every exception the engine raises on purpose."""


class InvalidEvent(EngineError):
    """An incoming event cannot be used; route it to the dead-letter topic, don't retry it.

    ``code`` is a short machine reason from :data:`INVALID_EVENT_CODES`; ``field`` names the
    offending field (a path such as ``items[3].price``) when there is one; ``str(exc)`` is a
    readable message that names the field and says what was expected.

    >>> err = InvalidEvent("missing_field", "field 'ts' is required", field="ts")
    >>> err.code, err.field, str(err)
    ('missing_field', 'ts', "field 'ts' is required")
    """

    code: str
    field: str | None

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field

    @property
    def message(self) -> str:
        """The readable message (same as ``str(exc)``)."""
        return str(self.args[0])

    def __reduce__(self) -> tuple[type[InvalidEvent], tuple[str, str, str | None]]:
        return (type(self), (self.code, self.message, self.field))

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(code={self.code!r}, message={self.message!r}, field={self.field!r})"


class ModelSnapshotError(EngineError):
    """A model snapshot cannot be used: wrong key, truncated, tampered or incompatible bytes.

    Raised before anything is unpickled; keep serving the model you have and check that the
    worker's ``DEALSTREAM_MODEL_VERIFY_KEY`` is the public half of the learner's signing key.
    """
