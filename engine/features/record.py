"""A user's feature record as compact bytes: what every feature store keeps per user.

A record holds the raw feature state (``engine/features/state.py``) and the dedup set
(``UserRecord.seen``). The stores hold their users' records as these bytes, and the Redis store
writes them to Redis as they are; ``apply_records`` applies a micro-batch to them without
building Python objects for users whose state nobody reads. Field names and times are stored
relative to the user's latest event time ``lt``, as small integers in varints, so a record of
a few dozen fields and a handful of recent events takes about 100-200 bytes instead of a hash
of ``vm29384756``-style names and a sorted set of event ids.

Layout (varint: unsigned LEB128; zvarint: zig-zag varint)::

    format    1 byte (FORMAT)
    lt        varint; 0 when the state has no positive integral ``lt``
    cats      varint n, then n x (varint length, UTF-8): the category names the fields use
    fields    varint n, then n x (tag byte, payload)
    seen      varint n, n digests of SEEN_KEY_BYTES newest first (ties by digest), then their
              times in seconds (``UserRecord.seen``): the first as a zvarint ``lt // 1000 -
              seconds``, each other as a varint, the seconds since the one before it

Field tags and payloads (``ref``: the bucket index of ``lt`` in the field's grain):

- ``1 + 3 * code + grain``  a time bucket: zvarint ``ref - index``, zvarint value
- ``CATEGORY``              a category-day: varint name, zvarint ``ref - day``, zvarint value
- ``TIME + i``              ``fs`` / ``l<kind>``: zvarint ``lt - value``
- ``COUNT + i``             ``n<kind>``: zvarint value
- ``OFFER``                 ``od``: zvarint ``lt * OFFER_TIME_SCALE - value``
- ``LT``                    ``lt`` itself: no payload (it is in the header)
- ``ANY``                   any other field or a value that is not integral: varint length,
                            UTF-8 name, 8-byte IEEE double (so every state round-trips)

Every value the engine writes is integral (counts, cents, epoch ms), so ``decode_record(
encode_record(r))`` gives back the same state, field for field (``tests/unit/
test_feature_record.py``).
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dealstream_native import CorruptData, RecordCodec

from engine.errors import EngineError
from engine.features.state import (
    ACTIVITY_CODES,
    CATEGORY_SLOT,
    CATEGORY_WINDOW_DAYS,
    DAY_MS,
    GRAIN_MS,
    GRAIN_SLOT,
    KIND_CODE,
    LAST_OFFER_FIELD,
    NEVER,
    OFFER_TIME_SCALE,
    PARSED,
    PURCHASE_DAYS_WINDOW,
    RETENTION_BUCKETS,
    SESSION_GAP_MINUTES,
    WINDOWS,
    State,
    parsed_field,
)

FORMAT = 2
_GRAINS = ("m", "h", "d")
_CODES = ("v", "c", "f", "s", "p", "$", "r", "o", "w")
_BUCKET_TAG: dict[tuple[str, int], int] = {
    (code, slot): 1 + 3 * c + slot for c, code in enumerate(_CODES) for slot in range(3)
}
_BUCKET_OF_TAG: dict[int, tuple[str, int]] = {tag: key for key, tag in _BUCKET_TAG.items()}
CATEGORY = 40
TIME = 41
_TIME_FIELDS = ("fs", *(f"l{code}" for code in KIND_CODE.values()))
COUNT = 50
_COUNT_FIELDS = tuple(f"n{code}" for code in KIND_CODE.values())
OFFER = 60
LT = 61
ANY = 255
_TIME_TAG = {name: TIME + i for i, name in enumerate(_TIME_FIELDS)}
_COUNT_TAG = {name: COUNT + i for i, name in enumerate(_COUNT_FIELDS)}
_SLOT_MS = (GRAIN_MS["m"], GRAIN_MS["h"], GRAIN_MS["d"], DAY_MS)
_MEMO_MAX = 200_000
"""Bound of each name memo: bucket indices move with time, so old names are dropped by
clearing the memo now and then (it refills in one pass over the active users)."""


Status = TypeVar("Status")


class FeatureRecordError(EngineError):
    """Bytes that are not a feature record of a format this version reads."""


SEEN_KEY_BYTES = 5
"""What a user's dedup set remembers of an event id: a 40-bit BLAKE2b digest (``seen_key``).

