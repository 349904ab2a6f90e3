"""The progress line of ``dealstream replay``: events sent, rate, event-time position, ETA.

On a terminal one line is rewritten in place (carriage return) a few times a second; into a
file or a pipe (CI logs, ``2> replay.log``) a full line is written every few seconds, so logs
stay readable. The clock is passed in so that tests can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from engine.importers.base import describe_ts

__all__ = ["Progress", "format_duration"]

TTY_INTERVAL_S = 0.25
LOG_INTERVAL_S = 5.0


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1:02:05"``; ``42`` -> ``"0:42"``."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Writes progress to ``stream``; call :meth:`update` as often as you like (it is
    rate-limited) and :meth:`finish` once before printing anything else."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        label: str = "replay",
        verb: str = "sent",
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty() if tty is None else tty
        self._interval = interval_s or (TTY_INTERVAL_S if self._tty else LOG_INTERVAL_S)
        self._clock = clock
        self._label = label
        self._verb = verb
        self._started = clock()
        self._next = self._started + self._interval
        self._first_fraction: float | None = None
        self._width = 0
        self.lines_written = 0

    def update(
        self, sent: int, event_ts: int | None, fraction: float | None, *, force: bool = False
    ) -> None:
        """Show ``sent`` events so far, the event time reached and the input ``fraction``
        read (0..1, ``None`` when unknown), at most once per interval unless ``force``."""
        now = self._clock()
        if self._first_fraction is None and fraction is not None:
            self._first_fraction = fraction
        if not force and now < self._next:
            return
        self._next = now + self._interval
        self._write(self.line(sent, event_ts, fraction, now))

    def line(self, sent: int, event_ts: int | None, fraction: float | None, now: float) -> str:
        """The text of one progress line (without line end)."""
        elapsed = max(now - self._started, 1e-9)
        parts = [f"{self._label}: {sent:,} {self._verb}", f"{sent / elapsed:,.0f}/s"]
        if event_ts is not None:
            parts.append(f"at {describe_ts(event_ts)}")
        if fraction is not None:
            parts.append(f"{fraction:.0%} read")
            eta = self._eta(fraction, elapsed)
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
        return ", ".join(parts)

    def _eta(self, fraction: float, elapsed: float) -> float | None:
        start = self._first_fraction or 0.0
        done = fraction - start
        if done <= 0 or fraction >= 1.0:
            return None
        return elapsed * (1.0 - fraction) / done

    def _write(self, text: str) -> None:
        if self._tty:
            pad = " " * max(0, self._width - len(text))
            self._stream.write("\r" + text + pad)
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        self.lines_written += 1

    def finish(self) -> None:
        """End the in-place line so that the next output starts on a fresh line."""
        if self._tty and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0
