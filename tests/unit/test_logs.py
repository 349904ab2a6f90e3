"""Structured JSON logs: fields, ids, privacy of user ids, dead-letter rate limiting."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from streams.adapters.decode import DeadLetter, RawRecord
from streams.errors import ConfigError
from streams.operations.logs import (
    DeadLetterLog,
    configure_logging,
    escape_text,
    event_id_of,
    log_outputs,
    user_ref,
)
from streams.settings import Settings
from tests.records import sample_decision, sample_offer
from tests.unit.test_streams_pure import make_worker, mixed_batch

SALT = b"0123456789abcdef"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Route logging into a buffer for one test, then restore the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_json_line_has_time_level_logger_message_and_the_known_context_only(
    captured: io.StringIO,
) -> None:
    configure_logging("INFO", "json", salt=SALT, stream=captured)
    logging.getLogger("dealstream.test").warning(
        "offer %s", "issued", extra={"offer_id": "o-1", "event_id": "e-1", "secret": "x"}
    )
    (entry,) = lines(captured)
    assert entry["msg"] == "offer issued"
    assert entry["level"] == "WARNING" and entry["logger"] == "dealstream.test"
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert (entry["offer_id"], entry["event_id"]) == ("o-1", "e-1")
    assert "secret" not in entry


def test_user_ids_are_pseudonymous_unless_debug_logging_is_asked_for(
    captured: io.StringIO,
) -> None:
    configure_logging("INFO", "json", salt=SALT, stream=captured)
    logging.getLogger("dealstream.test").warning("x", extra={"user_id": "alice@example.com"})
    configure_logging("DEBUG", "json", salt=SALT, stream=captured)
    logging.getLogger("dealstream.test").warning("x", extra={"user_id": "alice@example.com"})
    info, debug = lines(captured)
    assert "alice" not in json.dumps(info)
    assert info["user_ref"] == user_ref("alice@example.com", SALT)
    assert info["user_ref"] != user_ref("alice@example.com", b"another salt....")
    assert debug["user_id"] == "alice@example.com"


def test_text_format_appends_context_and_hides_user_ids(captured: io.StringIO) -> None:
    configure_logging("INFO", "text", salt=SALT, stream=captured)
    logging.getLogger("dealstream.test").info("hello", extra={"event_id": "e-9", "user_id": "bob"})
    text = captured.getvalue()
    assert "hello" in text and "event_id=e-9" in text
    assert "bob" not in text and f"user_ref={user_ref('bob', SALT)}" in text


def test_exceptions_are_inside_the_json_line(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", salt=SALT, stream=captured)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("dealstream.test").exception("failed")
    (entry,) = lines(captured)
    assert "RuntimeError: boom" in entry["exc"]


def test_offers_and_decisions_are_logged_with_their_ids_at_debug_only(
    captured: io.StringIO,
) -> None:
    logger = logging.getLogger("dealstream.test.outputs")
    offer = sample_offer(offer_id="o-1", trigger_event_id="e-1", campaign="c", user_id="u")
    decision = sample_decision(decision_id="d-1", offer_id="o-1", trigger_event_id="e-1")
    configure_logging("INFO", "json", salt=SALT, stream=captured)
    log_outputs(logger, [offer], [decision])
    assert captured.getvalue() == ""
    configure_logging("DEBUG", "json", salt=SALT, stream=captured)
    log_outputs(logger, [offer], [decision])
    issued, decided = lines(captured)
    assert (issued["offer_id"], issued["event_id"], issued["user_id"]) == ("o-1", "e-1", "u")
    assert (decided["decision_id"], decided["offer_id"]) == ("d-1", "o-1")


def letter(offset: int, value: bytes) -> DeadLetter:
    return DeadLetter(RawRecord("events.browse", 1, offset, b"u", value), "bad_json", "why")


def test_dead_letters_are_logged_in_bursts_then_summarised(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", salt=SALT, stream=captured)
    dead_log = DeadLetterLog(logging.getLogger("dealstream.test.dlq"), burst=3, interval_s=60)
    value = orjson.dumps({"event_id": "e-7", "user_id": "u"})
    dead_log.log([letter(n, value) for n in range(10)], now_s=1000.0)
    dead_log.log([letter(10, b"{not json")], now_s=1061.0)
    entries = lines(captured)
    one_by_one = [e for e in entries if e["msg"] == "dead-lettered a record"]
    summaries = [e for e in entries if "suppressed" in e]
    assert [e["offset"] for e in one_by_one] == [0, 1, 2, 10]
    assert one_by_one[0]["event_id"] == "e-7" and "event_id" not in one_by_one[-1]
    assert one_by_one[0]["code"] == "bad_json" and one_by_one[0]["partition"] == 1
    assert [s["suppressed"] for s in summaries] == [7]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b'{"event_id": "e-1"}', "e-1"),
        (b'{"event_id": 5}', None),
        (b"[1, 2]", None),
        (b"\xff\xfe", None),
        (b"", None),
        (b'{"event_id": "' + b"x" * 200 + b'"}', None),
    ],
)
def test_event_id_of_reads_only_a_plausible_id(value: bytes, expected: str | None) -> None:
    assert event_id_of(value) == expected


async def test_the_batch_worker_logs_its_dead_letters(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", salt=SALT, stream=captured)
    worker, _ = make_worker()
    await worker.handle(mixed_batch())
    logged = [e for e in lines(captured) if e["msg"] == "dead-lettered a record"]
    assert len(logged) == sum(worker.counters.dead_lettered.values()) > 0
    assert all(e["topic"].startswith("t1.events.") for e in logged)


def test_log_format_setting_is_validated() -> None:
    assert Settings.from_env({"DEALSTREAM_LOG_FORMAT": "TEXT"}).log_format == "text"
    assert Settings.from_env({}).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        Settings.from_env({"DEALSTREAM_LOG_FORMAT": "xml"})


def test_the_log_salt_is_a_secret_setting() -> None:
    settings = Settings.from_env({"DEALSTREAM_LOG_SALT": "pepper-0123456789"})
    assert settings.log_salt is not None and settings.log_salt.reveal() == "pepper-0123456789"
    assert "pepper" not in repr(settings)
    assert Settings.from_env({}).log_salt is None


FORGED = "e-1\n2026-12-05 08:00:00,000 ERROR dealstream.worker forged line\r\x1b[2J\u2028\u202e"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_dead_letters_event_id_cannot_forge_a_log_line(captured: io.StringIO, fmt: str) -> None:
    """The real path: a producer's event_id with newlines, a terminal escape, a line separator
    and a bidirectional override reaches the log through the dead-letter logger."""
    configure_logging("INFO", fmt, salt=SALT, stream=captured)
    dead_log = DeadLetterLog(logging.getLogger("dealstream.test.dlq"), burst=3, interval_s=60)
    value = orjson.dumps({"event_id": FORGED, "user_id": "u", "type": "nope"})
    dead_log.log([DeadLetter(RawRecord("t", 0, 5, b"u", value), "bad_type", "why\nnot")], 1.0)
    text = captured.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert not any(c in text[:-1] for c in "\r\x1b\u2028\u202e")
    if fmt == "json":
        (entry,) = lines(captured)
        assert entry["event_id"] == FORGED  # escaped by JSON, read back intact
    else:
        assert (
            'event_id="e-1\\n2026-12-05 08:00:00,000 ERROR dealstream.worker forged '
            'line\\r\\x1b[2J\\u2028\\u202e"'
        ) in text
        assert "reason=why\\nnot " in text


def test_text_values_that_look_like_fields_are_quoted(captured: io.StringIO) -> None:
    configure_logging("INFO", "text", salt=SALT, stream=captured)
    logging.getLogger("t").warning(
        "got %s", "a\nb", extra={"event_id": 'x level=ERROR "y"', "code": "", "offset": 3}
    )
    line = captured.getvalue()
    assert line.count("\n") == 1
    assert "got a\\nb " in line
    assert 'event_id="x level=ERROR \\"y\\""' in line and 'code=""' in line and "offset=3" in line


def test_a_text_traceback_is_indented_under_its_line(captured: io.StringIO) -> None:
    configure_logging("INFO", "text", salt=SALT, stream=captured)
    try:
        raise ValueError("bad\n2026-12-05 forged")
    except ValueError:
        logging.getLogger("t").exception("failed", extra={"event_id": "e-2"})
    first, *rest = captured.getvalue().splitlines()
    assert first.endswith("failed event_id=e-2")
    assert rest and all(line.startswith("  ") for line in rest)


def test_escape_text_leaves_plain_text_alone_and_is_reversible_for_backslashes() -> None:
    assert escape_text("e-1 café") == "e-1 café"
    assert escape_text("a\\nb") == "a\\\\nb"  # a literal backslash-n is not a newline
    assert escape_text("\x00\U0001f600\U000e0001") == "\\x00\U0001f600\\U000e0001"
