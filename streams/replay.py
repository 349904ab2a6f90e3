"""``dealstream replay``: republish historic events to the event topics, in order, resumably.

Each event becomes one record on ``events.<type>``: key = user_id, value = the event v1 JSON,
**record timestamp = the event's ``ts``**, and a header ``dealstream.replay.source`` =
``"<source>:<line or offset>"`` saying where it came from. Records are produced without
awaiting each delivery and confirmed in batches; after each confirmed batch a checkpoint
records how far the replay got, so that an interrupted replay resumes where it stopped.

Per-user order: records of one user share a key, hence a partition, and the order within a
partition is kept (``streams.replay_sink``: batches of a partition are queued in order, aiokafka
has at most one produce request in flight per broker and retries a batch at the front of its
queue; the producer is idempotent). So a user's events arrive in the order the source yields
them.

The pieces: :func:`replay` is the loop (source -> sink, pacing, counts, checkpoint callback),
independent of Kafka for tests; :func:`run_replay` wires the CLI options, the checkpoint file,
the producer and Ctrl-C. Sources are in ``streams.replay_sources``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO

import orjson

from engine.events import MAX_INTEGER
from engine.importers import FORMATS, TimeWindow
from engine.importers.base import describe_ts
from streams.replay_checkpoint import (
    Checkpoint,
    ReplayError,
    default_checkpoint_path,
    load_checkpoint,
    write_checkpoint,
)
from streams.replay_progress import Progress, format_duration
from streams.settings import Settings, Topics

if TYPE_CHECKING:
    from streams.replay_sources import Item

__all__ = [
    "SOURCE_HEADER",
    "ReplayOptions",
    "ReplayReport",
    "ReplaySource",
    "Sink",
    "add_arguments",
    "parse_speed",
    "parse_time",
    "replay",
    "run_replay",
]

SOURCE_HEADER: Final = "dealstream.replay.source"
SKIP_RANGE: Final = "outside_range"
EXIT_INTERRUPTED: Final = 130


class Sink(Protocol):
    """Where records go (``streams.kafka_io.ProducerSink`` or a test double)."""

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
    ) -> None: ...

    async def flush(self) -> None: ...


class ReplaySource(Protocol):
    """A file or topic range (``streams.replay_sources``) or a test double."""

    name: str

    def items(self, resume: Mapping[str, int]) -> AsyncIterator[Item]: ...

    def fraction(self) -> float | None: ...

    def counts(self) -> tuple[int, int, Counter[str]]: ...

    def identity(self) -> dict[str, Any]: ...

    def reject_samples(self) -> list[str]: ...

    def close(self) -> None: ...


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
    source: ReplaySource,
    sink: Sink | None,
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


# -- the command line ---------------------------------------------------------------------------


def parse_time(text: str, flag: str = "--from") -> int:
    """Epoch ms from ``1511658000000`` (epoch ms) or ISO 8601 (``2017-11-26T01:30:00Z``;
    without a zone it is UTC)."""
    raw = text.strip()
    if raw.isdigit():
        value = int(raw)
    else:
        try:
            moment = datetime.fromisoformat(raw.replace("z", "Z"))
        except ValueError:
            raise ReplayError(
                f"{flag} {text!r} is neither an ISO 8601 time (2017-11-26T01:30:00Z) nor epoch ms"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        value = int(moment.timestamp() * 1000)
    if not 0 <= value <= MAX_INTEGER:
        raise ReplayError(f"{flag} {text!r} is outside 0..2**53 epoch ms")
    return value


def parse_speed(text: str) -> float | None:
    """``max`` -> ``None`` (as fast as possible); else a positive factor."""
    if text.strip().lower() == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ReplayError(f"--speed {text!r} must be 'max' or a positive number (1 = real time)")
    return value


def window_of(start: str | None, end: str | None) -> TimeWindow | None:
    if start is None and end is None:
        return None
    low = parse_time(start, "--from") if start is not None else 0
    high = parse_time(end, "--to") if end is not None else MAX_INTEGER + 1
    if low >= high:
        raise ReplayError(f"--from ({describe_ts(low)}) must be before --to ({describe_ts(high)})")
    return TimeWindow(low, high)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--in", dest="input", type=Path, help="data file (plain or gzip)")
    source.add_argument("--source-topic", help="replay a range of this topic instead of a file")
    parser.add_argument("--format", choices=list(FORMATS), help="input format (default: detected)")
    parser.add_argument("--speed", default="max", help="event-time factor (1 = real time) or max")
    parser.add_argument("--from", dest="start", help="first event time (ISO 8601 or epoch ms)")
    parser.add_argument("--to", dest="end", help="event time to stop before (exclusive)")
    parser.add_argument("--dry-run", action="store_true", help="read and count, send nothing")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint file (default: beside input)")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--source-from-offset", type=int, default=0, help="first offset read")
    parser.add_argument("--source-to-offset", type=int, help="offset to stop before")
    parser.add_argument(
        "--source-partition", type=int, action="append", help="partition to read (repeatable)"
    )
    parser.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: stop after N


def run_replay(settings: Settings, args: argparse.Namespace, stderr: TextIO | None = None) -> int:
    """The ``replay`` subcommand: 0 when done, 130 when interrupted (checkpoint written)."""
    err = stderr or sys.stderr
    return asyncio.run(_run(settings, args, err))


async def _run(settings: Settings, args: argparse.Namespace, err: TextIO) -> int:
    from aiokafka.errors import KafkaError

    from streams.kafka_io import check_kafka, ensure_topics
    from streams.replay_sink import BatchSink
    from streams.replay_sources import FileSource, TopicSource

    options = ReplayOptions(
        speed=parse_speed(args.speed),
        window=window_of(args.start, args.end),
        dry_run=args.dry_run,
        stop_after=getattr(args, "stop_after", None),
    )
    source: ReplaySource
    if args.input is not None:
        source = FileSource(args.input, args.format)
    else:
        if args.format not in (None, "jsonl"):
            raise ReplayError("--format applies to files; a topic's records are event v1 JSON")
        if args.source_topic in settings.topics.events:
            raise ReplayError(
                f"--source-topic {args.source_topic} is one of the topics the replay writes to; "
                "replay from another topic, or set DEALSTREAM_TOPIC_PREFIX for the destination"
            )
        if args.source_from_offset < 0 or (args.source_to_offset or 0) < 0:
            raise ReplayError("--source-from-offset and --source-to-offset must be >= 0")
        await check_kafka(settings.kafka_bootstrap)
        source = TopicSource(
            settings.kafka_bootstrap,
            args.source_topic,
            partitions=args.source_partition,
            from_offset=args.source_from_offset,
            to_offset=args.source_to_offset,
        )
    cp_path = args.checkpoint or default_checkpoint_path(args.input, args.source_topic)
    chosen = {
        "format": getattr(source, "format", None),
        "window": [options.window.start_ms, options.window.end_ms] if options.window else None,
        "topic_prefix": settings.topic_prefix,
    }
    saved = None if args.restart or options.dry_run else load_checkpoint(cp_path)
    if isinstance(source, TopicSource):
        await source.resolve(saved.identity if saved else None)
    identity = source.identity()
    resume: dict[str, int] = {}
    before = 0
    if saved is not None:
        saved.check(identity, chosen, cp_path)
        if saved.complete:
            print(
                f"replay: {cp_path} says this replay already completed ({saved.sent:,} events "
                "sent); nothing to do (--restart replays it again)",
                file=err,
            )
            return 0
        resume, before = saved.position, saved.sent
        print(
            f"replay: resuming after {saved.last or 'the start'} ({before:,} events "
            f"already sent; checkpoint {cp_path})",
            file=err,
        )
    checkpoint = Checkpoint(identity, chosen, dict(resume), before, saved.last if saved else "")

    def on_confirmed(position: dict[str, int], sent: int, last: str) -> None:
        checkpoint.position, checkpoint.sent = position, before + sent
        checkpoint.last = last or checkpoint.last
        write_checkpoint(cp_path, checkpoint)

    sink: BatchSink | None = None
    if not options.dry_run:
        await check_kafka(settings.kafka_bootstrap)
        await ensure_topics(
            settings.kafka_bootstrap, settings.topics.all, partitions=settings.partitions
        )
        write_checkpoint(cp_path, checkpoint)  # fails now, not after the first batch
        sink = BatchSink(settings.kafka_bootstrap)
        await sink.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def interrupted() -> None:
        """First signal: stop after confirming what was sent. Second: give up waiting."""
        if stop.is_set() and task is not None:
            task.cancel()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupted)
    failed = True
    try:
        report = await replay(
            source,
            sink,
            settings.topics,
            options,
            resume=resume,
            on_confirmed=None if options.dry_run else on_confirmed,
            stop=stop,
            progress=Progress(err, verb="counted" if options.dry_run else "sent"),
        )
        failed = False
    except asyncio.CancelledError:
        print(
            f"replay: aborted by a second interrupt before the last batch was confirmed; "
            f"{checkpoint.sent:,} events are confirmed in {cp_path}; run the same command "
            "again to resume (the unconfirmed batch may be sent twice)",
            file=err,
        )
        return EXIT_INTERRUPTED
    except KafkaError as exc:
        raise ReplayError(
            f"Kafka failed during the replay ({type(exc).__name__}: {exc}); {checkpoint.sent:,} "
            f"events are confirmed in {cp_path}: run the same command again to resume"
        ) from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if sink is not None:
            await sink.stop(flush=not failed)
    print(report.summary(), file=err)
    for sample in source.reject_samples():
        print(f"  reject {sample}", file=err)
    if options.dry_run:
        return 0
    if report.interrupted:
        print(
            f"replay: interrupted; {checkpoint.sent:,} events delivered in all, checkpoint "
            f"{cp_path}; run the same command again to resume (--restart to start over)",
            file=err,
        )
        return EXIT_INTERRUPTED
    checkpoint.complete = True
    write_checkpoint(cp_path, checkpoint)
    return 0
