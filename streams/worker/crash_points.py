"""Crash points: the worker stops dead at a chosen step of a chosen batch, for fault tests.

``DEALSTREAM_CRASH_AT=<step>:<n>`` makes the worker exit at once with status 137 (what a
SIGKILL gives: no cleanup, no commit, no flush) the n-th time it reaches ``step``:

- ``after_batch_call``: the batch's one Redis call returned (features, ledger and outbox entry
  written), nothing sent to Kafka yet;
- ``after_send``: its outputs handed to the producer, not yet acknowledged;
- ``after_delivery``: Kafka acknowledged them, the batch's offsets not yet committed;
- ``after_commit``: its offsets committed; the offers it granted join their users' state with
  the next batch's call, which may or may not have run (the batches are pipelined).

A kill anywhere before the Redis call leaves nothing of the batch behind, so it needs no
point of its own. ``stop_consumer:<n>`` does not exit: after the n-th batch it stops the event
consumer and leaves the process serving HTTP (``/health`` must then fail). Unset (the
default), every check is a comparison of two strings.
"""

from __future__ import annotations

import logging
import os

from streams.errors import ConfigError

log = logging.getLogger("dealstream.worker")

STEPS = ("after_batch_call", "after_send", "after_delivery", "after_commit")
STOP_CONSUMER = "stop_consumer"
EXIT_CRASHED = 137
"""The exit status of a process killed by SIGKILL, which a crash point imitates."""


class CrashPoints:
    def __init__(self, spec: str | None = None) -> None:
        self.step: str | None = None
        self.at = 0
        self._reached = 0
        if not spec:
            return
        step, _, count = spec.partition(":")
        if step not in (*STEPS, STOP_CONSUMER) or not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"DEALSTREAM_CRASH_AT={spec!r}: expected <step>:<n> with step one of "
                f"{', '.join((*STEPS, STOP_CONSUMER))} and n a positive integer"
            )
        self.step, self.at = step, int(count)

    def reached(self, step: str) -> None:
        """Exit at once if this is the chosen step's n-th time."""
        if step != self.step:
            return
        self._reached += 1
        if self._reached == self.at:
            log.critical("crash point %s reached the %d. time: exiting at once", step, self.at)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_CRASHED)

    def stop_consumer_now(self) -> bool:
        """True once, after the n-th batch, when the chosen step is ``stop_consumer``."""
        if self.step != STOP_CONSUMER:
            return False
        self._reached += 1
        if self._reached != self.at:
            return False
        log.critical("crash point %s reached: stopping the event consumer", STOP_CONSUMER)
        return True
