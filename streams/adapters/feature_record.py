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
_EXACT = 2**53
_DOUBLE = struct.Struct(">d")
_MEMO_MAX = 200_000
"""Bound of each name memo: bucket indices move with time, so old names are dropped by
clearing the memo now and then (it refills in one pass over the active users)."""


class FeatureRecordError(StreamsError):
    """Bytes that are not a feature record of a format this version reads."""


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _zvarint(out: bytearray, value: int) -> None:
    _varint(out, value << 1 if value >= 0 else (-value << 1) - 1)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    _varint(out, value)
    return bytes(out)


def _zvarint_bytes(value: int) -> bytes:
    out = bytearray()
    _zvarint(out, value)
    return bytes(out)


_ZSPAN = 4096
_ZVARINT: tuple[bytes, ...] = tuple(map(_zvarint_bytes, (*range(_ZSPAN), *range(-64, 0))))
"""The zvarint of each n in ``[-64, _ZSPAN)``, as bytes: ``_ZVARINT[n]`` (a negative n picks
its entry from the end, Python's negative indexing)."""
_SMALL: dict[float, bytes] = {float(n): _ZVARINT[n] for n in range(-64, _ZSPAN)}
"""The zvarint of each integral value in ``[-64, _ZSPAN)`` by its float: one lookup both codes
a value and proves it an exact integer (a miss: anything else, coded the long way). -0.0
finds 0.0's entry, so ``encode_record`` keeps states with a -0.0 off this path."""
_HEAD_SPAN = 128
"""Bucket deltas (``ref - index``) with a precomputed tag + delta prefix: every retained one."""
_CATEGORY_HEAD: tuple[bytes, ...] = tuple(bytes((CATEGORY, n)) for n in range(0x80))


_FieldCode = tuple[int, int, int, str, tuple[bytes, ...]]
"""``(tag, bucket index or day, slot, text, heads)`` of a field name: ``text`` is the category
of a CATEGORY field and the name itself when ``tag`` is ANY (no typed entry reproduces it);
``heads[delta]`` the bytes of a bucket's tag and ``delta`` for ``0 <= delta < _HEAD_SPAN``."""
_FIELD_CODES: dict[str, _FieldCode] = {}
_HEADS: dict[int, tuple[bytes, ...]] = {
    tag: tuple(bytes((tag,)) + _ZVARINT[delta] for delta in range(_HEAD_SPAN))
    for tag in _BUCKET_OF_TAG
}


def _field_code(name: str) -> _FieldCode:
    """How a field name is encoded, worked out once per distinct name (bounded memo)."""
    code = _FIELD_CODES.get(name)
    if code is not None:
        return code
    slot, index, kind, _ = PARSED.get(name) or parsed_field(name)
    code = (ANY, 0, 0, name, ())
    if 0 <= slot < CATEGORY_SLOT:
        tag = _BUCKET_TAG.get((kind, slot))
        if tag is not None and name == f"{kind}{_GRAINS[slot]}{index}":
            code = (tag, index, slot, "", _HEADS[tag])
    elif slot == CATEGORY_SLOT:
        if name == f"k{index}:{kind}":
            code = (CATEGORY, index, CATEGORY_SLOT, kind, ())
    elif name == "lt":
        code = (LT, 0, 0, "", ())
    elif name in _TIME_TAG:
        code = (_TIME_TAG[name], 0, 0, "", ())
    elif name in _COUNT_TAG:
        code = (_COUNT_TAG[name], 0, 0, "", ())
    elif name == LAST_OFFER_FIELD:
        code = (OFFER, 0, 0, "", ())
    if len(_FIELD_CODES) >= _MEMO_MAX:
        _FIELD_CODES.clear()
    _FIELD_CODES[name] = code
    return code


def _exact_ints(values: Collection[float]) -> bool:
    """Every value an integral float that an int holds exactly, and no -0.0: what may be
    coded as an integer (C-speed checks, so a whole state is checked in one call)."""
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


_AGES: dict[int, struct.Struct] = {}
"""``>nI`` packers by count n: the dedup set's ages in one call, each format parsed once."""


def _ages_struct(count: int) -> struct.Struct:
    packer = _AGES.get(count)
    if packer is None:
        if len(_AGES) >= 1_000:
            _AGES.clear()
        packer = _AGES[count] = struct.Struct(f">{count}I")
    return packer


_CATEGORY_BYTES: dict[str, bytes] = {}
"""A category name as the header stores it (varint length, UTF-8), built once per name."""


