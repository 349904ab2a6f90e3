"""Where ``dealstream replay`` reads from: a data file through the importers, or a topic range.

A source yields :class:`engine.ports.SourceItem` s in its own order (a file's order, or each
partition's order) and knows how to start again after a checkpoint position. Every item
carries its source position (the ``dealstream.replay.source`` header value) and a *mark*, the
checkpoint counter it completes.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.errors import InvalidEvent
from engine.events import decode_event, event_to_dict
from engine.importers import FORMATS, detect_format
from engine.importers.base import ImportRun, UnknownFormat
from engine.importers.dunnhumby import PRODUCTS_FILE, import_dunnhumby
from engine.ports import SourceItem
from streams.adapters.kafka_io import kafka_client_options
from streams.replay.checkpoint import ReplayError, file_identity
from streams.settings import KafkaSecurity

__all__ = ["FileSource", "TopicSource"]

SKIP_RESUME: Final = "before_resume"
_GZIP_MAGIC: Final = b"\x1f\x8b"


class FileSource:
    """A data file (plain or gzip) read through the importer of its format.

    The file is opened here rather than by the importer so that the bytes read can be
    measured (progress and ETA). Resuming skips the first ``n`` events: the importers are
    deterministic, so the same file gives the same events in the same order.
    """

    def __init__(self, path: Path, format: str | None = None) -> None:
        if not path.is_file():
            raise ReplayError(f"no such file: {path} (give the path of the data file)")
        try:
            self.format = format or detect_format(path)
        except UnknownFormat as exc:
            raise ReplayError(f"{exc} with --format") from None
        if self.format not in FORMATS:
            raise ReplayError(f"unknown format {self.format!r}; use one of {', '.join(FORMATS)}")
        self.path = path
        self.name = path.name
        self.size = path.stat().st_size
        self.run: ImportRun | None = None
        self._raw: IO[bytes] | None = None

    def identity(self) -> dict[str, Any]:
        return {"kind": "file", "format": self.format, **file_identity(self.path)}

    def fraction(self) -> float | None:
        """The share of the file's bytes read so far."""
        if self._raw is None or self._raw.closed or not self.size:
            return None
        return min(1.0, self._raw.tell() / self.size)

    def _lines(self) -> Iterator[bytes]:
        with self.path.open("rb") as raw:
            self._raw = raw
            if raw.peek(2)[:2] == _GZIP_MAGIC:
                with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                    yield from unzipped
            else:
                yield from raw

    def _import(self) -> ImportRun:
        if self.format == "dunnhumby":
            products = self.path.parent / PRODUCTS_FILE
            return import_dunnhumby(
                self._lines(), products=products if products.is_file() else False
            )
        return FORMATS[self.format].importer(self._lines(), keep_rejects=20)

    async def items(self, resume: Mapping[str, int]) -> AsyncIterator[SourceItem]:
        done = resume.get("events", 0)
        self.run = self._import()
        self.run.stats.source = str(self.path)
        name = self.name
        try:
            for ordinal, (line, event) in enumerate(self.run.numbered(), 1):
                yield SourceItem(
                    event,
                    f"{name}:{line}",
                    ("events", ordinal),
                    SKIP_RESUME if ordinal <= done else None,
                )
        finally:
            self.run.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.close()

    def counts(self) -> tuple[int, int, Counter[str]]:
        """(records read, records merged into other events, rejects by reason)."""
        if self.run is None:
            return 0, 0, Counter()
        stats = self.run.stats
        return stats.records, stats.merged, Counter(stats.rejected_by_reason)

    def reject_samples(self) -> list[str]:
        return [str(r) for r in self.run.rejects[:5]] if self.run else []


