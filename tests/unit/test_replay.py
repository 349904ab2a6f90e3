"""``dealstream replay`` without Kafka: the loop, pacing, accounting, resume, checkpoints, CLI.

The loop (:func:`streams.replay.republish.replay`) runs against a list sink and a fake clock;
the file source is real (temporary files). Kafka itself is in tests/integration/test_replay*.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.analysis.simulation.world import open_loop
from engine.importers.base import TimeWindow
from engine.importers.jsonl import import_jsonl
from engine.ports import SourceItem
from streams.cli.main import main
from streams.cli.replay import parse_speed, parse_time, window_of
from streams.replay.checkpoint import (
    Checkpoint,
    CheckpointMismatch,
    ReplayError,
    default_checkpoint_path,
    load_checkpoint,
    write_checkpoint,
)
from streams.replay.progress import Progress, format_duration
from streams.replay.republish import SOURCE_HEADER, ReplayOptions, ReplayReport, replay
from streams.replay.sources import FileSource
from streams.settings import Settings, Topics
from tests.sinks import ListSink

TOPICS = Topics("p.")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


class ListSource:
    """Events given as a list; the mark is ``("events", n)`` like a file's."""

    name = "list"

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.read = 0

    async def items(self, resume: Mapping[str, int]) -> AsyncIterator[SourceItem]:
        done = resume.get("events", 0)
        for n, event in enumerate(self.events, 1):
            self.read += 1
            yield SourceItem(
                event, f"list:{n}", ("events", n), "before_resume" if n <= done else None
            )

    def fraction(self) -> float | None:
        return self.read / len(self.events) if self.events else None

    def counts(self) -> tuple[int, int, Counter[str]]:
        return self.read, 0, Counter()

    def identity(self) -> dict[str, Any]:
        return {"kind": "list"}

    def reject_samples(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def events(count: int = 300, seed: int = 3) -> list[dict[str, Any]]:
    return [dict(e) for e in open_loop(users=20, events=count, seed=seed)]


def write_jsonl(path: Path, rows: list[dict[str, Any]], extra: Sequence[bytes] = ()) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows) + b"".join(extra))
    return path


# -- the loop -------------------------------------------------------------------------------------


async def test_each_event_becomes_one_record_keyed_by_user_with_event_time_and_source() -> None:
    given = events()
    sink = ListSink()
    report = await replay(ListSource(given), sink, TOPICS, ReplayOptions())
    assert report.sent == len(given) == len(sink.records) == sink.delivered
    assert report.balanced and not report.interrupted
    for event, (topic, key, value, headers, ts) in zip(given, sink.records, strict=True):
        assert topic == f"p.events.{event['type']}"
        assert key == str(event["user_id"]).encode()
        assert orjson.loads(value) == event
        assert ts == event["ts"]
        assert headers == [(SOURCE_HEADER, f"list:{given.index(event) + 1}".encode())]
    assert sum(report.by_topic.values()) == report.sent
    assert set(report.by_topic) <= set(TOPICS.events)
    assert report.min_ts == min(e["ts"] for e in given)
    assert report.max_ts == max(e["ts"] for e in given)


async def test_dry_run_counts_without_a_sink() -> None:
    given = events()
    report = await replay(ListSource(given), None, TOPICS, ReplayOptions(dry_run=True))
    assert report.dry_run and report.sent == len(given)
    kinds = Counter(e.get("action", e["type"]) for e in given)
    assert report.by_type == kinds
    assert "would send" in report.summary()


async def test_time_window_skips_events_outside_and_accounts_for_them() -> None:
    given = events()
    times = sorted(e["ts"] for e in given)
    window = TimeWindow(times[50], times[200])
    sink = ListSink()
    report = await replay(ListSource(given), sink, TOPICS, ReplayOptions(window=window))
    inside = [e for e in given if window.start_ms <= e["ts"] < window.end_ms]
    assert [orjson.loads(r[2]) for r in sink.records] == inside
    assert report.skipped == Counter({"outside_range": len(given) - len(inside)})
    assert report.read == report.sent + report.total_skipped and report.balanced


