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
from collections.abc import Collection, Sequence
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
_MAX_AGE = 2**32 - 1


class FeatureRecordError(StreamsError):
    """Bytes that are not a feature record of a format this version reads."""


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zvarint(out: bytearray, value: int) -> None:
    _varint(out, value << 1 if value >= 0 else (-value << 1) - 1)


_FieldCode = tuple[int, int, int, str]
"""``(tag, bucket index or day, slot, category)`` of a field name; ``tag`` is ANY when no
typed entry reproduces the name exactly."""
_FIELD_CODES: dict[str, _FieldCode] = {}
_FIELD_CODES_MAX = 200_000
_ANY_CODE: _FieldCode = (ANY, 0, 0, "")


def _field_code(name: str) -> _FieldCode:
    """How a field name is encoded, worked out once per distinct name (bounded memo)."""
    code = _FIELD_CODES.get(name)
    if code is not None:
        return code
    slot, index, kind, _ = PARSED.get(name) or parsed_field(name)
    code = _ANY_CODE
    if 0 <= slot < CATEGORY_SLOT:
        tag = _BUCKET_TAG.get((kind, slot))
        if tag is not None and name == f"{kind}{_GRAINS[slot]}{index}":
            code = (tag, index, slot, "")
    elif slot == CATEGORY_SLOT:
        if name == f"k{index}:{kind}":
            code = (CATEGORY, index, CATEGORY_SLOT, kind)
    elif name == "lt":
        code = (LT, 0, 0, "")
    elif name in _TIME_TAG:
        code = (_TIME_TAG[name], 0, 0, "")
    elif name in _COUNT_TAG:
        code = (_COUNT_TAG[name], 0, 0, "")
    elif name == LAST_OFFER_FIELD:
        code = (OFFER, 0, 0, "")
    if len(_FIELD_CODES) >= _FIELD_CODES_MAX:
        _FIELD_CODES.clear()
    _FIELD_CODES[name] = code
    return code


def _exact_ints(values: Collection[float]) -> bool:
    """Every value an integral float that an int holds exactly, and no -0.0 (C-speed checks:
    this decides whether ``encode_record`` may skip them per field)."""
    if not values:
        return True
    try:
        if not all(map(float.is_integer, values)):
            return False
    except TypeError:
        return False
    if not (min(values) > -_EXACT and max(values) < _EXACT):
        return False
    return 0.0 not in values or not any(copysign(1.0, v) < 0.0 for v in values if v == 0.0)


def encode_record(record: UserRecord) -> bytes:
    """The record as bytes (see the module docstring).

    Runs for every user a batch touches, so the common case is spelled out inline: values
    checked all at once (``_exact_ints``), most numbers zig-zagged into one byte, ``_zvarint``
    for the rest, and the dedup set's times packed in one call when they fit."""
    state = record.state
    plain = _exact_ints(state.values())
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
        tag, index, slot, category = codes.get(name) or _field_code(name)
        if tag == ANY or not (plain or _exact_ints((value,))):
            _any(out, name, value)
            continue
        if tag <= CATEGORY:
            if tag == CATEGORY:
                number = categories.get(category)
                if number is None:
                    number = categories[category] = len(categories)
                append(CATEGORY)
                _varint(out, number)
            else:
                append(tag)
            delta = refs[slot] - index
            if 0 <= delta < 64:
                append(delta << 1)
            else:
                _zvarint(out, delta)
            number = int(value)
        elif tag == LT:
            if value == lt:
                append(LT)
            else:
                _any(out, name, value)
            continue
        elif tag < COUNT:
            append(tag)
            number = lt - int(value)
        elif tag < OFFER:
            append(tag)
            number = int(value)
        else:
            append(OFFER)
            number = lt * OFFER_TIME_SCALE - int(value)
        if 0 <= number < 64:
            append(number << 1)
        else:
            _zvarint(out, number)
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
    count = len(seen)
    if count:
        ages = [lt - ts for ts in seen.values()]
        packed = min(ages) >= 0 and max(ages) <= _MAX_AGE
        _varint(head, count << 1 | (1 if packed else 0))
        head += b"".join(seen)
        if packed:
            head += struct.pack(f">{count}I", *ages)
        else:
            for age in ages:
                _zvarint(head, age)
    else:
        head.append(0)
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
        seen: dict[bytes, int] = {}
        header = reader.varint()
        count = header >> 1
        keys = reader.take(count * SEEN_KEY_BYTES)
        if header & 1:
            ages: Sequence[int] = struct.unpack(f">{count}I", reader.take(4 * count))
        else:
            ages = [reader.zvarint() for _ in range(count)]
        for k, age in enumerate(ages):
            seen[keys[k * SEEN_KEY_BYTES : (k + 1) * SEEN_KEY_BYTES]] = lt - age
        if len(seen) != count:
            raise FeatureRecordError("feature record repeats an event id digest")
        if reader.pos != len(blob):
            raise FeatureRecordError(f"feature record has {len(blob) - reader.pos} extra bytes")
    except (IndexError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise FeatureRecordError(
            f"feature record is corrupt ({type(exc).__name__} at byte {reader.pos})"
        ) from None
    return UserRecord.restored(state, seen)
