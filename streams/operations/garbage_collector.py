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
"""

from __future__ import annotations

import gc


def tune_garbage_collector(threshold: int) -> None:
    """Collect the young generation every ``threshold`` net allocations; ``0`` leaves
    Python's collector as it is."""
    if threshold < 0:
        raise ValueError(f"the collector's threshold must not be negative, got {threshold}")
    if threshold == 0:
        return
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)
