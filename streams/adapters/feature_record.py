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
    seen      varint 2n + packed, n digests of SEEN_KEY_BYTES, then each age ``lt - ts``: as
              n big-endian uint32 when ``packed`` (every age fits), else n zvarints

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

import struct
from collections.abc import Sequence

from dealstream_native import RecordEncoder

from engine.features.state import (
    CATEGORY_SLOT,
    DAY_MS,
    GRAIN_MS,
    KIND_CODE,
    LAST_OFFER_FIELD,
    NEVER,
    OFFER_TIME_SCALE,
    PARSED,
    State,
    parsed_field,
)
from engine.features.store import SEEN_KEY_BYTES, UserRecord
from streams.errors import StreamsError

FORMAT = 1
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
_DOUBLE = struct.Struct(">d")
_MEMO_MAX = 200_000
"""Bound of each name memo: bucket indices move with time, so old names are dropped by
clearing the memo now and then (it refills in one pass over the active users)."""


class FeatureRecordError(StreamsError):
    """Bytes that are not a feature record of a format this version reads."""


_FieldCode = tuple[int, int, int, str]
"""``(tag, bucket index or day, slot, text)`` of a field name: ``text`` is the category of a
CATEGORY field and empty otherwise; ``tag`` is ANY for a name no typed entry reproduces."""


def field_code(name: str) -> _FieldCode:
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


_ENCODER = RecordEncoder(
    tags=(FORMAT, CATEGORY, COUNT, OFFER, LT, ANY),
    slot_ms=_SLOT_MS,
    offer_time_scale=OFFER_TIME_SCALE,
    memo_max=_MEMO_MAX,
    field_code=field_code,
)
"""The compiled encoder (``native/``, Rust): this loop in Python was about a sixth of the
worker's CPU. It follows the layout above; the tags and grains are the ones declared here."""


def encode_record(record: UserRecord) -> bytes:
    """The record as bytes (see the module docstring). Every value must be a number (a
    ``TypeError`` otherwise); integral values below 2**53 other than -0.0 are coded as
    integers, anything else as ``ANY`` with its double, so every state round-trips."""
    return _ENCODER.encode(record.state, record.seen)


# -- decoding ----------------------------------------------------------------------------------

_AGES: dict[int, struct.Struct] = {}
"""``>nI`` unpackers by count n: the dedup set's ages in one call, each format parsed once."""


def _ages_struct(count: int) -> struct.Struct:
    unpacker = _AGES.get(count)
    if unpacker is None:
        if len(_AGES) >= 1_000:
            _AGES.clear()
        unpacker = _AGES[count] = struct.Struct(f">{count}I")
    return unpacker


_ZIGZAG: tuple[int, ...] = tuple(b >> 1 if not b & 1 else -((b + 1) >> 1) for b in range(0x80))
"""The value of each one-byte zvarint."""
_ZIGZAG_FLOAT: tuple[float, ...] = tuple(map(float, _ZIGZAG))
_TAG_SLOT: tuple[int, ...] = tuple(
    _BUCKET_OF_TAG[tag][1] if tag in _BUCKET_OF_TAG else 0 for tag in range(CATEGORY)
)
"""The grain slot of each bucket tag (0 for the others below CATEGORY: ``_bucket`` refuses
them)."""
_BUCKETS: dict[int, tuple[str, float]] = {}
"""``index << 6 | tag`` -> the bucket field's name and ``expires_at``: each name is built and
parsed once, not once per record that holds it."""


def _bucket(tag: int, index: int) -> tuple[str, float]:
    code, slot = _BUCKET_OF_TAG[tag]  # KeyError: not a bucket tag, a corrupt record
    name = f"{code}{_GRAINS[slot]}{index}"
    entry = (name, (PARSED.get(name) or parsed_field(name))[3])
    if len(_BUCKETS) >= _MEMO_MAX:
        _BUCKETS.clear()
    _BUCKETS[index << 6 | tag] = entry
    return entry


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _zvarint_at(data: bytes, pos: int) -> tuple[int, int]:
    value, pos = _varint_at(data, pos)
    return (value >> 1 if not value & 1 else -((value + 1) >> 1)), pos