class TopicSource:
    """A range of a topic (a dead-letter or archive topic) read back as event v1 records.

    Each partition is read from ``from_offset`` (or the resume position) up to ``to_offset``
    exclusive, by default the end of the partition when the replay first started (kept in the
    checkpoint, so that a resumed replay stops at the same place). Values that are not valid
    event v1 are rejects with the ``InvalidEvent`` code. Order is kept within each partition.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        partitions: list[int] | None = None,
        from_offset: int = 0,
        to_offset: int | None = None,
        security: KafkaSecurity | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self._security = security
        self.topic = topic
        self.name = topic
        self._partitions = partitions
        self._from = from_offset
        self._to = to_offset
        self.ranges: dict[str, list[int]] = {}
        self._read = 0
        self._rejected: Counter[str] = Counter()
        self._position: dict[str, int] = {}

    async def resolve(self, saved: Mapping[str, Any] | None) -> None:
        """Fix the offset ranges: from the checkpoint's identity when resuming, else from the
        broker (``[max(from, start), min(to, end))`` per partition)."""
        if saved is not None and saved.get("ranges"):
            self.ranges = {str(p): [int(a), int(b)] for p, a, b in _triples(saved["ranges"])}
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            **kafka_client_options(self._security).kwargs(),
        )
        await consumer.start()
        try:
            known = consumer.partitions_for_topic(self.topic)
            if known is None:
                await consumer._client.force_metadata_update()
                known = consumer.partitions_for_topic(self.topic)
            if not known:
                raise ReplayError(f"topic {self.topic!r} does not exist on {self.bootstrap}")
            chosen = sorted(known) if self._partitions is None else sorted(set(self._partitions))
            missing = [p for p in chosen if p not in known]
            if missing:
                raise ReplayError(
                    f"topic {self.topic!r} has no partition {missing[0]} "
                    f"(it has {', '.join(map(str, sorted(known)))})"
                )
            tps = [TopicPartition(self.topic, p) for p in chosen]
            starts = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
        finally:
            await consumer.stop()
        for tp in tps:
            low = max(self._from, starts[tp])
            high = ends[tp] if self._to is None else min(self._to, ends[tp])
            self.ranges[str(tp.partition)] = [low, max(low, high)]

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "topic",
            "bootstrap": self.bootstrap,
            "topic": self.topic,
            "ranges": [[int(p), a, b] for p, (a, b) in sorted(self.ranges.items())],
        }

    def fraction(self) -> float | None:
        total = sum(b - a for a, b in self.ranges.values())
        if not total:
            return None
        done = sum(self._position.get(p, a) - a for p, (a, _) in self.ranges.items())
        return min(1.0, done / total)

    async def items(self, resume: Mapping[str, int]) -> AsyncIterator[SourceItem]:
        todo = {p: (max(a, resume.get(p, a)), b) for p, (a, b) in self.ranges.items()}
        todo = {p: r for p, r in todo.items() if r[0] < r[1]}
        self._position = {p: r[0] for p, r in todo.items()}
        if not todo:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            max_poll_records=5000,
            **kafka_client_options(self._security).kwargs(),
        )
        await consumer.start()
        try:
            tps = {p: TopicPartition(self.topic, int(p)) for p in todo}
            consumer.assign(list(tps.values()))
            for p, (start, _) in todo.items():
                consumer.seek(tps[p], start)
            while todo:
                batch = await consumer.getmany(*[tps[p] for p in todo], timeout_ms=1000)
                for tp, records in batch.items():
                    p = str(tp.partition)
                    end = todo.get(p, (0, 0))[1]
                    for record in records:
                        if record.offset >= end:
                            break
                        self._read += 1
                        self._position[p] = record.offset + 1
                        yield self._item(p, record.offset, record.value)
                for p in list(todo):  # also past gaps (compaction, transaction markers)
                    if await consumer.position(tps[p]) >= todo[p][1]:
                        todo.pop(p)
        finally:
            await consumer.stop()

    def _item(self, partition: str, offset: int, value: bytes | None) -> SourceItem:
        where = f"{self.topic}/{partition}:{offset}"
        mark = (partition, offset + 1)
        try:
            event = event_to_dict(decode_event(value or b""))
        except InvalidEvent as exc:
            self._rejected[exc.code] += 1
            return SourceItem(None, where, mark, reason=exc.code)
        return SourceItem(event, where, mark)

    def close(self) -> None:
        """Nothing to release: the consumer is closed when ``items`` ends."""

    def counts(self) -> tuple[int, int, Counter[str]]:
        return self._read, 0, Counter(self._rejected)

    def reject_samples(self) -> list[str]:
        return []


def _triples(raw: Any) -> Iterator[tuple[int, int, int]]:
    for entry in raw:
        p, a, b = entry
        yield int(p), int(a), int(b)


def describe_source(path: str | os.PathLike[str] | None, topic: str | None) -> str:
    return os.fspath(path) if path is not None else f"topic {topic}"
