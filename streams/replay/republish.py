"""``dealstream replay``: republish historic events to the event topics, in order, resumably.

Each event becomes one record on ``events.<type>``: key = user_id, value = the event v1 JSON,
**record timestamp = the event's ``ts``**, and a header ``dealstream.replay.source`` =
``"<source>:<line or offset>"`` saying where it came from. Records are produced without
awaiting each delivery and confirmed in batches; after each confirmed batch a checkpoint
records how far the replay got, so that an interrupted replay resumes where it stopped.

Per-user order: records of one user share a key, hence a partition, and the order within a
partition is kept (``streams.adapters.sinks.BatchSink``: batches of a partition are queued in
order, aiokafka has at most one produce request in flight per broker and retries a batch at the
front of its queue; the producer is idempotent). So a user's events arrive in the order the
source yields them.

The pieces: :func:`replay` is the loop (source -> sink, pacing, counts, checkpoint callback),
independent of Kafka for tests; :func:`streams.cli.replay.run_replay` wires the CLI options, the
checkpoint file, the producer and Ctrl-C. Sources are in ``streams.replay.sources``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from engine.event_fields import MAX_INTEGER
from engine.importers.base import TimeWindow, describe_ts
from engine.ports import RecordSink, RecordSource
from streams.replay.progress import Progress, format_duration
from streams.settings import Topics

__all__ = [
    "EXIT_INTERRUPTED",
    "SOURCE_HEADER",
    "ReplayOptions",
    "ReplayReport",
    "replay",
]

SOURCE_HEADER: Final = "dealstream.replay.source"
SKIP_RANGE: Final = "outside_range"
EXIT_INTERRUPTED: Final = 130


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    speed: float | None = None
    """Event-time pacing factor (1 = real time, 60 = an hour per minute); ``None`` = max."""
    window: TimeWindow | None = None
    """Only events with ``ts`` in ``[start, end)`` are sent (``--from``/``--to``)."""
    dry_run: bool = False
    batch_size: int = 5000
    """Records sent between two confirmations (and checkpoints)."""
    confirm_every_s: float = 1.0
    """In paced replays, confirm at least this often (keeps the checkpoint fresh)."""
    stop_after: int | None = None
    """Stop as if interrupted once this many events were sent in this run (tests, trials)."""


@dataclass(slots=True)
class ReplayReport:
    """What one run did. ``read == sent + merged + rejected + skipped + pending``; ``pending``
    (read but neither sent nor skipped) is 0 unless the run was interrupted."""

    source: str
    read: int = 0
    sent: int = 0
    merged: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    by_topic: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    min_ts: int | None = None
    max_ts: int | None = None
    interrupted: bool = False
    dry_run: bool = False
    elapsed_s: float = 0.0
    resumed_from: str = ""
    reject_samples: list[str] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.read - self.sent - self.merged - self.total_rejected - self.total_skipped

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def balanced(self) -> bool:
        return self.pending == 0

    def summary(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        rate = self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0
        text = (
            f"replay {self.source}: read {self.read:,}, {verb} {self.sent:,}"
            f", merged {self.merged:,}, rejected {self.total_rejected:,}"
            + _detail(self.rejected)
            + f", skipped {self.total_skipped:,}"
            + _detail(self.skipped)
        )
        if self.pending:
            text += f", pending {self.pending:,} (read ahead, not sent: sent on resume)"
        text += f" in {format_duration(self.elapsed_s)} ({rate:,.0f} events/s)"
        if self.by_topic:
            text += "; topics: " + ", ".join(f"{t} {n:,}" for t, n in sorted(self.by_topic.items()))
        if self.by_type:
            text += "; types: " + ", ".join(f"{t} {n:,}" for t, n in sorted(self.by_type.items()))
        if self.min_ts is not None and self.max_ts is not None:
            text += f"; event time {describe_ts(self.min_ts)} to {describe_ts(self.max_ts)}"
        return text


def _detail(counts: Counter[str]) -> str:
    return f" ({', '.join(f'{k} {v:,}' for k, v in sorted(counts.items()))})" if counts else ""


Confirmed = Callable[[dict[str, int], int, str], Awaitable[None] | None]
"""Called after each confirmed batch with the position, the events sent so far in this run,
and the source position of the last record done."""


async def replay(
    source: RecordSource,
    sink: RecordSink | None,
    topics: Topics,
    options: ReplayOptions,
    *,
    resume: Mapping[str, int] | None = None,
    on_confirmed: Confirmed | None = None,
    stop: asyncio.Event | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> ReplayReport:
    """Send ``source``'s events to ``sink`` (``None`` for a dry run) and report the counts.

    Stops early, as if interrupted, when ``stop`` is set or ``options.stop_after`` events
    were sent; what was sent is confirmed (flushed) and reported through ``on_confirmed``
    before it returns, in every case.
    """
    report = ReplayReport(source.name, dry_run=options.dry_run or sink is None)
    topic_of = {"browse": topics.browse, "search": topics.search, "purchase": topics.purchase}
    window, speed = options.window, options.speed
    position: dict[str, int] = dict(resume or {})
    stop = stop or asyncio.Event()
    started = clock()
    last_confirm, unconfirmed, last_where = started, 0, ""
    pace_origin: tuple[float, int] | None = None  # (wall clock, event time) of the first sent
    by_topic, by_type, skipped = report.by_topic, report.by_type, report.skipped
    sent = 0
    low, high = MAX_INTEGER + 1, -1

    async def confirm() -> None:
        nonlocal last_confirm, unconfirmed
        if sink is not None:
            await sink.flush()
        last_confirm, unconfirmed = clock(), 0
        if on_confirmed is not None:
            result = on_confirmed(dict(position), sent, last_where)
            if result is not None:
                await result

    items = source.items(position)
    try:
        async for item in items:
            if stop.is_set() or (options.stop_after is not None and sent >= options.stop_after):
                report.interrupted = True
                break
            key, value = item.mark
            event = item.event
            if item.skip is not None or event is None:
                if item.skip is not None:
                    skipped[item.skip] += 1
                position[key], last_where = value, item.where
                continue
            ts: int = event["ts"]
            if window is not None and ts not in window:
                skipped[SKIP_RANGE] += 1
                position[key], last_where = value, item.where
                continue
            kind: str = event["type"]
            topic = topic_of[kind]
            if speed is not None:
                if pace_origin is None:
                    pace_origin = (clock(), ts)
                delay = pace_origin[0] + (ts - pace_origin[1]) / 1000.0 / speed - clock()
                if delay > 0:
                    if unconfirmed and (delay >= 0.5 or clock() - last_confirm >= 1.0):
                        await confirm()
                    await _wait(stop, delay, sleep)
                    if stop.is_set():
                        report.interrupted = True
                        break
            if sink is not None:
                await sink.send(
                    topic,
                    event["user_id"].encode(),
                    orjson.dumps(event),
                    [(SOURCE_HEADER, item.where.encode())],
                    ts,
                )
            sent += 1
            unconfirmed += 1
            by_topic[topic] += 1
            by_type[event.get("action", kind) if kind == "browse" else kind] += 1
            low, high = min(low, ts), max(high, ts)
            position[key], last_where = value, item.where
            if unconfirmed >= options.batch_size or (
                speed is not None and clock() - last_confirm >= options.confirm_every_s
            ):
                await confirm()
            if progress is not None and not sent & 255:
                progress.update(sent, ts, source.fraction())
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
        source.close()
    await confirm()
    report.sent = sent
    if high >= 0:
        report.min_ts, report.max_ts = low, high
    report.read, report.merged, report.rejected = source.counts()
    report.elapsed_s = clock() - started
    if progress is not None:
        progress.update(sent, high if high >= 0 else None, source.fraction(), force=True)
        progress.finish()
    return report


async def _wait(
    stop: asyncio.Event, delay: float, sleep: Callable[[float], Awaitable[Any]]
) -> None:
    """Sleep ``delay`` seconds, or less when ``stop`` is set meanwhile."""
    if sleep is not asyncio.sleep:
        await sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
