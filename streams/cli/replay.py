"""The command line of ``dealstream replay``: options, checkpoint file, producer, Ctrl-C.

:func:`run_replay` reads the options, refuses bad ones with one line (exit 2), loads and checks
the checkpoint, creates the topics and the producer, installs the SIGINT/SIGTERM handlers
(first signal: stop after confirming what was sent; second: stop waiting) and runs
:func:`streams.replay.republish.replay`. See ``docs/replay.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from engine.event_fields import MAX_INTEGER
from engine.importers import FORMATS
from engine.importers.base import TimeWindow, describe_ts
from engine.ports import RecordSource
from streams.cli import Subparsers
from streams.replay.checkpoint import (
    Checkpoint,
    ReplayError,
    default_checkpoint_path,
    load_checkpoint,
    write_checkpoint,
)
from streams.replay.progress import Progress
from streams.replay.republish import EXIT_INTERRUPTED, ReplayOptions, replay
from streams.settings import Settings

__all__ = ["add_arguments", "add_parser", "parse_speed", "parse_time", "run_replay", "window_of"]


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


def add_parser(subparsers: Subparsers) -> None:
    replay_parser = subparsers.add_parser(
        "replay", help="republish historic events (a data file or a topic range), resumably"
    )
    add_arguments(replay_parser)
    replay_parser.set_defaults(handler=run_replay)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--in", dest="input", type=Path, help="data file (plain or gzip)")
    source.add_argument("--source-topic", help="replay a range of this topic instead of a file")
    parser.add_argument("--format", choices=list(FORMATS), help="input format (default: detected)")
    parser.add_argument("--speed", default="max", help="event-time factor (1 = real time) or max")
    parser.add_argument("--from", dest="start", help="first event time (ISO 8601 or epoch ms)")
    parser.add_argument("--to", dest="end", help="event time to stop before (exclusive)")
    parser.add_argument("--dry-run", action="store_true", help="read and count, send nothing")
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint file (default: under .dealstream/replay)"
    )
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

    from streams.adapters.kafka_io import check_kafka, ensure_topics
    from streams.adapters.sinks import BatchSink
    from streams.replay.sources import FileSource, TopicSource

    options = ReplayOptions(
        speed=parse_speed(args.speed),
        window=window_of(args.start, args.end),
        dry_run=args.dry_run,
        stop_after=getattr(args, "stop_after", None),
    )
    source: RecordSource
    if args.input is not None:
        if args.source_from_offset or args.source_to_offset is not None or args.source_partition:
            raise ReplayError("--source-* options apply to --source-topic, not to --in")
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
        await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
        source = TopicSource(
            settings.kafka_bootstrap,
            args.source_topic,
            security=settings.kafka_security,
            partitions=args.source_partition,
            from_offset=args.source_from_offset,
            to_offset=args.source_to_offset,
        )
    cp_path = args.checkpoint or default_checkpoint_path(
        settings.state_dir, args.input, args.source_topic
    )
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
        await check_kafka(settings.kafka_bootstrap, security=settings.kafka_security)
        await ensure_topics(
            settings.kafka_bootstrap,
            settings.topics.all,
            partitions=settings.partitions,
            replication=settings.replication,
            security=settings.kafka_security,
        )
        write_checkpoint(cp_path, checkpoint)  # fails now, not after the first batch
        sink = BatchSink(settings.kafka_bootstrap, security=settings.kafka_security)
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
