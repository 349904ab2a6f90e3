"""OTTO sessions JSONL (otto-de/recsys-dataset) to event v1.

Each line is one session: ``{"session": int, "events": [{"aid": int, "ts": ms, "type":
"clicks"|"carts"|"orders"}, ...]}``. Clicks and carts become browse events; the ``orders``
events of one session at one ``ts`` are one checkout and become one purchase event whose items
are the ordered aids. OTTO has neither categories nor prices: every category is
:data:`UNKNOWN_CATEGORY` and every price and amount is ``0`` (unknown).

>>> line = ('{"session": 7, "events": [{"aid": 11, "ts": 1659304800000, "type": "carts"},'
...         ' {"aid": 11, "ts": 1659304900000, "type": "orders"},'
...         ' {"aid": 12, "ts": 1659304900000, "type": "orders"}]}')
>>> run = import_otto([line])
>>> [(e["event_id"], e["type"]) for e in run]
[('otto-7-1659304800000-carts-11', 'browse'), ('otto-7-1659304900000-orders', 'purchase')]
>>> run.stats.records, run.stats.emitted, run.stats.merged, run.stats.rejected
(3, 2, 1, 0)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from engine.event_fields import MAX_INTEGER, MAX_PURCHASE_ITEMS
from engine.events import SCHEMA_VERSION
from engine.importers.base import (
    DEFAULT_KEEP_REJECTS,
    PLAUSIBLE_WINDOW,
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

__all__ = ["EVENT_TYPES", "UNKNOWN_CATEGORY", "import_otto", "parse_otto"]

#: OTTO event type -> browse action (``orders`` become purchases).
EVENT_TYPES: Final[dict[str, str | None]] = {"clicks": "view", "carts": "cart", "orders": None}
#: The category of every OTTO item: the data set has none.
UNKNOWN_CATEGORY: Final = "unknown"


@dataclass(slots=True)
class _Order:
    """The ``orders`` events of one session at one ``ts``, gathered into one purchase."""

    ts: int
    quantities: dict[str, int] = field(default_factory=dict)
    indexes: list[int] = field(default_factory=list)


def parse_otto(
    lines: Iterable[Line], stats: ImportStats, *, window: TimeWindow | None = PLAUSIBLE_WINDOW
) -> Iterator[Parsed]:
    """Yield ``(line_number, event)`` for each event built and a :class:`Reject` for each
    source event (or unreadable line) that gives none. Events come out session by session, in
    the order of each session's events (a purchase where its order's first line was)."""
    by_kind = stats.records_by_kind
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                stats.skipped["blank"] += 1
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                stats.records += 1
                by_kind["other"] += 1
                yield Reject(lineno, "invalid_json", f"not UTF-8 JSON: {exc}", excerpt(raw))
                continue
            events = obj.get("events") if type(obj) is dict else None
            if type(events) is not list:
                stats.records += 1
                by_kind["other"] += 1
                detail = "expected an object with 'session' (integer) and 'events' (array)"
                yield Reject(lineno, "bad_session", detail, excerpt(raw))
                continue
            if not events:
                stats.skipped["empty_session"] += 1
                continue
            stats.records += len(events)
            yield from _session(lineno, raw, obj.get("session"), events, stats, window)
    finally:
        stats.lines += lineno


def _session(
    lineno: int,
    raw: Line,
    session: object,
    events: list[Any],
    stats: ImportStats,
    window: TimeWindow | None,
) -> Iterator[Parsed]:
    by_kind = stats.records_by_kind
    if type(session) is not int or not 0 <= session <= MAX_INTEGER:
        detail = f"'session' must be an integer from 0 to {MAX_INTEGER}, got {session!r:.40}"
        text = excerpt(raw)
        for index, event in enumerate(events):
            kind = event.get("type") if type(event) is dict else None
            by_kind[kind if type(kind) is str and kind in EVENT_TYPES else "other"] += 1
            yield Reject(lineno, "bad_session", detail, text, index)
        return
    user_id = f"otto-{session}"
    start_ms, end_ms = (window.start_ms, window.end_ms) if window else (0, MAX_INTEGER + 1)
    out: list[Parsed | _Order] = []
    orders: dict[int, _Order] = {}
    for index, event in enumerate(events):
        if type(event) is not dict:
            by_kind["other"] += 1
            detail = f"events[{index}] must be an object with aid, ts, type"
            out.append(Reject(lineno, "bad_event", detail, excerpt(raw), index))
            continue
        kind, aid, ts = event.get("type"), event.get("aid"), event.get("ts")
        if type(kind) is not str or kind not in EVENT_TYPES:
            by_kind["other"] += 1
            detail = f"events[{index}].type {kind!r:.40} is not one of clicks, carts, orders"
            out.append(Reject(lineno, "unknown_behavior", detail, excerpt(raw), index))
            continue
        by_kind[kind] += 1
        if type(aid) is not int or not 0 <= aid <= MAX_INTEGER:
            detail = f"events[{index}].aid must be an integer from 0 to {MAX_INTEGER}"
            out.append(Reject(lineno, "bad_id", detail, excerpt(raw), index))
        elif type(ts) is not int or not 0 <= ts <= MAX_INTEGER:
            detail = f"events[{index}].ts must be an integer (epoch ms), got {ts!r:.40}"
            out.append(Reject(lineno, "bad_ts", detail, excerpt(raw), index))
        elif not start_ms <= ts < end_ms:
            detail = _range_detail(index, ts, window)
            out.append(Reject(lineno, "ts_out_of_range", detail, excerpt(raw), index))
        elif (action := EVENT_TYPES[kind]) is not None:
            out.append((lineno, _browse(user_id, session, ts, kind, aid, action)))
        else:
            order = orders.get(ts)
            if order is None:
                order = orders[ts] = _Order(ts)
                out.append(order)
            item_id = str(aid)
            order.quantities[item_id] = order.quantities.get(item_id, 0) + 1
            order.indexes.append(index)
    for item in out:
        if not isinstance(item, _Order):
            yield item
        elif len(item.quantities) > MAX_PURCHASE_ITEMS:
            detail = (
                f"the order at ts {item.ts} has {len(item.quantities)} distinct aids; "
                f"event v1 allows at most {MAX_PURCHASE_ITEMS} items per purchase"
            )
            text = excerpt(raw)
            for index in item.indexes:
                yield Reject(lineno, "order_too_large", detail, text, index)
        else:
            stats.merged += len(item.indexes) - 1
            yield lineno, _purchase(user_id, session, item)


def _browse(
    user_id: str, session: int, ts: int, kind: str, aid: int, action: str
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": f"otto-{session}-{ts}-{kind}-{aid}",
        "user_id": user_id,
        "type": "browse",
        "ts": ts,
        "item_id": str(aid),
        "category": UNKNOWN_CATEGORY,
        "price": 0.0,
        "action": action,
    }


def _purchase(user_id: str, session: int, order: _Order) -> dict[str, Any]:
    order_id = f"otto-{session}-{order.ts}"
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": f"{order_id}-orders",
        "user_id": user_id,
        "type": "purchase",
        "ts": order.ts,
        "order_id": order_id,
        "items": [
            {"item_id": item_id, "category": UNKNOWN_CATEGORY, "price": 0.0, "quantity": quantity}
            for item_id, quantity in order.quantities.items()
        ],
        "amount": 0.0,
    }


def _range_detail(index: int, ts: int, window: TimeWindow | None) -> str:
    where = f"events[{index}].ts {ts} ({describe_ts(ts)})"
    if window is None:  # pragma: no cover - the bad_ts check already bounds ts
        return f"{where} is out of range"
    detail = f"{where} is outside {window}; pass window=None to keep it"
    if ts * 1000 in window:
        detail += (
            " (it looks like seconds: OTTO's own files carry milliseconds, "
            "some converted copies carry seconds)"
        )
    return detail


def import_otto(
    source: Source,
    *,
    window: TimeWindow | None = PLAUSIBLE_WINDOW,
    on_reject: RejectHandler | None = None,
    keep_rejects: int = DEFAULT_KEEP_REJECTS,
) -> ImportRun:
    """Import OTTO sessions from a JSONL path (plain or gzip) or from lines.

    ``window`` bounds accepted event times (default: years 2000 to 2100, which catches
    seconds read as milliseconds; ``None`` accepts any time event v1 can carry).
    """
    check_source(source)
    return ImportRun(
        "otto",
        source_name(source),
        source_parser(source, lambda lines, stats: parse_otto(lines, stats, window=window)),
        on_reject=on_reject,
        keep_rejects=keep_rejects,
    )
