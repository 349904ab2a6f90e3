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
    seen      varint n, then n x (SEEN_KEY_BYTES digest, zvarint lt - ts)

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
from math import copysign

from engine.features.state import (
    CATEGORY_SLOT,
    DAY_MS,
    GRAIN_MS,
    KIND_CODE,
    LAST_OFFER_FIELD,
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
_EXACT = 2**53
_DOUBLE = struct.Struct(">d")


class FeatureRecordError(StreamsError):
    """Bytes that are not a feature record of a format this version reads."""


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zvarint(out: bytearray, value: int) -> None:
    _varint(out, value << 1 if value >= 0 else (-value << 1) - 1)


_FieldCode = tuple[int, int, str]
"""``(tag, bucket index or day, category)`` of a field name; ``tag`` ANY when no typed entry
reproduces the name exactly."""
_FIELD_CODES: dict[str, _FieldCode] = {}
_FIELD_CODES_MAX = 200_000


def _field_code(name: str) -> _FieldCode:
    """How a field name is encoded, worked out once per distinct name (bounded memo)."""
    code = _FIELD_CODES.get(name)
    if code is not None:
        return code
    slot, index, kind, _ = PARSED.get(name) or parsed_field(name)
    code = (ANY, 0, "")
    if 0 <= slot < CATEGORY_SLOT:
        tag = _BUCKET_TAG.get((kind, slot))
        if tag is not None and name == f"{kind}{_GRAINS[slot]}{index}":
            code = (tag, index, "")
    elif slot == CATEGORY_SLOT:
        if name == f"k{index}:{kind}":
            code = (CATEGORY, index, kind)
    elif name == "lt":
        code = (LT, 0, "")
    elif name in _TIME_TAG:
        code = (_TIME_TAG[name], 0, "")
    elif name in _COUNT_TAG:
        code = (_COUNT_TAG[name], 0, "")
    elif name == LAST_OFFER_FIELD:
        code = (OFFER, 0, "")
    if len(_FIELD_CODES) >= _FIELD_CODES_MAX:
        _FIELD_CODES.clear()
    _FIELD_CODES[name] = code
    return code


def encode_record(record: UserRecord) -> bytes:
    """The record as bytes (see the module docstring).

    Runs for every user a batch touches, so the common case is spelled out inline: most
    numbers are zig-zagged into one byte; ``_zvarint`` only for the rest."""
    state = record.state
    lt_value = state.get("lt")
    lt = 0
    if lt_value is not None and 0 < lt_value < _EXACT and lt_value.is_integer():
        lt = int(lt_value)
    refs = (lt // _SLOT_MS[0], lt // _SLOT_MS[1], lt // _SLOT_MS[2], lt // _SLOT_MS[3])
    categories: dict[str, int] = {}
    out = bytearray()
    append = out.append
    codes = _FIELD_CODES
    for name, value in state.items():
        tag, index, category = codes.get(name) or _field_code(name)
        if (
            tag == ANY
            or not value.is_integer()
            or not -_EXACT < value < _EXACT
            or (value == 0.0 and copysign(1.0, value) < 0.0)
        ):
            _any(out, name, value)
            continue
        if tag < CATEGORY:
            append(tag)
            delta = refs[(tag - 1) % 3] - index
        elif tag == CATEGORY:
            number = categories.get(category)
            if number is None:
                number = categories[category] = len(categories)
            append(CATEGORY)
            _varint(out, number)
            delta = refs[3] - index
        elif tag == LT:
            if value == lt:
                append(LT)
            else:
                _any(out, name, value)
            continue
        elif tag < COUNT:
            append(tag)
            delta = lt - int(value)
            if 0 <= delta < 64:
                append(delta << 1)
            else:
                _zvarint(out, delta)
            continue
        elif tag < OFFER:
            append(tag)
            delta = int(value)
            if 0 <= delta < 64:
                append(delta << 1)
            else:
                _zvarint(out, delta)
            continue
        else:
            append(OFFER)
            _zvarint(out, lt * OFFER_TIME_SCALE - int(value))
            continue
        # A bucket or category-day: the index delta, then the value.
        if 0 <= delta < 64:
            append(delta << 1)
        else:
            _zvarint(out, delta)
        as_int = int(value)
        if 0 <= as_int < 64:
            append(as_int << 1)
        else:
            _zvarint(out, as_int)
    head = bytearray((FORMAT,))
    _varint(head, lt)
    _varint(head, len(categories))
    for category in categories:
        raw = category.encode()
        _varint(head, len(raw))
        head += raw
    _varint(head, len(state))
    head += out
    seen = record.seen
    _varint(head, len(seen))
    for key, ts in seen.items():
        head += key.to_bytes(SEEN_KEY_BYTES, "big")
        _zvarint(head, lt - ts)
    return bytes(head)


def _any(out: bytearray, name: str, value: float) -> None:
    raw = name.encode()
    out.append(ANY)
    _varint(out, len(raw))
    out += raw
    out += _DOUBLE.pack(value)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        data, pos = self.data, self.pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        self.pos = pos
        return value

    def zvarint(self) -> int:
        value = self.varint()
        return value >> 1 if not value & 1 else -((value + 1) >> 1)

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise IndexError("truncated")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk


def decode_record(blob: bytes) -> UserRecord:
    """The record ``encode_record`` wrote; ``FeatureRecordError`` for anything else."""
    if not blob or blob[0] != FORMAT:
        raise FeatureRecordError(
            f"not a feature record of format {FORMAT} (first byte {blob[:1]!r}); written by "
            "another dealstream version?"
        )
    reader = _Reader(blob)
    reader.pos = 1
    try:
        lt = reader.varint()
        refs = (lt // _SLOT_MS[0], lt // _SLOT_MS[1], lt // _SLOT_MS[2], lt // _SLOT_MS[3])
        categories = [reader.take(reader.varint()).decode() for _ in range(reader.varint())]
        state: State = {}
        for _ in range(reader.varint()):
            tag = reader.byte()
            if tag == ANY:
                name = reader.take(reader.varint()).decode()
                state[name] = _DOUBLE.unpack(reader.take(8))[0]
            elif tag == CATEGORY:
                category = categories[reader.varint()]
                day = refs[3] - reader.zvarint()
                state[f"k{day}:{category}"] = float(reader.zvarint())
            elif tag == LT:
                state["lt"] = float(lt)
            elif tag == OFFER:
                state[LAST_OFFER_FIELD] = float(lt * OFFER_TIME_SCALE - reader.zvarint())
            elif TIME <= tag < TIME + len(_TIME_FIELDS):
                state[_TIME_FIELDS[tag - TIME]] = float(lt - reader.zvarint())
            elif COUNT <= tag < COUNT + len(_COUNT_FIELDS):
                state[_COUNT_FIELDS[tag - COUNT]] = float(reader.zvarint())
            else:
                code, slot = _BUCKET_OF_TAG[tag]
                index = refs[slot] - reader.zvarint()
                state[f"{code}{_GRAINS[slot]}{index}"] = float(reader.zvarint())
        seen: dict[int, int] = {}
        for _ in range(reader.varint()):
            key = int.from_bytes(reader.take(SEEN_KEY_BYTES), "big")
            seen[key] = lt - reader.zvarint()
        if reader.pos != len(blob):
            raise FeatureRecordError(f"feature record has {len(blob) - reader.pos} extra bytes")
    except (IndexError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise FeatureRecordError(
            f"feature record is corrupt ({type(exc).__name__} at byte {reader.pos})"
        ) from None
    return UserRecord.restored(state, seen)
