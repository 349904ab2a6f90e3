"""Turn raw Kafka records into engine events, or into dead letters that say why not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aiokafka.record.default_records import DefaultRecordBatchBuilder
from dealstream_native import default_partition

from engine.errors import InvalidEvent
from engine.events import Event, decode_event
from engine.features.store import Position
from engine.pipeline import Incoming, state_update
from streams.adapters.kafka_io import PRODUCER_MAX_REQUEST_BYTES
from streams.settings import Topics


class RawRecord(NamedTuple):
    """The parts of a Kafka record the worker needs; independent of the client library (a
    named tuple: one is built for every record consumed)."""

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


RESERVED_HEADER_PREFIXES = ("dealstream.source.", "dealstream.error.")
"""Header names only the worker sets on a dead letter: a producer's headers under them, in any
letter case (HTTP bridges and some clients fold it), are dropped, so that no one can spoof
where a dead letter came from or why it was rejected."""
TRUNCATED_HEADER = "dealstream.error.truncated"
ORIGINAL_SIZE_HEADER = "dealstream.error.original_size"


def record_bytes(key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    """What the producer counts against its ``max_request_size`` for one record (aiokafka's
    own upper bound: a batch of that record alone)."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    """The record a dead letter becomes on the DLQ topic."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    truncated: bool
    """Cut to fit the producer's limit (``dealstream.error.truncated`` says what was cut)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: RawRecord
    code: str
    reason: str

    def headers(self) -> list[tuple[str, bytes]]:
        """The original headers (but those named like ours) plus where the record came from
        and why it was rejected."""
        return [*self._original_headers(), *self._our_headers()]

    def _original_headers(self) -> list[tuple[str, bytes]]:
        return [
            h for h in self.record.headers if not h[0].lower().startswith(RESERVED_HEADER_PREFIXES)
        ]

    def _our_headers(self) -> list[tuple[str, bytes]]:
        return [
            ("dealstream.source.topic", self.record.topic.encode()),
            ("dealstream.source.partition", str(self.record.partition).encode()),
            ("dealstream.source.offset", str(self.record.offset).encode()),
            ("dealstream.error.class", self.code.encode()),
            ("dealstream.error.reason", self.reason.encode()),
        ]

    def message(self, max_bytes: int) -> DeadLetterMessage:
        """The DLQ record: the original key, value and headers plus ours when they fit in
        ``max_bytes`` (the producer's limit), else cut so that they do: a record too large to
        dead-letter whole would be refused by the producer and stop the worker on every
        restart. The value is cut first (to a prefix), then the original headers dropped,
        then the key cut; ``dealstream.error.truncated`` lists what was cut and
        ``dealstream.error.original_size`` gives the original value's size in bytes."""
        key = self.record.key
        value = self.record.value or b""
        headers = self.headers()
        if record_bytes(key, value, headers) <= max_bytes:
            return DeadLetterMessage(key, value, tuple(headers), truncated=False)
        cut = ["value"]
        kept = self._original_headers()
        if kept and self._room(key, kept, [*cut, "headers"], len(value), max_bytes) < 0:
            kept, cut = [], [*cut, "headers"]
        if key and self._room(key, kept, [*cut, "key"], len(value), max_bytes) < 0:
            cut.append("key")
        headers = [*kept, *self._our_headers(), *_cut_headers(cut, len(value))]
        if key and "key" in cut:
            key = _prefix_that_fits(key, lambda k: record_bytes(k, b"", headers), max_bytes)
        value = _prefix_that_fits(value, lambda v: record_bytes(key, v, headers), max_bytes)
        return DeadLetterMessage(key, value, tuple(headers), truncated=True)

    def _room(
        self,
        key: bytes | None,
        kept: list[tuple[str, bytes]],
        cut: list[str],
        value_size: int,
        max_bytes: int,
    ) -> int:
        """Bytes left for the value (and a cut key) after ``key`` and the headers."""
        headers = [*kept, *self._our_headers(), *_cut_headers(cut, value_size)]
        return max_bytes - record_bytes(key, b"", headers)


def _prefix_that_fits(data: bytes, size: Callable[[bytes], int], max_bytes: int) -> bytes:
    """The longest prefix of ``data`` with ``size(prefix) <= max_bytes`` (empty if none is):
    sizes grow byte for byte but for the length's varint, so a few steps settle it."""
    data = data[: max(0, max_bytes - size(b""))]
    while data and (excess := size(data) - max_bytes) > 0:
        data = data[: len(data) - excess]
    return data


def _cut_headers(cut: Sequence[str], value_size: int) -> list[tuple[str, bytes]]:
    return [
        (TRUNCATED_HEADER, ",".join(cut).encode()),
        (ORIGINAL_SIZE_HEADER, str(value_size).encode()),
    ]


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_message_bytes: int = 1_000_000
    max_clock_skew_ms: int = 300_000
    max_dead_letter_bytes: int = PRODUCER_MAX_REQUEST_BYTES
    """Dead letters are cut to fit (``DeadLetter.message``): the producer refuses more."""


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
    position = Position(record.topic, record.partition, record.offset)
    return Incoming(event, position, state_update(event, position))
