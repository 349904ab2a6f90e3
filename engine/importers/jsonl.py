"""Event v1 JSONL (what ``dealstream simulate --out`` writes): one event object per line.

Each line is validated with :func:`engine.events.parse_event`; valid events are emitted in
their canonical form (:func:`engine.events.event_to_dict`: ``schema_version`` set, unknown
extra fields dropped; typed, as parsed, to ``ImportRun.events``), invalid ones are rejected
with the ``InvalidEvent`` code as reason.

>>> run = import_jsonl(['{"event_id": "e1", "user_id": "u1", "type": "search", "ts": 5, '
...                     '"query": "tea"}', '{"event_id": "e2"}'])
>>> [e["event_id"] for e in run], [(r.line, r.reason) for r in run.rejects]
(['e1'], [(2, 'missing_field')])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import orjson

from engine.errors import InvalidEvent
from engine.events import EVENT_TYPES, parse_event
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

__all__ = ["import_jsonl", "parse_jsonl"]


def parse_jsonl(
    lines: Iterable[Line], stats: ImportStats, *, window: TimeWindow | None = None
) -> Iterator[Parsed]:
    """Yield ``(line_number, canonical_event)`` per valid line, a :class:`Reject` per other."""
    by_kind = stats.records_by_kind
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                stats.skipped["blank"] += 1
                continue
            stats.records += 1
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                by_kind["other"] += 1
                yield Reject(lineno, "invalid_json", f"not UTF-8 JSON: {exc}", excerpt(raw))
                continue
            kind = obj.get("type") if type(obj) is dict else None
            by_kind[kind if type(kind) is str and kind in EVENT_TYPES else "other"] += 1
            try:
                event = parse_event(obj)
            except InvalidEvent as exc:
                yield Reject(lineno, exc.code, exc.message, excerpt(raw))
                continue
            if window is not None and event.ts not in window:
                detail = f"ts {event.ts} ({describe_ts(event.ts)}) is outside {window}"
                yield Reject(lineno, "ts_out_of_range", detail, excerpt(raw))
                continue
            yield lineno, event
    finally:
        stats.lines += lineno


def import_jsonl(
    source: Source,
    *,
    window: TimeWindow | None = None,
    on_reject: RejectHandler | None = None,
    keep_rejects: int = DEFAULT_KEEP_REJECTS,
) -> ImportRun:
    """Import event v1 JSONL from a path (plain or gzip) or from lines.

    Every event time event v1 allows is accepted unless ``window`` narrows it.
    """
    check_source(source)
    return ImportRun(
        "jsonl",
        source_name(source),
        source_parser(source, lambda lines, stats: parse_jsonl(lines, stats, window=window)),
        on_reject=on_reject,
        keep_rejects=keep_rejects,
    )
