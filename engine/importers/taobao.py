"""Taobao UserBehavior CSV (Alibaba Tianchi) to event v1.

Each row is ``user_id,item_id,category_id,behavior,unix_ts`` (no header, ``unix_ts`` in
seconds, behaviour ``pv``/``cart``/``fav``/``buy``). The data has no prices, so every price
and amount is ``0``, which in imported data means *unknown* (see ``docs/importers.md``).

>>> run = import_taobao(["543462,1715,1464116,pv,1511658000", "1,2,3,buy,1511658001"])
>>> [(e["event_id"], e["type"], e.get("action")) for e in run]
[('tb-543462-1511658000-1715-pv', 'browse', 'view'), ('tb-1-1511658001-2-buy', 'purchase', None)]
>>> run.stats.records, run.stats.emitted, run.stats.rejected
(2, 2, 0)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Final

from engine.event_fields import MAX_INTEGER
from engine.events import SCHEMA_VERSION
from engine.importers.base import (
    DEFAULT_KEEP_REJECTS,
    ImportRun,
    ImportStats,
    Line,
    Parsed,
    Reject,
    RejectHandler,
    Source,
    TimeWindow,
    check_source,
    describe_ts,
    excerpt,
    source_name,
    source_parser,
)

__all__ = ["BEHAVIORS", "TAOBAO_WINDOW", "import_taobao", "parse_taobao"]

#: Source behaviour -> (event v1 type, browse action).
BEHAVIORS: Final[dict[str, tuple[str, str | None]]] = {
    "pv": ("browse", "view"),
    "cart": ("browse", "cart"),
    "fav": ("browse", "favorite"),
    "buy": ("purchase", None),
}

#: The period the data set documents: 2017-11-25 to 2017-12-03 inclusive, China time (UTC+8),
#: i.e. [2017-11-24T16:00Z, 2017-12-03T16:00Z). Rows outside it are known errors in the data.
TAOBAO_WINDOW: Final = TimeWindow(1_511_539_200_000, 1_512_316_800_000)

_FIELDS: Final = 5
_MAX_DIGITS: Final = 32
"""Longest id accepted (the data's are at most 7 digits); keeps every derived id <= 128."""
_MAX_TS_DIGITS: Final = 16
_ID_COLUMNS: Final = ("user_id", "item_id", "category_id")


def _is_id(value: str) -> bool:
    return 0 < len(value) <= _MAX_DIGITS and value.isdigit() and value.isascii()


def parse_taobao(
    lines: Iterable[Line], stats: ImportStats, *, window: TimeWindow | None = TAOBAO_WINDOW
) -> Iterator[Parsed]:
    """Yield ``(line_number, event)`` for each usable row and a :class:`Reject` for the rest.

    Counts ``lines``, ``records``, ``records_by_kind`` and ``skipped`` into ``stats``.
    """
    start_ms, end_ms = (window.start_ms, window.end_ms) if window else (0, MAX_INTEGER + 1)
    by_kind = stats.records_by_kind
    lineno = records = 0
    try:
        for lineno, raw in enumerate(lines, 1):
            if isinstance(raw, bytes):
                try:
                    text = raw.decode()
                except UnicodeDecodeError as exc:
                    records += 1
                    by_kind["other"] += 1
                    yield Reject(lineno, "not_utf8", f"the row is not UTF-8: {exc}", excerpt(raw))
                    continue
            else:
                text = raw
            text = text.strip()
            if not text:
                stats.skipped["blank"] += 1
                continue
            parts = text.split(",")
            if len(parts) != _FIELDS:
                if lineno == 1 and "user" in text.lower() and "behav" in text.lower():
                    stats.skipped["header"] += 1
                    continue
                records += 1
                by_kind["other"] += 1
                detail = (
                    f"expected {_FIELDS} comma-separated fields "
                    f"(user_id,item_id,category_id,behavior,unix_ts), got {len(parts)}"
                )
                yield Reject(lineno, "field_count", detail, excerpt(raw))
                continue
            user, item, category, behavior, seconds = parts
            if lineno == 1 and behavior.lower().startswith("behav"):
                stats.skipped["header"] += 1
                continue
            records += 1
            mapped = BEHAVIORS.get(behavior)
            if mapped is None:
                by_kind["other"] += 1
                detail = f"behavior {behavior[:20]!r} is not one of pv, cart, fav, buy"
                yield Reject(lineno, "unknown_behavior", detail, excerpt(raw))
                continue
            by_kind[behavior] += 1
            if not (_is_id(user) and _is_id(item) and _is_id(category)):
                yield Reject(lineno, "bad_id", _bad_id_detail(parts), excerpt(raw))
                continue
            if not (0 < len(seconds) <= _MAX_TS_DIGITS and seconds.isdigit() and seconds.isascii()):
                detail = f"unix_ts {seconds[:20]!r} is not a whole number of seconds"
                yield Reject(lineno, "bad_ts", detail, excerpt(raw))
                continue
            ts = int(seconds) * 1000
            if not start_ms <= ts < end_ms:
                yield Reject(
                    lineno, "ts_out_of_range", _range_detail(seconds, ts, window), excerpt(raw)
                )
                continue
            yield lineno, _event(user, item, category, behavior, seconds, ts, mapped)
    finally:
        stats.lines += lineno
        stats.records += records


def _event(
    user: str,
    item: str,
    category: str,
    behavior: str,
    seconds: str,
    ts: int,
    mapped: tuple[str, str | None],
) -> dict[str, Any]:
    key = f"tb-{user}-{seconds}-{item}"
    kind, action = mapped
    if action is not None:
        return {
            "schema_version": SCHEMA_VERSION,
            "event_id": f"{key}-{behavior}",
            "user_id": f"tb-{user}",
            "type": kind,
            "ts": ts,
            "item_id": item,
            "category": category,
            "price": 0.0,
            "action": action,
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": f"{key}-{behavior}",
        "user_id": f"tb-{user}",
        "type": kind,
        "ts": ts,
        "order_id": key,
        "items": [{"item_id": item, "category": category, "price": 0.0, "quantity": 1}],
        "amount": 0.0,
    }


def _bad_id_detail(parts: list[str]) -> str:
    for name, value in zip(_ID_COLUMNS, parts, strict=False):
        if not _is_id(value):
            return f"{name} {value[:40]!r} is not a decimal integer of 1 to {_MAX_DIGITS} digits"
    return "bad id"  # pragma: no cover - only called when one id is bad


def _range_detail(seconds: str, ts: int, window: TimeWindow | None) -> str:
    where = f"unix_ts {seconds} ({describe_ts(ts)})"
    if window is None:
        return f"{where} is beyond the largest event time event v1 allows"
    return (
        f"{where} is outside {window}, the period the data covers; "
        "pass window=None to keep such rows"
    )


def import_taobao(
    source: Source,
    *,
    window: TimeWindow | None = TAOBAO_WINDOW,
    on_reject: RejectHandler | None = None,
    keep_rejects: int = DEFAULT_KEEP_REJECTS,
) -> ImportRun:
    """Import Taobao UserBehavior rows from a path (plain or gzip) or from lines.

    ``window`` bounds accepted event times (default :data:`TAOBAO_WINDOW`, the period the
    data set covers; ``None`` accepts any time event v1 can carry). Iterate the returned run
    for event v1 dicts; see :class:`~engine.importers.base.ImportRun`.
    """
    check_source(source)
    return ImportRun(
        "taobao",
        source_name(source),
        source_parser(source, lambda lines, stats: parse_taobao(lines, stats, window=window)),
        on_reject=on_reject,
        keep_rejects=keep_rejects,
    )
