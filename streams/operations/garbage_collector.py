"""How our processes set Python's cyclic garbage collector (``DEALSTREAM_GC_THRESHOLD``).

Python starts a young-generation collection after every 700 net allocations of container
objects, and the hot path allocates a few hundred per event (events, state operations,
feature vectors, decisions), so with the defaults the collector ran every few events and
about a sixth of the batch step's CPU went to scanning objects that were not garbage
(docs/performance.md, "The garbage collector"). The engine creates almost no reference
cycles: what it allocates is freed by reference counting, so collecting less often costs no
memory to speak of.

``tune_garbage_collector`` runs once, in the composition root (``streams/cli/main.py``), before
the command starts. Only the young generation's threshold moves; the older generations keep
their ratios (a middle-generation collection every 10 young ones, a full one every 10 of
those, and only when the long-lived objects grew by a quarter).

``CollectorPauses`` times every collection (``gc.callbacks``): while the collector runs the
worker does nothing else, so a pause adds to the latency of every decision in flight. The
worker observes them into ``dealstream_gc_pause_seconds`` (by generation).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any


def tune_garbage_collector(threshold: int) -> None:
    """Collect the young generation every ``threshold`` net allocations; ``0`` leaves
    Python's collector as it is."""
    if threshold < 0:
        raise ValueError(f"the collector's threshold must not be negative, got {threshold}")
    if threshold == 0:
        return
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)


class CollectorPauses:
    """Reports how long each collection of Python's collector took: ``observe(generation,
    seconds)`` after each one, from ``install`` until ``uninstall``."""

    def __init__(
        self,
        observe: Callable[[int, float], None],
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._observe = observe
        self._clock = clock
        self._started = 0.0

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        else:
            self._observe(int(info["generation"]), self._clock() - self._started)
