"""What every importer shares: sources, rejects, counts, time windows and the run wrapper.

A format module supplies a *parser*: a generator that reads lines and yields
``(line_number, event_dict)`` pairs for the event v1 objects it builds (or the typed event,
when it validated it already) and :class:`Reject` records for source records it cannot use,
counting what it read in :class:`ImportStats`. :class:`ImportRun` wraps the parser: iterating
it yields the event dicts (``events()``: the typed events), while it counts what was emitted
and rejected, keeps the first rejects and hands every reject to ``on_reject``.

The accounting invariant, checked by the tests for every format::

    stats.records == stats.emitted + stats.merged + stats.rejected
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeAlias, cast

from engine.errors import EngineError
from engine.event_fields import MAX_INTEGER
from engine.events import BrowseEvent, Event, event_to_dict, parse_event

__all__ = [
    "DEFAULT_KEEP_REJECTS",
    "PLAUSIBLE_WINDOW",
    "REJECT_REASONS",
    "ImportRun",
    "ImportStats",
    "ImporterError",
    "Line",
    "Parsed",
    "Parser",
    "Reject",
    "RejectHandler",
    "Source",
    "TimeWindow",
    "UnknownFormat",
    "check_source",
    "describe_ts",
    "excerpt",
    "first_line",
    "open_lines",
    "source_name",
    "source_parser",
]

Line: TypeAlias = bytes | str
#: A path (``str`` or ``os.PathLike``; gzip is detected from the content), or the lines
#: themselves (any iterable of ``str`` or ``bytes``, with or without line ends). A plain
#: ``str`` is always a path, never content.
Source: TypeAlias = str | os.PathLike[str] | Iterable[Line]

DEFAULT_KEEP_REJECTS: Final = 100
_TEXT_LIMIT: Final = 200
_GZIP_MAGIC: Final = b"\x1f\x8b"

#: Every ``Reject.reason`` in use, with what it means. A closed set: the codes are stable
#: enough to serve as metric labels or file names; add one here when a parser needs it.
#: The event v1 JSONL reader also uses the ``InvalidEvent`` codes of ``engine.errors``.
REJECT_REASONS: Final[dict[str, str]] = {
    "not_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not a JSON document",
    "field_count": "a CSV row without exactly the expected number of fields",
    "bad_id": "an id field is empty, not a decimal integer, or too long",
    "unknown_behavior": "a behaviour / event type the format does not define",
    "bad_ts": "a timestamp that is not a non-negative integer",
    "ts_out_of_range": "a timestamp outside the accepted time window",
    "bad_session": "an OTTO line that is not {session: int, events: [...]}",
    "bad_event": "an OTTO session event that is not an object",
    "order_too_large": "an order with more distinct items than event v1 allows (500)",
    "bad_quantity": "a quantity that is not a whole number >= 1",
    "bad_price": "a price or sales value that is not a number from 0 to 1e12",
    "basket_mismatch": "a basket row whose household or time differs from the basket's first row",
}


class ImporterError(EngineError):
    """Root of the importers' own errors (bad rows are never errors: they are rejects)."""


class UnknownFormat(ImporterError):
    """The format name is not registered, or a file's format cannot be recognised."""


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """A half-open event-time window ``[start_ms, end_ms)`` in epoch milliseconds."""

    start_ms: int
    end_ms: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_ms < self.end_ms <= MAX_INTEGER + 1:
            raise ValueError(
                f"a time window needs 0 <= start_ms < end_ms <= 2**53, "
                f"got {self.start_ms}..{self.end_ms}"
            )

    def __contains__(self, ts_ms: object) -> bool:
        return type(ts_ms) is int and self.start_ms <= ts_ms < self.end_ms

    def __str__(self) -> str:
        return f"[{_iso(self.start_ms)}, {_iso(self.end_ms)})"


def _iso(ts_ms: int) -> str:
    try:
        moment = datetime.fromtimestamp(ts_ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ts_ms} ms"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


#: Timestamps a real data set can plausibly carry: 2000-01-01 to 2100-01-01 UTC. Catches
#: seconds read as milliseconds (1970) and the like; pass ``window=None`` to accept any time.
PLAUSIBLE_WINDOW: Final = TimeWindow(946_684_800_000, 4_102_444_800_000)


def describe_ts(ts_ms: int) -> str:
    """``ts_ms`` as an ISO date for messages (``"1970-01-01T00:00:15Z"``)."""
    return _iso(ts_ms)