async def test_speed_paces_by_event_time() -> None:
    base = events(3)
    for n, event in enumerate(base):
        event["ts"] = 1_000_000 + n * 60_000  # one minute apart
    clock = FakeClock()
    options = ReplayOptions(speed=60.0)  # one minute of event time per second
    await replay(ListSource(base), ListSink(), TOPICS, options, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == [1.0, 1.0]
    clock = FakeClock()
    await replay(
        ListSource(base), ListSink(), TOPICS, ReplayOptions(), clock=clock, sleep=clock.sleep
    )
    assert clock.sleeps == []


async def test_paced_replay_confirms_before_a_long_wait() -> None:
    base = events(2)
    base[1]["ts"] = base[0]["ts"] + 3_600_000
    clock = FakeClock()
    sink = ListSink()
    confirmed: list[int] = []
    await replay(
        ListSource(base),
        sink,
        TOPICS,
        ReplayOptions(speed=1.0),
        on_confirmed=lambda pos, sent, last: confirmed.append(sent),
        clock=clock,
        sleep=clock.sleep,
    )
    assert clock.sleeps == [3600.0]
    assert confirmed[0] == 1, "the first event is confirmed before waiting an hour"


async def test_stop_after_confirms_what_was_sent_and_resume_sends_the_rest_once() -> None:
    given = events()
    sink = ListSink()
    positions: list[dict[str, int]] = []
    options = ReplayOptions(batch_size=40, stop_after=123)
    first = await replay(
        ListSource(given),
        sink,
        TOPICS,
        options,
        on_confirmed=lambda pos, sent, last: positions.append(pos),
    )
    assert first.interrupted and first.sent == 123 == sink.delivered
    assert positions[-1] == {"events": 123}
    assert [p["events"] for p in positions[:3]] == [40, 80, 120]
    second = await replay(
        ListSource(given), sink, TOPICS, ReplayOptions(batch_size=40), resume=positions[-1]
    )
    assert not second.interrupted and second.sent == len(given) - 123
    assert second.skipped == Counter({"before_resume": 123}) and second.balanced
    ids = [orjson.loads(r[2])["event_id"] for r in sink.records]
    assert ids == [e["event_id"] for e in given], "every event once, in order"


async def test_a_stop_request_ends_the_run_with_everything_sent_confirmed() -> None:
    given = events()
    sink = ListSink()
    stop = asyncio.Event()

    def confirmed(pos: dict[str, int], sent: int, last: str) -> None:
        if sent >= 50:
            stop.set()

    report = await replay(
        ListSource(given),
        sink,
        TOPICS,
        ReplayOptions(batch_size=25),
        stop=stop,
        on_confirmed=confirmed,
    )
    assert report.interrupted and report.sent == 50 == sink.delivered
    assert report.pending == 1, "the item read when the stop was seen is not sent"


# -- a real file: accounting --------------------------------------------------------------------


async def test_file_replay_accounts_for_every_line(tmp_path: Path) -> None:
    given = events(200)
    bad = [b'{"event_id": "x"}\n', b"not json\n", b"\n"]
    path = write_jsonl(tmp_path / "in.jsonl", given, bad)
    window = TimeWindow(given[20]["ts"], given[150]["ts"])
    sink = ListSink()
    report = await replay(FileSource(path), sink, TOPICS, ReplayOptions(window=window))
    data_lines = len(given) + 2  # the blank line holds no record
    assert report.read == data_lines
    assert report.rejected == Counter({"missing_field": 1, "invalid_json": 1})
    assert report.read == report.sent + report.merged + report.total_rejected + report.total_skipped
    assert report.sent == sum(1 for e in given if e["ts"] in window)
    assert report.sent == len(sink.records)
    first_line = 1 + next(n for n, e in enumerate(given) if e["ts"] in window)
    assert sink.records[0][3] == [(SOURCE_HEADER, f"in.jsonl:{first_line}".encode())]


async def test_file_resume_skips_exactly_the_confirmed_events(tmp_path: Path) -> None:
    given = events(250)
    path = write_jsonl(tmp_path / "in.jsonl", given, [b"{broken\n"])
    sink = ListSink()
    last: list[dict[str, int]] = []
    first = await replay(
        FileSource(path),
        sink,
        TOPICS,
        ReplayOptions(batch_size=30, stop_after=100),
        on_confirmed=lambda pos, sent, where: last.append(pos),
    )
    assert first.interrupted and last[-1] == {"events": 100}
    second = await replay(FileSource(path), sink, TOPICS, ReplayOptions(), resume=last[-1])
    assert second.skipped["before_resume"] == 100 and second.sent == 150
    assert second.balanced and second.total_rejected == 1
    assert [orjson.loads(r[2]) for r in sink.records] == list(import_jsonl(path))


async def test_gzip_file_progress_fraction_reaches_one(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in events(100))))
    source = FileSource(path)
    assert source.format == "jsonl" and source.fraction() is None
    fractions = []
    async for _ in source.items({}):
        fractions.append(source.fraction())
    assert fractions[-1] == 1.0 and all(f is not None and 0 < f <= 1 for f in fractions)


