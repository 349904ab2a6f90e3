"""A user's feature record as compact bytes: what the Redis feature store keeps per user.

One Redis string per user holds the raw feature state (``engine/features/state.py``) and the
dedup set (``engine/features/store.py``, ``UserRecord.seen``). Field names and times are stored
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

from dealstream_native import RecordCodec

from engine.features.state import (
    CATEGORY_SLOT,
    DAY_MS,
    GRAIN_MS,
    KIND_CODE,
    LAST_OFFER_FIELD,
    OFFER_TIME_SCALE,
    PARSED,
    parsed_field,
)
from engine.features.store import SEEN_KEY_BYTES, UserRecord
from streams.errors import StreamsError

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


class FeatureRecordError(StreamsError):
    """Bytes that are not a feature record of a format this version reads."""


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


def _bucket(tag: int, index: int) -> tuple[str, float]:
    """A bucket field's name and ``expires_at`` (KeyError: not a bucket tag, a corrupt record)."""
    code, slot = _BUCKET_OF_TAG[tag]
    name = f"{code}{_GRAINS[slot]}{index}"
    return name, _expires_at(name)


def _category_day(day: int, category: str) -> tuple[str, float]:
    """A category-day field's name and ``expires_at``."""
    name = f"k{day}:{category}"
    return name, _expires_at(name)


def _expires_at(name: str) -> float:
    return (PARSED.get(name) or parsed_field(name))[3]


_CODEC = RecordCodec(
    tags=(FORMAT, CATEGORY, TIME, COUNT, OFFER, LT, ANY),
    slot_ms=_SLOT_MS,
    tag_slot=tuple(
        _BUCKET_OF_TAG[tag][1] if tag in _BUCKET_OF_TAG else 0 for tag in range(CATEGORY)
    ),
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
)
"""The compiled codec (``native/``, Rust): these loops in Python were about a sixth of the
worker's CPU. It follows the layout above, with the tags, grains and field names declared
here, and asks the functions above what a name means (once per name: it remembers)."""


def encode_record(record: UserRecord) -> bytes:
    """The record as bytes (see the module docstring). Every value must be a number (a
    ``TypeError`` otherwise); integral values below 2**53 other than -0.0 are coded as
    integers, anything else as ``ANY`` with its double, so every state round-trips."""
    return _CODEC.encode(record.state, record.seen)


def decode_record(blob: bytes) -> UserRecord:
    """The record ``encode_record`` wrote; ``FeatureRecordError`` for anything else."""
    if not blob or blob[0] != FORMAT:
        raise FeatureRecordError(
            f"not a feature record of format {FORMAT} (first byte {blob[:1]!r}); written by "
            "another dealstream version?"
        )
    try:
        state, seen, next_expiry, oldest_seen = _CODEC.decode(blob)
    except ValueError as exc:
        raise FeatureRecordError(str(exc)) from None
    return UserRecord(state, seen, next_expiry, oldest_seen)