@dataclass(frozen=True, slots=True)
class Reject:
    """One source record that produced no event, and why.

    ``line`` is the 1-based line number in the input; ``index`` is the position of the record
    inside that line when a line holds several (an OTTO session's events), else ``None``;
    ``reason`` is a code from :data:`REJECT_REASONS` (or an ``InvalidEvent`` code); ``detail``
    is a readable message; ``text`` is the start of the offending line.
    """

    line: int
    reason: str
    detail: str
    text: str = ""
    index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for a rejects file)."""
        out: dict[str, Any] = {"line": self.line, "reason": self.reason, "detail": self.detail}
        if self.index is not None:
            out["index"] = self.index
        out["text"] = self.text
        return out

    def __str__(self) -> str:
        where = f"line {self.line}" if self.index is None else f"line {self.line}[{self.index}]"
        return f"{where}: {self.reason}: {self.detail}"


def excerpt(raw: Line) -> str:
    """The start of a raw line, for :attr:`Reject.text`."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.rstrip("\r\n")
    return text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "..."


@dataclass(slots=True)
class ImportStats:
    """What an import read and produced; final once the run has been iterated to the end.

    A *record* is one unit of source data: a CSV row, a JSONL line, one event of an OTTO
    session (a line that cannot be parsed at all counts as one record). Every record is
    either emitted as an event, merged into an event emitted for another record (the other
    lines of an OTTO order), or rejected: ``records == emitted + merged + rejected``.
    """

    format: str
    source: str
    lines: int = 0
    """Physical lines read, blank ones included."""
    records: int = 0
    emitted: int = 0
    merged: int = 0
    rejected: int = 0
    records_by_kind: Counter[str] = field(default_factory=Counter)
    """Records read per source kind (``pv``/``cart``/``fav``/``buy``; ``clicks``/``carts``/
    ``orders``; ``browse``/``search``/``purchase``), rejected ones included; ``other`` when
    the kind is unreadable or unknown."""
    emitted_by_kind: Counter[str] = field(default_factory=Counter)
    """Events emitted per engine activity kind: ``view``, ``cart``, ``favorite``, ``search``,
    ``purchase`` (the names of ``engine.features.state.event_kind``)."""
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    """Lines that hold no record and are not errors: ``blank``, ``header``, ``empty_session``."""
    out_of_order: int = 0
    """Emitted events whose ``ts`` is earlier than an event emitted before them."""
    min_ts: int | None = None
    max_ts: int | None = None
    complete: bool = False
    """True once the source was read to its end."""

    @property
    def balanced(self) -> bool:
        """Every record is accounted for (``records == emitted + merged + rejected``)."""
        return self.records == self.emitted + self.merged + self.rejected

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (counters as plain dicts, keys sorted)."""
        return {
            "format": self.format,
            "source": self.source,
            "complete": self.complete,
            "lines": self.lines,
            "records": self.records,
            "emitted": self.emitted,
            "merged": self.merged,
            "rejected": self.rejected,
            "records_by_kind": dict(sorted(self.records_by_kind.items())),
            "emitted_by_kind": dict(sorted(self.emitted_by_kind.items())),
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "out_of_order": self.out_of_order,
            "min_ts": self.min_ts,
            "max_ts": self.max_ts,
        }

    def summary(self) -> str:
        """One readable paragraph for a CLI."""
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(self.emitted_by_kind.items()))
        text = (
            f"{self.format} {self.source}: {self.records:,} records read, "
            f"{self.emitted:,} events emitted ({kinds or 'none'})"
        )
        if self.merged:
            text += f", {self.merged:,} merged into other events"
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejected_by_reason.items()))
        text += f", {self.rejected:,} rejected" + (f" ({reasons})" if reasons else "")
        if self.min_ts is not None and self.max_ts is not None:
            text += f"; event time {_iso(self.min_ts)} to {_iso(self.max_ts)}"
        if self.out_of_order:
            text += f"; {self.out_of_order:,} events out of time order"
        if not self.complete:
            text += " (incomplete: the source was not read to its end)"
        return text


RejectHandler: TypeAlias = Callable[[Reject], object]
#: What a parser yields: an emitted event with the line it came from, or a reject. The event
#: is an event v1 dict, or the typed ``Event`` when the parser validated it already (JSONL):
#: then ``ImportRun.events`` hands it on as it is instead of writing and parsing it again.
Parsed: TypeAlias = tuple[int, dict[str, Any] | Event] | Reject
Parser: TypeAlias = Callable[[ImportStats], Generator[Parsed, None, None]]


class ImportRun:
    """One import of one source: iterate it (once) for event v1 dicts.

    ``stats`` is complete once the iteration has ended or the run is closed (the source-side
    counts, ``records`` and ``lines``, are added up then); ``rejects`` keeps the first
    ``keep_rejects`` rejects (all of them are counted, and all are passed to ``on_reject``,
    as they happen, when given). Use it as a context manager, or call :meth:`close`, to
    release the file when stopping early.
    """

    def __init__(
        self,
        format: str,
        source: str,
        parser: Parser,
        *,
        on_reject: RejectHandler | None = None,
        keep_rejects: int = DEFAULT_KEEP_REJECTS,
    ) -> None:
        if keep_rejects < 0:
            raise ValueError(f"keep_rejects must be >= 0, got {keep_rejects}")
        self.stats = ImportStats(format=format, source=source)
        self.rejects: list[Reject] = []
        self._items = parser(self.stats)
        self._on_reject = on_reject
        self._keep = keep_rejects
        self._active: Generator[tuple[int, dict[str, Any] | Event], None, None] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (event for _, event in self.numbered())

    def numbered(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Iterate ``(line_number, event)`` pairs: the line the event's source record is on."""
        return (
            (line, event if type(event) is dict else event_to_dict(cast(Event, event)))
            for line, event in self._start()
        )

    def events(self) -> Iterator[Event]:
        """Iterate the typed events (``parse_event`` of what ``__iter__`` yields, equal to it,
        without the round trip through a dict for a parser that yields them typed)."""
        return (
            parse_event(event) if type(event) is dict else cast(Event, event)
            for _, event in self._start()
        )

    def _start(self) -> Generator[tuple[int, dict[str, Any] | Event], None, None]:
        if self._active is not None:
            raise ImporterError("an ImportRun can be iterated once; call the importer again")
        self._active = self._run()
        return self._active

    def _run(self) -> Generator[tuple[int, dict[str, Any] | Event], None, None]:
        stats = self.stats
        by_kind = stats.emitted_by_kind
        emitted = out_of_order = 0
        low = high = -1
        try:
            for item in self._items:
                if isinstance(item, Reject):
                    self._reject(item)
                    continue
                event = item[1]
                if type(event) is dict:
                    kind, ts = event["type"], event["ts"]
                    by_kind[event["action"] if kind == "browse" else kind] += 1
                else:
                    typed = cast(Event, event)
                    kind, ts = typed.type, typed.ts
                    by_kind[typed.action if isinstance(typed, BrowseEvent) else kind] += 1
                emitted += 1
                if ts >= high:
                    high = ts
                    if low < 0:
                        low = ts
                else:
                    out_of_order += 1
                    if ts < low:
                        low = ts
                yield item
            stats.complete = True
        finally:
            self._items.close()
            stats.emitted += emitted
            stats.out_of_order += out_of_order
            if high >= 0:
                stats.min_ts = low if stats.min_ts is None else min(low, stats.min_ts)
                stats.max_ts = high if stats.max_ts is None else max(high, stats.max_ts)

    def _reject(self, reject: Reject) -> None:
        self.stats.rejected += 1
        self.stats.rejected_by_reason[reject.reason] += 1
        if len(self.rejects) < self._keep:
            self.rejects.append(reject)
        if self._on_reject is not None:
            self._on_reject(reject)

    def close(self) -> None:
        """Stop reading and close the source (safe to call more than once)."""
        if self._active is not None:
            self._active.close()
        self._items.close()

    def __enter__(self) -> ImportRun:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- sources ------------------------------------------------------------------------------------


