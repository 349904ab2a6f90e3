"""Structured logs: one JSON object per line, with the ids an operator searches for.

Every record carries ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``msg``;
fields passed with ``extra=`` are added when their names are in ``CONTEXT_FIELDS`` (so an
accidental ``extra`` cannot leak arbitrary objects). ``event_id``, ``offer_id`` and
``decision_id`` are the keys to join a log line with the topics.

Privacy: a ``user_id`` passed in ``extra`` is written as ``user_ref``, a keyed hash that
correlates lines of the same user without revealing the id, unless debug logging was asked for
(``DEALSTREAM_LOG_LEVEL=DEBUG``); then the raw ``user_id`` is written. The hash key is
``Settings.log_salt`` (``DEALSTREAM_LOG_SALT``, a secret: the same salt across processes makes
their refs comparable), else a random per-process salt.

``DEALSTREAM_LOG_FORMAT=text`` gives classic one-line text logs for a terminal. Ids and
reasons come from producers, so a text line escapes what it did not write itself
(``escape_text``): a newline or control character in an ``event_id`` cannot start a forged
line, and a context value with a space, ``=`` or ``"`` is quoted so it cannot forge a field.
Traceback lines are escaped and indented: only a record's first line starts at column 0.
JSON lines escape the same characters (``json_line``).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from streams.settings import LOG_FORMATS

if TYPE_CHECKING:  # the CLI imports this module at start: the engine only when a command runs
    from engine.decisions import Decision, Offer

CONTEXT_FIELDS: frozenset[str] = frozenset(
    {
        "event_id",
        "offer_id",
        "decision_id",
        "campaign",
        "discount_pct",
        "topic",
        "partition",
        "offset",
        "code",
        "reason",
        "model_version",
        "count",
        "suppressed",
        "counters",
        "status",
    }
)
"""Names accepted from ``extra=``; ``user_id`` is handled separately (see the module doc)."""


def user_ref(user_id: str, salt: bytes) -> str:
    """A short keyed hash of a user id: stable for one salt, not reversible without it."""
    return hashlib.blake2b(user_id.encode(), key=salt[:64], digest_size=8).hexdigest()


class _ContextFormatter(logging.Formatter):
    """The ids a record carries (``CONTEXT_FIELDS``), with its user id as a ref or, at DEBUG,
    raw: one rule for both output formats."""

    def __init__(self, fmt: str | None, *, salt: bytes, raw_user_ids: bool) -> None:
        super().__init__(fmt)
        self.salt = salt
        self.raw_user_ids = raw_user_ids

    def context(self, record: logging.LogRecord) -> dict[str, Any]:
        attrs = record.__dict__
        found = {name: attrs[name] for name in sorted(CONTEXT_FIELDS) if name in attrs}
        user_id = attrs.get("user_id")
        if isinstance(user_id, str):
            if self.raw_user_ids:
                found["user_id"] = user_id
            else:
                found["user_ref"] = user_ref(user_id, self.salt)
        return found


class JsonFormatter(_ContextFormatter):
    """Formats a record as one JSON line (see the module docstring for the fields)."""

    def __init__(self, *, salt: bytes, raw_user_ids: bool) -> None:
        super().__init__(None, salt=salt, raw_user_ids=raw_user_ids)

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self.context(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json_line(orjson.dumps(entry, default=str).decode())


def json_line(encoded: str) -> str:
    r"""JSON text with the non-printable characters JSON allows raw (line and paragraph
    separators, bidirectional overrides; the encoder escapes the controls) as ``\uXXXX``
    escapes, so that a terminal or a line-based tool shows one honest line.

    >>> print(json_line('{"event_id":"a\u2028b"}'))
    {"event_id":"a\u2028b"}
    """
    if encoded.isprintable():
        return encoded
    out = []
    for char in encoded:
        if char.isprintable():
            out.append(char)
            continue
        code = ord(char)
        if code >= 0x10000:  # a surrogate pair, as JSON spells characters beyond the BMP
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_text(text: str) -> str:
    r"""``text`` on one line of printable characters: backslash, newline, carriage return and
    tab as ``\\``, ``\n``, ``\r``, ``\t``; any other non-printable character (controls, line
    and paragraph separators, bidirectional overrides) as ``\xNN``, ``\uNNNN`` or
    ``\UNNNNNNNN``.

    >>> print(escape_text("e-1\n2026-01-01 ERROR forged\u202e"))
    e-1\n2026-01-01 ERROR forged\u202e
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def text_value(value: Any) -> str:
    """A context value for a text line: escaped, and quoted when it holds a space, ``=`` or
    ``"`` (or is empty), so that it reads as one ``key=value`` field."""
    text = escape_text(value if isinstance(value, str) else str(value))
    if text and not any(c in text for c in ' ="'):
        return text
    return '"' + text.replace('"', '\\"') + '"'


