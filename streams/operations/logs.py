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

``DEALSTREAM_LOG_FORMAT=text`` gives classic one-line text logs for a terminal.
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
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(_ContextFormatter):
    """Classic text lines; context fields are appended as ``key=value``; user ids as refs."""

    def __init__(self, *, salt: bytes, raw_user_ids: bool) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s", salt=salt, raw_user_ids=raw_user_ids
        )

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={v}" for k, v in self.context(record).items())
        return f"{line} {context}" if context else line


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