def _is_path(source: Source) -> bool:
    return isinstance(source, str | os.PathLike)


def source_name(source: Source) -> str:
    """How a source is named in stats: the path, or ``<lines>``."""
    return os.fspath(source) if _is_path(source) else "<lines>"  # type: ignore[arg-type]


def check_source(source: Source) -> None:
    """Fail early, with a clear message, when a path source is not a readable file."""
    if _is_path(source):
        path = Path(source)  # type: ignore[arg-type]
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path} (give the path of the data file)")


def open_lines(source: Source) -> Generator[Line, None, None]:
    """Yield the lines of ``source``: a file's lines as ``bytes`` (gunzipped when the content
    is gzip, whatever the file is called), or the given lines unchanged. Closes the file when
    the iterator is exhausted or closed."""
    if not _is_path(source):
        # A plain loop, not ``yield from``: closing this iterator must not close the caller's.
        for line in source:  # type: ignore[union-attr]  # noqa: UP028
            yield line
        return
    with open(cast("str | os.PathLike[str]", source), "rb") as handle:
        if handle.peek(2)[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=handle, mode="rb") as unzipped:
                yield from unzipped
        else:
            yield from handle


def source_parser(
    source: Source, parse: Callable[[Iterable[Line], ImportStats], Iterator[Parsed]]
) -> Parser:
    """A :data:`Parser` that opens ``source`` when iteration starts and closes it at the end."""

    def run(stats: ImportStats) -> Generator[Parsed, None, None]:
        lines = open_lines(source)
        try:
            yield from parse(lines, stats)
        finally:
            lines.close()

    return run


def first_line(source: str | os.PathLike[str], limit: int = 1 << 16) -> bytes:
    """The first non-blank line of a file (gzip or plain), at most ``limit`` bytes."""
    with open(source, "rb") as handle:
        stream: Any = handle
        if handle.peek(2)[:2] == _GZIP_MAGIC:
            stream = gzip.GzipFile(fileobj=handle, mode="rb")
        with stream:
            for _ in range(1000):
                line: bytes = stream.readline(limit)
                if not line:
                    break
                if line.strip():
                    return line.strip()
    return b""
