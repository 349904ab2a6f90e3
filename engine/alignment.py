"""Event-time alignment of co-partitioned topics: hold back what a lagging topic may precede.

A user's browse, search and purchase events are on partition n of three topics (a *lane*). A
consumer reads the topics at their own pace: replaying history, the small purchase topic is read
far ahead of the browse topic, and a decision would see purchases made after it. The aligner
holds every fetched event of a lane until no topic-partition of the lane can still deliver an
earlier one, as stream processors do (Kafka Streams with ``max.task.idle.ms=0``):

- a topic-partition *lagging* (the consumer knows it has more records on the broker) holds its
  lane back at the largest event time fetched from it so far (nothing fetched yet: the whole
  lane waits);
- a caught-up topic-partition, or one not known to lag, never holds anything back (a quiet
  topic must not stall the others);
- the lane's *low watermark* is the minimum over its lagging topic-partitions; events at or
  below it are released, per topic-partition as a prefix in offset order (a late event, one
  with a smaller event time behind a larger one, is released in its place: the feature
  store's per-partition offset watermarks and the consumer's commits depend on it).

Lanes are independent: a slow partition 1 never holds partition 0 back. Released events come
merged by event time across topic-partitions (ties: the sources in the order given, then the
partition number). Pure: the consumer says which topic-partitions lag (``push``), commits no
further than ``first_held`` and pauses partitions that hold too much (``held_per_partition``).

>>> from engine.events import BrowseEvent, SearchEvent
>>> from engine.features.store import Position
>>> def view(ts, offset):
...     return Incoming(BrowseEvent(f"v{ts}", "u", ts, "i", "c", 1.0), Position("b", 0, offset))
>>> def search(ts, offset):
...     return Incoming(SearchEvent(f"s{ts}", "u", ts, "q"), Position("s", 0, offset))
>>> aligner = EventTimeAligner(("b", "s"))
>>> aligner.push([search(50, 0)], lagging={("b", 0)})  # browse has records still to fetch
>>> aligner.release(), aligner.first_held()
([], {('s', 0): 0})
>>> aligner.push([view(10, 0), view(60, 1)], lagging={("b", 0)})
>>> [item.event.ts for item in aligner.release()], aligner.first_held()
([10, 50, 60], {})
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from engine.pipeline import Incoming

SourcePartition = tuple[str, int]
"""(source, partition): where an event was read."""


@dataclass(slots=True)
class _Held:
    """What one topic-partition holds: its events in offset order, and how far it was read."""

    items: deque[Incoming] = field(default_factory=deque)
    max_ts: int | None = None
    """The largest event time fetched from this topic-partition so far."""
    last_offset: int = -1
    """The last offset pushed: a record pushed again (read twice) is recognised."""


_Keyed = tuple[tuple[int, int, int], SourcePartition | None, Incoming]


def _merge_key(keyed: _Keyed) -> tuple[int, int, int]:
    return keyed[0]


def _offset(item: Incoming) -> int:
    assert item.position is not None  # only positioned items are held per topic-partition
    return item.position.offset


class EventTimeAligner:
    """Holds decoded events per topic-partition and releases them by lane low watermark."""

    def __init__(self, sources: Sequence[str]) -> None:
        self._rank = {source: index for index, source in enumerate(sources)}
        self._held: dict[SourcePartition, _Held] = {}
        self._at_once: list[Incoming] = []
        self._lagging: frozenset[SourcePartition] = frozenset()

    def push(self, items: Iterable[Incoming], *, lagging: Collection[SourcePartition] = ()) -> None:
        """Take ``items`` (each topic-partition's in offset order) and the consumer's latest
        word on which topic-partitions still have records to fetch (``lagging``; every other
        one counts as caught up).

        Released at once, never held: an item without a position, and one at or below an
        offset already pushed on its topic-partition (read again without a ``drop``: the
        feature store recognises it by its offset watermark)."""
        self._lagging = frozenset(lagging)
        for item in items:
            position = item.position
            if position is None:
                self._at_once.append(item)
                continue
            key = (position.source, position.partition)
            held = self._held.get(key)
            if held is None:
                held = self._held[key] = _Held()
            if position.offset <= held.last_offset:
                self._at_once.append(item)
                continue
            held.last_offset = position.offset
            held.items.append(item)
            ts = item.event.ts
            if held.max_ts is None or ts > held.max_ts:
                held.max_ts = ts

    def release(self, limit: int | None = None) -> list[Incoming]:
        """The releasable events (at most ``limit``, the earliest first), merged by event
        time; each topic-partition's share is a prefix of what it holds."""
        runs = self._releasable()
        merged = heapq.merge(*(self._keyed(key, run) for key, run in runs), key=_merge_key)
        taken = list(itertools.islice(merged, limit))
        counts: dict[SourcePartition | None, int] = {}
        for _, key, _item in taken:
            counts[key] = counts.get(key, 0) + 1
        for key, count in counts.items():
            if key is None:
                del self._at_once[:count]
            else:
                items = self._held[key].items
                for _ in range(count):
                    items.popleft()
        return [item for _, _, item in taken]

    def ready(self) -> int:
        """How many events ``release`` would give now (without a limit)."""
        return sum(len(run) for _, run in self._releasable())

    def first_held(self) -> dict[SourcePartition, int]:
        """Per topic-partition, the offset of the first event held: a consumer must not commit
        past it (after a crash, the held events must be read again)."""
        return {key: _offset(h.items[0]) for key, h in self._held.items() if h.items}

    def held_per_partition(self) -> dict[SourcePartition, int]:
        """How many events each topic-partition holds (those that hold any)."""
        return {key: len(h.items) for key, h in self._held.items() if h.items}

    def held(self) -> int:
        return sum(len(h.items) for h in self._held.values()) + len(self._at_once)

    def drop(self, partitions: Iterable[SourcePartition]) -> int:
        """Forget the topic-partitions (revoked: their next owner reads them again from the
        committed offsets); returns how many held events went with them."""
        dropped = 0
        for key in partitions:
            held = self._held.pop(key, None)
            if held is not None:
                dropped += len(held.items)
        return dropped

    # -- internals ------------------------------------------------------------------------------

    def _watermarks(self) -> dict[int, float]:
        """Each lane's low watermark, for the lanes a lagging topic-partition holds back."""
        marks: dict[int, float] = {}
        for key in self._lagging:
            held = self._held.get(key)
            mark = float("-inf") if held is None or held.max_ts is None else held.max_ts
            lane = key[1]
            marks[lane] = min(marks.get(lane, mark), mark)
        return marks

    def _releasable(self) -> list[tuple[SourcePartition | None, Sequence[Incoming]]]:
        marks = self._watermarks()
        runs: list[tuple[SourcePartition | None, Sequence[Incoming]]] = []
        if self._at_once:
            runs.append((None, self._at_once))
        for key, held in self._held.items():
            if not held.items:
                continue
            mark = marks.get(key[1])
            if mark is None:
                runs.append((key, held.items))
                continue
            count = 0
            for item in held.items:
                if item.event.ts > mark:
                    break
                count += 1
            if count:
                runs.append((key, list(itertools.islice(held.items, count))))
        return runs

    def _keyed(self, key: SourcePartition | None, run: Iterable[Incoming]) -> Iterator[_Keyed]:
        """``run`` with merge keys: event time, then source rank, then partition (unknown
        sources after the known ones; events released at once before all)."""
        if key is None:
            rank, partition = -1, -1
        else:
            rank, partition = self._rank.get(key[0], len(self._rank)), key[1]
        for item in run:
            yield (item.event.ts, rank, partition), key, item