def encode_record(record: UserRecord) -> bytes:
    """The record as bytes (see the module docstring).

    Runs for every user a batch touches, so the common case is table lookups appended to one
    buffer: a bucket field is ``heads[delta]`` then ``_SMALL[value]`` (a hit also proves the
    value a small exact integer), other small numbers come from ``_ZVARINT``, large ones are
    spelled out inline, and the dedup set's ages are packed in one call when they fit. A state
    holding a -0.0 (which would find 0.0's entry), or a value outside the table that is not a
    float, is coded by ``_encode_checked``: the format as defined, each value checked on its
    own. (A small ``int`` value, outside ``State``'s type, hits the table like its float.)"""
    state = record.state
    lt_value = state.get("lt")
    lt = 0
    if lt_value is not None and 0 < lt_value < _EXACT and lt_value.is_integer():
        lt = int(lt_value)
    values = state.values()
    try:
        codes = list(map(_FIELD_CODES.__getitem__, state))
    except KeyError:
        codes = list(map(_field_code, state))
    refs = (lt // _SLOT_MS[0], lt // _SLOT_MS[1], lt // _SLOT_MS[2], lt // _SLOT_MS[3])
    categories: dict[str, int] = {}
    if 0.0 in values and any(copysign(1.0, v) < 0.0 for v in values if v == 0.0):
        return _encode_checked(record, codes, lt, refs)
    out = bytearray()
    append = out.append
    zvarint = _ZVARINT
    try:
        for code, value, small in zip(codes, values, map(_SMALL.get, values), strict=True):
            tag, index, slot, text, heads = code
            if tag < CATEGORY:
                delta = refs[slot] - index
                if small is not None:
                    if 0 <= delta < _HEAD_SPAN:
                        out += heads[delta]
                        out += small
                        continue
                elif not (value.is_integer() and -_EXACT < value < _EXACT):
                    _any(out, _name_of(code), value)
                    continue
                append(tag)
                _zvarint(out, delta)
            elif tag == CATEGORY:
                if small is None and not (value.is_integer() and -_EXACT < value < _EXACT):
                    _any(out, _name_of(code), value)
                    continue
                number = categories.get(text)
                if number is None:
                    number = categories[text] = len(categories)
                if number < 0x80:
                    out += _CATEGORY_HEAD[number]
                else:
                    append(CATEGORY)
                    _varint(out, number)
                delta = refs[3] - index
                if 0 <= delta < _ZSPAN:
                    out += zvarint[delta]
                else:
                    _zvarint(out, delta)
            elif tag == LT:
                if value == lt:
                    append(LT)
                else:
                    _any(out, "lt", value)
                continue
            elif tag == ANY:
                _any(out, text, value)
                continue
            elif small is None and not (value.is_integer() and -_EXACT < value < _EXACT):
                _any(out, _name_of(code), value)
                continue
            elif tag < COUNT:
                append(tag)
                number = lt - int(value)
                if 0 <= number < _ZSPAN:
                    out += zvarint[number]
                elif number > 0:
                    number <<= 1
                    while number > 0x7F:
                        append((number & 0x7F) | 0x80)
                        number >>= 7
                    append(number)
                else:
                    _zvarint(out, number)
                continue
            elif tag == OFFER:
                append(OFFER)
                _zvarint(out, lt * OFFER_TIME_SCALE - int(value))
                continue
            else:
                append(tag)
            if small is not None:
                out += small
            else:
                _zvarint(out, int(value))
    except (AttributeError, TypeError):  # a value that is not a float
        return _encode_checked(record, codes, lt, refs)
    return _framed(out, lt, categories, len(state), record.seen)


def _encode_checked(
    record: UserRecord, codes: list[_FieldCode], lt: int, refs: tuple[int, int, int, int]
) -> bytes:
    """``encode_record`` field by field, each value checked on its own: the format's
    definition, for the states the fast path leaves out."""
    categories: dict[str, int] = {}
    out = bytearray()
    append = out.append
    for code, value in zip(codes, record.state.values(), strict=True):
        tag, index, slot, text, _ = code
        if tag == ANY or not _exact_ints((value,)):
            _any(out, text if tag == ANY else _name_of(code), value)
            continue
        if tag <= CATEGORY:
            append(tag)
            if tag == CATEGORY:
                number = categories.get(text)
                if number is None:
                    number = categories[text] = len(categories)
                _varint(out, number)
            _zvarint(out, refs[slot] - index)
            number = int(value)
        elif tag == LT:
            if value == lt:
                append(LT)
            else:
                _any(out, "lt", value)
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
        _zvarint(out, number)
    return _framed(out, lt, categories, len(record.state), record.seen)


def _name_of(code: _FieldCode) -> str:
    """The field name a typed code stands for (what an ANY entry spells out)."""
    tag, index, slot, text, _ = code
    if tag < CATEGORY:
        return f"{_BUCKET_OF_TAG[tag][0]}{_GRAINS[slot]}{index}"
    if tag == CATEGORY:
        return f"k{index}:{text}"
    if tag == LT:
        return "lt"
    if tag < COUNT:
        return _TIME_FIELDS[tag - TIME]
    if tag < OFFER:
        return _COUNT_FIELDS[tag - COUNT]
    return LAST_OFFER_FIELD


def _framed(
    body: bytearray, lt: int, categories: Collection[str], fields: int, seen: dict[bytes, int]
) -> bytes:
    """The header, the coded fields and the dedup set, joined in one copy."""
    head = bytearray((FORMAT,))
    _varint(head, lt)
    _varint(head, len(categories))
    for category in categories:
        raw = _CATEGORY_BYTES.get(category)
        if raw is None:
            encoded = category.encode()
            raw = _varint_bytes(len(encoded)) + encoded
            if len(_CATEGORY_BYTES) >= _MEMO_MAX:
                _CATEGORY_BYTES.clear()
            _CATEGORY_BYTES[category] = raw
        head += raw
    _varint(head, fields)
    count = len(seen)
    if not count:
        body.append(0)
        return b"".join((head, body))
    try:  # ``>nI`` refuses an age outside uint32 (and a time that is no int)
        packed = _ages_struct(count).pack(*map(lt.__sub__, seen.values()))
    except struct.error:
        pass
    else:
        _varint(body, count << 1 | 1)
        return b"".join((head, body, b"".join(seen), packed))
    ages = [lt - ts for ts in seen.values()]
    _varint(body, count << 1)
    body += b"".join(seen)
    for age in ages:
        _zvarint(body, age)
    return b"".join((head, body))


def _any(out: bytearray, name: str, value: float) -> None:
    raw = name.encode()
    out.append(ANY)
    _varint(out, len(raw))
    out += raw
    out += _DOUBLE.pack(value)


# -- decoding ----------------------------------------------------------------------------------

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
