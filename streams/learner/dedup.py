"""The learner's memory of the training examples it has recently read, to learn each once.

A training example can reach the topic twice: a worker that crashed re-publishes its batch's
outputs from the outbox with the same ids, and before idempotent producers a retried send was
written twice. The learner recognises the second copy (``example_key``) and skips it, counted.

**Bound.** The memory holds the keys of the records at the last ``window`` offsets of each
partition of the training topic (``DEALSTREAM_LEARNER_DEDUP_WINDOW``, 100,000 by default),
nothing older. A copy is recognised while its original is within its partition's window;
workers key both by ``decision_id``, so they share a partition, and a copy more than
``window`` offsets behind its original is learned again. Re-published copies follow their
original by about the length of a worker's outage, so ``window`` must exceed the training
records one partition receives in that time (docs/model-lifecycle.md has the figures).

**Across restarts.** The window is a function of the topic and the learner's positions only,
so a restarted learner rebuilds it exactly: it resumes at its checkpoint's offsets
(``streams.learner.process``) and first reads the ``window`` offsets before each of them,
remembering without learning (those records are in the model it loaded). A copy whose
original the loaded model learned is thus skipped as it would have been without the restart,
and nothing needs to be saved with the snapshot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from itertools import repeat

from engine.model.feedback import TrainingExample


def example_key(example: TrainingExample) -> str:
    """What identifies one training example: its decision and its kind.

    A decision yields at most one example of each kind (``engine.labels.PendingLabels`` and
    ``streams/adapters/ledger.lua``): ``decided`` when it is made, ``converted`` at the first
    purchase in its window only (``converted_at`` is set once), ``elapsed`` once at the wait,
    ``closed`` once at the window's end; and ``decision_id`` is deterministic (campaign and
    trigger event), so a re-published or re-computed copy has the same key. The other fields
    follow from these two (the label and times of that event), so they are not part of it.
    """
    return f"{example.decision_id}\x1f{example.kind}"


class RecentExamples:
    """The keys of the examples at the last ``window`` offsets of each partition.

    ``add`` is called with each record's offset in increasing order per partition (``None``
    for a record that holds no valid example); offsets skipped (a gap in the log) count as
    records without an example, so the window always spans offsets, never a record count.
    Memory: one deque slot per offset and one key per distinct example in the windows.

    >>> recent = RecentExamples(window=2)
    >>> recent.add(0, 10, "d1\\x1fclosed")
    >>> recent.add(0, 11, None)
    >>> "d1\\x1fclosed" in recent
    True
    >>> recent.add(0, 12, "d2\\x1fclosed")  # offset 10 leaves the window [11, 13)
    >>> "d1\\x1fclosed" in recent, len(recent)
    (False, 1)
    """

    __slots__ = ("_counts", "_ends", "_slots", "window")

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._counts: dict[str, int] = {}
        """Occurrences of each key over every partition's window."""
        self._slots: dict[Hashable, deque[str | None]] = {}
        """Per partition, the keys at offsets ``[end - len, end)``."""
        self._ends: dict[Hashable, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._counts

    def __len__(self) -> int:
        """Distinct examples remembered."""
        return len(self._counts)

    def add(self, partition: Hashable, offset: int, key: str | None) -> None:
        """Remember the record at ``offset`` of ``partition``; ``None``: it holds no example."""
        ends = self._ends
        slots = self._slots.get(partition)
        if slots is None or ends[partition] != offset:  # not the next offset: a gap, a seek
            slots = self.advance(partition, offset)
        slots.append(key)
        if key is not None:
            counts = self._counts
            counts[key] = counts.get(key, 0) + 1
        ends[partition] = offset + 1
        if len(slots) > self.window:
            self._forget(slots.popleft())

    def advance(self, partition: Hashable, position: int) -> deque[str | None]:
        """End ``partition``'s window at ``position`` (the offsets in between held nothing).

        A position behind the window's end (the log was truncated and read again), or a jump
        past the whole window, empties the partition's window."""
        slots = self._slots.setdefault(partition, deque())
        end = self._ends.get(partition)
        if end is None or position < end or position - end >= self.window:
            while slots:
                self._forget(slots.popleft())
        elif position > end:
            slots.extend(repeat(None, position - end))
            while len(slots) > self.window:
                self._forget(slots.popleft())
        self._ends[partition] = position
        return slots

    def _forget(self, key: str | None) -> None:
        if key is None:
            return
        left = self._counts[key] - 1
        if left:
            self._counts[key] = left
        else:
            del self._counts[key]