def decode_record(blob: bytes) -> UserRecord:
    """The record ``encode_record`` wrote; ``FeatureRecordError`` for anything else.

    One function over the bytes and a position (no reader object, no call per number): a byte
    below 0x80 is a whole varint, looked up in a table; bucket names and their expiry come from
    a memo; ``next_expiry`` and ``oldest_seen`` are gathered on the way, not parsed again."""
    if not blob or blob[0] != FORMAT:
        raise FeatureRecordError(
            f"not a feature record of format {FORMAT} (first byte {blob[:1]!r}); written by "
            "another dealstream version?"
        )
    data = blob
    size = len(data)
    zigzag, zfloat, tag_slot, buckets, parsed = _ZIGZAG, _ZIGZAG_FLOAT, _TAG_SLOT, _BUCKETS, PARSED
    pos = 1
    try:
        lt, pos = _varint_at(data, pos)
        refs = (lt // _SLOT_MS[0], lt // _SLOT_MS[1], lt // _SLOT_MS[2], lt // _SLOT_MS[3])
        count = data[pos]
        pos += 1
        if count >= 0x80:
            count, pos = _varint_at(data, pos - 1)
        categories: list[str] = []
        for _ in range(count):
            length, pos = _varint_at(data, pos)
            end = pos + length
            if end > size:
                raise IndexError("truncated")
            categories.append(data[pos:end].decode())
            pos = end
        count = data[pos]
        pos += 1
        if count >= 0x80:
            count, pos = _varint_at(data, pos - 1)
        state: State = {}
        next_expiry = NEVER
        for _ in range(count):
            tag = data[pos]
            pos += 1
            if tag < CATEGORY:
                byte = data[pos]
                pos += 1
                if byte < 0x80:
                    key = (refs[tag_slot[tag]] - zigzag[byte]) << 6 | tag
                else:
                    delta, pos = _zvarint_at(data, pos - 1)
                    key = (refs[tag_slot[tag]] - delta) << 6 | tag
                name, expiry = buckets.get(key) or _bucket(tag, key >> 6)
                byte = data[pos]
                pos += 1
                if byte < 0x80:
                    state[name] = zfloat[byte]
                else:
                    number, pos = _zvarint_at(data, pos - 1)
                    state[name] = float(number)
                if expiry < next_expiry:
                    next_expiry = expiry
                continue
            if tag == CATEGORY:
                number = data[pos]
                pos += 1
                if number >= 0x80:
                    number, pos = _varint_at(data, pos - 1)
                category = categories[number]
                byte = data[pos]
                pos += 1
                if byte < 0x80:
                    number = zigzag[byte]
                else:
                    number, pos = _zvarint_at(data, pos - 1)
                name = f"k{refs[3] - number}:{category}"
                expiry = (parsed.get(name) or parsed_field(name))[3]
                if expiry < next_expiry:
                    next_expiry = expiry
                byte = data[pos]
                pos += 1
                if byte < 0x80:
                    state[name] = zfloat[byte]
                else:
                    number, pos = _zvarint_at(data, pos - 1)
                    state[name] = float(number)
                continue
            if tag == LT:
                state["lt"] = float(lt)
                continue
            if tag == ANY:
                length, pos = _varint_at(data, pos)
                end = pos + length
                if end + 8 > size:
                    raise IndexError("truncated")
                name = data[pos:end].decode()
                state[name] = _DOUBLE.unpack_from(data, end)[0]
                pos = end + 8
                expiry = (parsed.get(name) or parsed_field(name))[3]
                if expiry < next_expiry:
                    next_expiry = expiry
                continue
            byte = data[pos]
            pos += 1
            if byte < 0x80:
                number = zigzag[byte]
            else:
                number, pos = _zvarint_at(data, pos - 1)
            if tag < COUNT:
                state[_TIME_FIELDS[tag - TIME]] = float(lt - number)
            elif tag < OFFER:
                state[_COUNT_FIELDS[tag - COUNT]] = float(number)
            elif tag == OFFER:
                state[LAST_OFFER_FIELD] = float(lt * OFFER_TIME_SCALE - number)
            else:
                raise KeyError(tag)
        header = data[pos]
        pos += 1
        if header >= 0x80:
            header, pos = _varint_at(data, pos - 1)
        count = header >> 1
        end = pos + count * SEEN_KEY_BYTES
        if end > size:
            raise IndexError("truncated")
        keys = [data[at : at + SEEN_KEY_BYTES] for at in range(pos, end, SEEN_KEY_BYTES)]
        pos = end
        ages: Sequence[int]
        if header & 1:
            ages = _ages_struct(count).unpack_from(data, pos)
            pos += 4 * count
        else:
            ages = []
            for _ in range(count):
                number, pos = _zvarint_at(data, pos)
                ages.append(number)
        seen = dict(zip(keys, map(lt.__sub__, ages), strict=True))
        if len(seen) != count:
            raise FeatureRecordError("feature record repeats an event id digest")
        if pos != size:
            raise FeatureRecordError(f"feature record has {size - pos} extra bytes")
    except (IndexError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise FeatureRecordError(
            f"feature record is corrupt ({type(exc).__name__} at byte {pos})"
        ) from None
    return UserRecord(state, seen, next_expiry, min(seen.values(), default=NEVER))