Five bytes instead of the id keep the set small where it is stored (one per active user); two
of a user's n ids within the allowed lateness share a digest with probability about
n**2 / 2**41 (5e-9 for 100 ids; the later one would count as a duplicate)."""


def seen_second(ts: int) -> int:
    """The second a dedup set remembers an update by: its event time rounded up.

    Seconds take a byte apiece where milliseconds took four in a stored record. Rounding up
    keeps an id at least as long as its exact time would: an update older than the horizon
    (the latest event minus the lateness) is late whatever the set holds, so pruning by the
    rounded time changes no status."""
    return -(-ts // 1000)


@dataclass(slots=True)
class UserRecord:
    """One user's record decoded: feature state and the event ids applied within the allowed
    lateness."""

    state: State = field(default_factory=dict)
    seen: dict[bytes, int] = field(default_factory=dict)
    """``seen_key(event_id)`` -> event time in whole seconds, rounded up (``seen_second``), of
    every applied update within the lateness."""
    next_expiry: float = NEVER
    """No field expires while the latest event time is below this."""
    oldest_seen: float = NEVER
    """The smallest second in ``seen``."""


_FieldCode = tuple[int, int, int, str]
"""``(tag, bucket index or day, slot, text)`` of a field name: ``text`` is the category of a
CATEGORY field and empty otherwise; ``tag`` is ANY for a name no typed entry reproduces."""


def _field_code(name: str) -> _FieldCode:
    """How a field name is encoded; the encoder asks once per distinct name and remembers."""
    slot, index, kind, _ = PARSED.get(name) or parsed_field(name)
    if 0 <= slot < CATEGORY_SLOT:
        tag = _BUCKET_TAG.get((kind, slot))
        if tag is not None and name == f"{kind}{_GRAINS[slot]}{index}":
            return (tag, index, slot, "")
    elif slot == CATEGORY_SLOT:
        if name == f"k{index}:{kind}":
            return (CATEGORY, index, CATEGORY_SLOT, kind)
    elif name == "lt":
        return (LT, 0, 0, "")
    elif name in _TIME_TAG:
        return (_TIME_TAG[name], 0, 0, "")
    elif name in _COUNT_TAG:
        return (_COUNT_TAG[name], 0, 0, "")
    elif name == LAST_OFFER_FIELD:
        return (OFFER, 0, 0, "")
    return (ANY, 0, 0, "")


def _bucket(tag: int, index: int) -> str:
    """A bucket field's name."""
    code, slot = _BUCKET_OF_TAG[tag]
    return f"{code}{_GRAINS[slot]}{index}"


def _category_day(day: int, category: str) -> str:
    """A category-day field's name."""
    return f"k{day}:{category}"


def _expires_at(name: str) -> float:
    """When a field of any other name expires (``ParsedField``: a name that parses as a
    bucket it does not spell exactly, such as ``vm007``, expires as that bucket)."""
    return (PARSED.get(name) or parsed_field(name))[3]


_CODEC = RecordCodec(
    tags=(FORMAT, CATEGORY, TIME, COUNT, OFFER, LT, ANY),
    slot_ms=_SLOT_MS,
    retention=(
        RETENTION_BUCKETS["m"],
        RETENTION_BUCKETS["h"],
        RETENTION_BUCKETS["d"],
        RETENTION_BUCKETS["d"],
    ),
    buckets=tuple(_BUCKET_OF_TAG.get(tag) for tag in range(CATEGORY)),
    offer_time_scale=OFFER_TIME_SCALE,
    seen_key_bytes=SEEN_KEY_BYTES,
    time_fields=_TIME_FIELDS,
    count_fields=_COUNT_FIELDS,
    offer_field=LAST_OFFER_FIELD,
    memo_max=_MEMO_MAX,
    field_code=_field_code,
    bucket=_bucket,
    category=_category_day,
    expires_at=_expires_at,
    windows=tuple((GRAIN_SLOT[window.grain], window.buckets) for window in WINDOWS),
    activity_codes=tuple(sorted(ACTIVITY_CODES)),
    purchase_code=KIND_CODE["purchase"],
    session_gap_minutes=SESSION_GAP_MINUTES,
    category_days=CATEGORY_WINDOW_DAYS,
    purchase_days=PURCHASE_DAYS_WINDOW,
    parsed=parsed_field,
)
"""The compiled codec and store step (``native/src/record.rs``). It follows the layout above,
with the tags, grains, retention and field names declared here, and asks the functions above
what a name means (once per name: it remembers). A bucket or category-day expires at
``(index + retention) * grain_ms`` (``ParsedField`` in ``engine/features/state.py``)."""


