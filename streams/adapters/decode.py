"""Turn raw Kafka records into engine events, or into dead letters that say why not."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidEvent
from engine.events import Event, decode_event
from engine.features.store import Position
from engine.pipeline import Incoming
from streams.adapters.kafka_io import default_partition
from streams.settings import Topics


@dataclass(frozen=True, slots=True)
class RawRecord:
    """The parts of a Kafka record the worker needs; independent of the client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    partitions: int | None = None
    """How many partitions the record's topic has, when the consumer knows: a record that is
    not on its key's default partition is dead-lettered (a user's events must meet on one
    worker, which owns that user's feature state)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: RawRecord
    code: str
    reason: str

    def headers(self) -> list[tuple[str, bytes]]:
        """The original headers plus where the record came from and why it was rejected."""
        return [
            *self.record.headers,
            ("dealstream.source.topic", self.record.topic.encode()),
            ("dealstream.source.partition", str(self.record.partition).encode()),
            ("dealstream.source.offset", str(self.record.offset).encode()),
            ("dealstream.error.class", self.code.encode()),
            ("dealstream.error.reason", self.reason.encode()),
        ]


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_message_bytes: int = 1_000_000
    max_clock_skew_ms: int = 300_000


def decode_record(
    record: RawRecord, *, topics: Topics, limits: DecodeLimits, now_ms: int
) -> Incoming | DeadLetter:
    """Validate one record; ``now_ms`` is the wall clock, used only for the clock-skew check."""
    value = record.value or b""
    if len(value) > limits.max_message_bytes:
        return DeadLetter(
            record,
            "too_large",
            f"value is {len(value)} bytes, over the {limits.max_message_bytes}-byte limit",
        )
    if not record.key:
        return DeadLetter(record, "missing_key", "record has no key; the key must be the user_id")
    try:
        event: Event = decode_event(value, expected_type=topics.event_type_of(record.topic))
    except InvalidEvent as exc:
        return DeadLetter(record, exc.code, str(exc))
    if record.key != event.user_id.encode():
        return DeadLetter(record, "key_mismatch", "record key differs from the event's user_id")
    if (
        record.partitions
        and (expected := default_partition(record.key, record.partitions)) != record.partition
    ):
        return DeadLetter(
            record,
            "wrong_partition",
            f"the key belongs on partition {expected} of {record.partitions} (Kafka's default "
            f"partitioner), not {record.partition}: a user's events must share a partition "
            "number on every event topic",
        )
    if event.ts > now_ms + limits.max_clock_skew_ms:
        ahead_s = (event.ts - now_ms) / 1000
        return DeadLetter(
            record,
            "clock_skew",
            f"event time is {ahead_s:.0f} s ahead of the worker clock "
            f"(allowed {limits.max_clock_skew_ms / 1000:.0f} s)",
        )
    return Incoming(event, Position(record.topic, record.partition, record.offset))