def test_file_source_errors_are_replay_errors(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no such file"):
        FileSource(tmp_path / "absent.csv")
    odd = tmp_path / "odd.txt"
    odd.write_text("a;b;c\n")
    with pytest.raises(ReplayError, match=r"fits none of.*--format"):
        FileSource(odd)


# -- options --------------------------------------------------------------------------------------


def test_times_are_iso_or_epoch_ms() -> None:
    assert parse_time("1511658000000") == 1_511_658_000_000
    assert parse_time("2017-11-26T01:00:00Z") == 1_511_658_000_000
    assert parse_time("2017-11-26T01:00:00") == 1_511_658_000_000  # no zone: UTC
    assert parse_time("2017-11-26T09:00:00+08:00") == 1_511_658_000_000
    with pytest.raises(ReplayError, match="--to 'yesterday' is neither"):
        parse_time("yesterday", "--to")
    assert window_of(None, None) is None
    assert window_of("2017-11-26", None) == TimeWindow(1_511_654_400_000, 2**53)
    with pytest.raises(ReplayError, match="must be before"):
        window_of("2017-11-27", "2017-11-26")


def test_speed_is_max_or_a_positive_factor() -> None:
    assert parse_speed("max") is None and parse_speed("MAX") is None
    assert parse_speed("60") == 60.0 and parse_speed("0.5") == 0.5
    for bad in ("0", "-1", "fast", "inf", "nan"):
        with pytest.raises(ReplayError, match="--speed"):
            parse_speed(bad)


def test_report_summary_says_what_happened() -> None:
    report = ReplayReport("x.csv", read=10, sent=6, merged=1)
    report.rejected["bad_ts"] = 1
    report.skipped["outside_range"] = 1
    assert report.pending == 1 and not report.balanced
    text = report.summary()
    for part in ("read 10", "sent 6", "merged 1", "rejected 1 (bad_ts 1)", "pending 1"):
        assert part in text


# -- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    assert load_checkpoint(path) is None
    cp = Checkpoint({"kind": "file", "size": 3}, {"format": "jsonl"}, {"events": 7}, 7, "f:9")
    write_checkpoint(path, cp)
    assert load_checkpoint(path) == cp
    assert not (tmp_path / "cp.json.tmp").exists()
    cp.check({"kind": "file", "size": 3}, {"format": "jsonl"}, path)
    with pytest.raises(CheckpointMismatch, match=r"input size: checkpoint 3, now 4.*--restart"):
        cp.check({"kind": "file", "size": 4}, {"format": "jsonl"}, path)
    with pytest.raises(CheckpointMismatch, match="option format"):
        cp.check({"kind": "file", "size": 3}, {"format": "taobao"}, path)
    path.write_text("{}")
    with pytest.raises(ReplayError, match="not a replay checkpoint"):
        load_checkpoint(path)


def test_default_checkpoint_paths_are_in_the_state_folder_never_beside_the_input(
    tmp_path: Path,
) -> None:
    state = Settings().state_dir
    here = default_checkpoint_path(state, tmp_path / "x.csv.gz")
    there = default_checkpoint_path(state, tmp_path / "other" / "x.csv.gz")
    assert here.parent == Path(".dealstream/replay") and here.name.startswith("x.csv.gz.")
    assert here != there, "two inputs of the same name need two checkpoints"
    assert default_checkpoint_path(state, None, "events.dlq") == Path(
        ".dealstream/replay/topic-events.dlq.json"
    )


# -- progress ------------------------------------------------------------------------------------


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    out = io.StringIO()
    clock = FakeClock()
    progress = Progress(out, tty=True, clock=clock)
    progress.update(10, 1_511_658_000_000, 0.1)  # within the interval: nothing yet
    assert out.getvalue() == ""
    clock.now += 10
    progress.update(1000, 1_511_658_000_000, 0.5)
    text = out.getvalue()
    assert text.startswith("\r") and "\n" not in text
    assert "1,000 sent" in text and "100/s" in text and "2017-11-26T01:00:00Z" in text
    assert "50% read" in text and "ETA 0:12" in text  # 0.4 of the input in 10 s, 0.5 left
    progress.finish()
    assert out.getvalue().endswith("\r")


def test_progress_into_a_log_writes_whole_lines_every_few_seconds() -> None:
    out = io.StringIO()
    clock = FakeClock()
    progress = Progress(out, tty=False, clock=clock)
    for _ in range(20):
        clock.now += 1
        progress.update(5, None, None)
    assert progress.lines_written == 4 and out.getvalue().count("\n") == 4
    assert "\r" not in out.getvalue() and "ETA" not in out.getvalue()


def test_format_duration() -> None:
    assert format_duration(42) == "0:42"
    assert format_duration(3725) == "1:02:05"


# -- the command line (no Kafka needed) -----------------------------------------------------------


@pytest.fixture
def no_kafka(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("DEALSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DEALSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("DEALSTREAM_STATE", str(tmp_path / "state"))


@pytest.mark.usefixtures("no_kafka")
def test_cli_dry_run_counts_and_sends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", events(100), [b"oops\n"])
    assert main(["replay", "--in", str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "read 101, would send 100" in err and "rejected 1 (invalid_json 1)" in err
    assert "events.browse" in err and "event time" in err
    assert not default_checkpoint_path(tmp_path / "state", path).exists()


@pytest.mark.usefixtures("no_kafka")
@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--in", "/nonexistent.csv"], "no such file"),
        (["--in", "{file}", "--speed", "fast"], "--speed 'fast'"),
        (["--in", "{file}", "--from", "soon"], "--from 'soon' is neither"),
        (["--in", "{file}", "--from", "2020-01-02", "--to", "2020-01-01"], "must be before"),
        (["--source-topic", "p.events.browse"], "cannot reach Kafka"),
        (["--in", "{file}", "--source-partition", "1"], "apply to --source-topic"),
        (["--in", "{file}"], "cannot reach Kafka"),
    ],
)
def test_cli_bad_input_gives_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", events(10))
    argv = ["replay", *(a.replace("{file}", str(path)) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dealstream: ") and fragment in err, err


@pytest.mark.usefixtures("no_kafka")
def test_cli_refuses_to_replay_an_event_topic_into_itself(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEALSTREAM_TOPIC_PREFIX", "p.")
    assert main(["replay", "--source-topic", "p.events.browse"]) == 2
    assert "one of the topics the replay writes to" in capsys.readouterr().err


@pytest.mark.usefixtures("no_kafka")
def test_cli_checkpoint_of_another_input_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", events(10))
    cp = Checkpoint({"kind": "file", "path": "/elsewhere"}, {}, {"events": 3}, 3)
    write_checkpoint(default_checkpoint_path(tmp_path / "state", path), cp)
    assert main(["replay", "--in", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is for another replay" in err and "--restart" in err


@pytest.mark.usefixtures("no_kafka")
def test_cli_a_completed_replay_is_not_sent_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", events(10))
    source = FileSource(path)
    options = {"format": "jsonl", "window": None, "topic_prefix": ""}
    cp = Checkpoint(source.identity(), options, {"events": 10}, 10, "in.jsonl:10", complete=True)
    write_checkpoint(default_checkpoint_path(tmp_path / "state", path), cp)
    assert main(["replay", "--in", str(path)]) == 0
    assert "already completed (10 events sent); nothing to do" in capsys.readouterr().err


def test_cli_lists_replay() -> None:
    from streams.cli.main import build_parser

    help_text = build_parser().format_help()
    assert "replay" in help_text
    assert isinstance(build_parser().parse_args(["replay", "--in", "x"]), argparse.Namespace)


class FailingSink(ListSink):
    """Delivers the first ``good`` flushes, then fails like a delivery timeout."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    async def flush(self) -> None:
        if self.flushes >= self.good:
            raise ConnectionError("delivery timed out")
        await super().flush()


async def test_a_failed_delivery_never_reaches_the_checkpoint() -> None:
    confirmed: list[int] = []
    sink = FailingSink(good=2)
    with pytest.raises(ConnectionError):
        await replay(
            ListSource(events()),
            sink,
            TOPICS,
            ReplayOptions(batch_size=50),
            on_confirmed=lambda pos, sent, last: confirmed.append(pos["events"]),
        )
    assert confirmed == [50, 100], "only the confirmed batches are checkpointed"
    assert sink.delivered == 100 and len(sink.records) == 150


@pytest.mark.usefixtures("no_kafka")
def test_cli_unwritable_checkpoint_is_a_clear_error_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def kafka_answers(*_: object, **__: object) -> list[str]:
        return []

    monkeypatch.setattr("streams.adapters.kafka_io.check_kafka", kafka_answers)
    monkeypatch.setattr("streams.adapters.kafka_io.ensure_topics", kafka_answers)
    path = write_jsonl(tmp_path / "in.jsonl", events(10))
    target = path / "cp.json"  # below a file: no folder can be made there
    assert main(["replay", "--in", str(path), "--checkpoint", str(target)]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint" in err and str(target) in err and err.count("\n") == 1