def seen_key(event_id: str) -> bytes:
    """What a user's dedup set remembers of an event id (``SEEN_KEY_BYTES`` of BLAKE2b)."""
    return _CODEC.seen_key(event_id)


def encode_record(record: UserRecord) -> bytes:
    """The record as bytes (see the module docstring). Every value must be a number (a
    ``TypeError`` otherwise); integral values below 2**53 other than -0.0 are coded as
    integers, anything else as ``ANY`` with its double, so every state round-trips."""
    return _CODEC.encode(record.state, record.seen)


def decode_record(blob: bytes) -> UserRecord:
    """The record ``encode_record`` wrote; ``FeatureRecordError`` for anything else (bytes of
    another format included)."""
    try:
        state, seen, next_expiry, oldest_seen = _CODEC.decode(blob)
    except CorruptData as exc:
        raise FeatureRecordError(str(exc)) from None
    return UserRecord(state, seen, next_expiry, oldest_seen)


def decode_state(blob: bytes) -> State:
    """The feature state alone of a record (what reading features needs)."""
    try:
        return _CODEC.decode_state(blob)
    except CorruptData as exc:
        raise FeatureRecordError(str(exc)) from None


def latest_time(blob: bytes) -> int | None:
    """The user's latest event time, read from the record's header (None: it has none)."""
    try:
        return _CODEC.latest_time(blob) or None
    except CorruptData as exc:
        raise FeatureRecordError(str(exc)) from None


StateContext = tuple[dict[str, list[float]], float, int, dict[str, float], dict[str, float]]
"""``(sums, session_events, purchase_days, categories_7d, categories_30d)``
(``state_context``)."""


def state_context(state: State, now: int) -> StateContext:
    """The one pass over a user's state that a feature vector starts from, as of event time
    ``now`` (``engine.features.catalogue.build_context`` makes it a ``FeatureContext``;
    compiled: ``native/src/context.rs``, which reads each field's name with this module's
    memo). Returns the bucket sums per code (one per window of ``WINDOWS``, for the codes
    with a bucket in one), the events of the current session, the days with a purchase in
    the last ``PURCHASE_DAYS_WINDOW``, and the category activity over the two
    ``CATEGORY_WINDOW_DAYS``."""
    return _CODEC.context(state, now)


def apply_records(
    records: dict[str, bytes],
    watermarks: dict[tuple[str, int], int],
    updates: Sequence[Any],
    *,
    allowed_lateness_ms: int,
    forgotten: Container[str],
    statuses: Sequence[Status],
) -> tuple[list[Status], dict[str, bytes | None], list[str], int]:
    """The compiled half of ``engine.features.store.apply_updates`` (``native/src/record.rs``):
    the batch applied to ``records`` (user -> bytes) in place. Returns the statuses (objects
    from ``statuses``, by code), each user's bytes before the batch (None: new), the users
    whose record changed, in the order they first changed (each moved to the end of
    ``records``), and how many bytes their records grew by in all. ``FeatureRecordError`` for
    a held record it cannot read (and nothing changes)."""
    try:
        return _CODEC.apply_updates(
            records,
            watermarks,
            updates,
            allowed_lateness_ms=allowed_lateness_ms,
            forgotten=forgotten,
            statuses=statuses,
        )
    except CorruptData as exc:
        raise FeatureRecordError(str(exc)) from None
