"""Importers: real public data formats turned into event v1 JSON objects.

One call per format (:func:`import_events` here, or ``import_<format>`` in
``engine.importers.<format>``) returns an ``engine.importers.base.ImportRun``; iterate it for
event v1 dicts (ready for ``orjson.dumps``, or for :func:`engine.events.parse_event`), then read
``run.stats`` for what was read, emitted, merged and rejected, and ``run.rejects`` for the first
rejects with their line numbers. Bad rows never raise: they are rejects.

>>> run = import_events(["1,2,3,cart,1511658000", "1,2,3,cart,yesterday"], format="taobao")
>>> [e["action"] for e in run], [r.reason for r in run.rejects], run.stats.balanced
(['cart'], ['bad_ts'], True)

:data:`FORMATS` maps each format name to its importer (for ``replay --format``), and
:func:`detect_format` tells the format of a file from its first line. See ``docs/importers.md``
for the field mappings and what each format lacks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Protocol

import orjson

from engine.importers.base import (
    DEFAULT_KEEP_REJECTS,
    ImportRun,
    RejectHandler,
    Source,
    UnknownFormat,
    excerpt,
    first_line,
)
from engine.importers.dunnhumby import import_dunnhumby
from engine.importers.jsonl import import_jsonl
from engine.importers.otto import import_otto
from engine.importers.taobao import BEHAVIORS, import_taobao

__all__ = [
    "FORMATS",
    "ImportFormat",
    "Importer",
    "detect_format",
    "import_events",
]


class Importer(Protocol):
    """What every format's import function accepts (each may add keyword options)."""

    def __call__(
        self,
        source: Source,
        *,
        on_reject: RejectHandler | None = None,
        keep_rejects: int = DEFAULT_KEEP_REJECTS,
    ) -> ImportRun: ...


@dataclass(frozen=True, slots=True)
class ImportFormat:
    """A registered input format: its name, a one-line description, and its importer."""

    name: str
    description: str
    importer: Importer


FORMATS: Final[Mapping[str, ImportFormat]] = MappingProxyType(
    {
        fmt.name: fmt
        for fmt in (
            ImportFormat("jsonl", "event v1 JSON lines (dealstream simulate --out)", import_jsonl),
            ImportFormat(
                "taobao",
                "Taobao UserBehavior CSV: user_id,item_id,category_id,behavior,unix_ts",
                import_taobao,
            ),
            ImportFormat(
                "otto", 'OTTO sessions JSONL: {"session", "events": [{aid, ts, type}]}', import_otto
            ),
            ImportFormat(
                "dunnhumby",
                "Dunnhumby Complete Journey transactions CSV (one purchase per basket)",
                import_dunnhumby,
            ),
        )
    }
)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The name of the format of the file at ``path`` (plain or gzip), from its first line.

    Raises :class:`UnknownFormat` when the file is empty or its first line fits no format,
    and ``FileNotFoundError`` when there is no such file.
    """
    line = first_line(path, limit=1 << 20)
    if not line:
        raise UnknownFormat(f"cannot tell the format of {os.fspath(path)}: it has no data lines")
    if line.startswith(b"{"):
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:  # a longer line than we read, or broken JSON
            is_otto = b'"session"' in line and b'"events"' in line
        else:
            is_otto = isinstance(obj, dict) and "session" in obj and "events" in obj
        return "otto" if is_otto else "jsonl"
    fields = line.split(b",")
    if fields[0].strip() == b"household_id" and b"basket_id" in fields:
        return "dunnhumby"
    if len(fields) == 5:
        behavior = fields[3].decode("utf-8", "replace").strip()
        if behavior in BEHAVIORS or behavior.lower().startswith("behav"):
            return "taobao"
    names = ", ".join(FORMATS)
    raise UnknownFormat(
        f"cannot tell the format of {os.fspath(path)}: its first line {excerpt(line)[:80]!r} "
        f"fits none of {names}; name the format explicitly"
    )


def import_events(
    source: Source,
    format: str | None = None,
    *,
    on_reject: RejectHandler | None = None,
    keep_rejects: int = DEFAULT_KEEP_REJECTS,
) -> ImportRun:
    """Import ``source`` with the importer of ``format`` (a :data:`FORMATS` name).

    With ``format=None`` the format is detected from the file (``source`` must then be a path).
    Each format's own options (such as ``window``) keep their defaults; call the format's
    function (:func:`import_taobao`, ...) to change them.
    """
    if format is None:
        if not isinstance(source, str | os.PathLike):
            raise UnknownFormat("name the format of in-memory lines; only files are detected")
        format = detect_format(source)
    spec = FORMATS.get(format)
    if spec is None:
        raise UnknownFormat(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    return spec.importer(source, on_reject=on_reject, keep_rejects=keep_rejects)