class TextFormatter(_ContextFormatter):
    """Classic text lines; context fields are appended as ``key=value``; user ids as refs;
    everything a producer could have written escaped (see the module docstring)."""

    def __init__(self, *, salt: bytes, raw_user_ids: bool) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s", salt=salt, raw_user_ids=raw_user_ids
        )

    def formatMessage(self, record: logging.LogRecord) -> str:
        return self._style._fmt % {**record.__dict__, "message": escape_text(record.message)}

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={text_value(v)}" for k, v in self.context(record).items())
        if not context:
            return line
        first, newline, rest = line.partition("\n")
        return f"{first} {context}{newline}{rest}"


def _indented(text: str) -> str:
    return "\n".join("  " + escape_text(line) for line in text.splitlines())


def configure_logging(
    level: str, fmt: str = "json", *, salt: bytes | None = None, stream: Any = None
) -> logging.Handler:
    """Route every logger through one handler on stderr (or ``stream``) in the given format.

    Raw user ids appear only at DEBUG. Returns the handler (tests read what it wrote).
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    raw = level.upper() == "DEBUG"
    key = salt if salt is not None else secrets.token_bytes(16)
    handler = logging.StreamHandler(stream)
    formatter_type = JsonFormatter if fmt == "json" else TextFormatter
    handler.setFormatter(formatter_type(salt=key, raw_user_ids=raw))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


class DeadLetterLog:
    """Logs dead letters with their ids, without flooding: the first ``burst`` per interval
    one by one, then one summary line with how many more were suppressed.

    Every dead letter is counted in metrics and kept on the DLQ topic anyway; the log is for
    the human who wants to see a few examples and where they came from.
    """

    def __init__(
        self, logger: logging.Logger, *, burst: int = 20, interval_s: float = 60.0
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self._window_start = float("-inf")
        self._logged = 0
        self._suppressed = 0

    def log(self, letters: Iterable[Any], now_s: float) -> None:
        """``letters`` are ``streams.adapters.decode.DeadLetter``s (typed loosely: no cycle)."""
        for letter in letters:
            if now_s - self._window_start >= self.interval_s:
                self._flush_suppressed()
                self._window_start = now_s
                self._logged = 0
            if self._logged >= self.burst:
                self._suppressed += 1
                continue
            self._logged += 1
            record = letter.record
            extra: dict[str, Any] = {
                "code": letter.code,
                "reason": letter.reason,
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
            }
            event_id = event_id_of(record.value)
            if event_id is not None:
                extra["event_id"] = event_id
            self.logger.warning("dead-lettered a record", extra=extra)

    def _flush_suppressed(self) -> None:
        if self._suppressed:
            self.logger.warning(
                "more dead letters not logged one by one (see the DLQ topic and metrics)",
                extra={"suppressed": self._suppressed},
            )
            self._suppressed = 0


def event_id_of(value: bytes | None, limit: int = 64 * 1024) -> str | None:
    """The ``event_id`` of a raw record when it is readable JSON with a string id, else None."""
    if not value or len(value) > limit:
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict):
        event_id = parsed.get("event_id")
        if isinstance(event_id, str) and 0 < len(event_id) <= 128:
            return event_id
    return None


def log_outputs(
    logger: logging.Logger, offers: Iterable[Offer], decisions: Iterable[Decision]
) -> None:
    """One DEBUG line per offer and per decision (free when DEBUG is off)."""
    if not logger.isEnabledFor(logging.DEBUG):
        return
    for offer in offers:
        logger.debug(
            "offer issued",
            extra={
                "offer_id": offer.offer_id,
                "event_id": offer.trigger_event_id,
                "campaign": offer.campaign,
                "discount_pct": offer.discount_pct,
                "user_id": offer.user_id,
            },
        )
    for decision in decisions:
        logger.debug(
            "decision",
            extra={
                "decision_id": decision.decision_id,
                "offer_id": decision.offer_id,
                "event_id": decision.trigger_event_id,
                "campaign": decision.campaign,
                "discount_pct": decision.discount_pct,
                "user_id": decision.user_id,
            },
        )
