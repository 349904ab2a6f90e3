"""Checkpoints of ``dealstream replay``: where a replay stopped, so that it can resume.

A checkpoint is a small JSON file written atomically (temporary file + rename) after every
confirmed batch: the identity of the input (so that a changed file is never resumed into),
the options that change what is sent, and the position up to which every record is either
delivered (acknowledged by Kafka) or deliberately skipped. Positions are a mapping of
counters: ``{"events": n}`` for a file (the first ``n`` events the importer yields are done),
``{"<partition>": next_offset}`` for a topic.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from streams.errors import StreamsError

__all__ = [
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "CheckpointMismatch",
    "ReplayError",
    "default_checkpoint_path",
    "file_identity",
    "load_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_VERSION: Final = 1
_HEAD_BYTES: Final = 1 << 16


class ReplayError(StreamsError):
    """A replay that cannot start or continue; the message says what to do."""


class CheckpointMismatch(ReplayError):
    """The checkpoint belongs to another input or other options."""


@dataclass(slots=True)
class Checkpoint:
    """What a replay has done so far (see the module docstring)."""

    identity: dict[str, Any]
    options: dict[str, Any]
    position: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    """Events delivered over all runs of this replay."""
    last: str = ""
    """The source position of the last record done (the replay header's value)."""
    complete: bool = False

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": CHECKPOINT_VERSION,
                "identity": self.identity,
                "options": self.options,
                "position": self.position,
                "sent": self.sent,
                "last": self.last,
                "complete": self.complete,
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
        )

    def check(self, identity: dict[str, Any], options: dict[str, Any], path: Path) -> None:
        """Raise :class:`CheckpointMismatch` naming what differs from this run."""
        diffs = [
            f"{what} {key}: checkpoint {old.get(key)!r}, now {new.get(key)!r}"
            for what, old, new in (
                ("input", self.identity, identity),
                ("option", self.options, options),
            )
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)
        ]
        if diffs:
            raise CheckpointMismatch(
                f"the checkpoint {path} is for another replay ({'; '.join(diffs[:3])}): "
                "rerun with --restart to start over, or name another file with --checkpoint"
            )


def default_checkpoint_path(
    state_dir: Path, input_path: Path | None, topic: str | None = None
) -> Path:
    """``<state_dir>/replay/<name>.<hash of the full path>.json``, where ``state_dir`` is
    ``Settings.state_dir`` (``.dealstream`` under the working directory unless
    ``DEALSTREAM_STATE`` moves it): never beside the input, which is often shared data that
    nobody should write into."""
    folder = state_dir / "replay"
    if input_path is not None:
        digest = hashlib.sha256(str(input_path.resolve()).encode()).hexdigest()[:10]
        return folder / f"{input_path.name}.{digest}.json"
    return folder / f"topic-{topic}.json"


def file_identity(path: Path) -> dict[str, Any]:
    """Path, size, modification time and a hash of the first 64 KiB: a changed file differs."""
    stat = path.stat()
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(_HEAD_BYTES)).hexdigest()
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "head_sha256": head,
    }


def load_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, ``None`` when there is none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReplayError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    try:
        data = orjson.loads(raw)
        if data.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {data.get('version')!r}")
        return Checkpoint(
            identity=dict(data["identity"]),
            options=dict(data["options"]),
            position={str(k): int(v) for k, v in data["position"].items()},
            sent=int(data["sent"]),
            last=str(data.get("last", "")),
            complete=bool(data.get("complete", False)),
        )
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ReplayError(
            f"the checkpoint {path} is not a replay checkpoint ({exc}): "
            "delete it or rerun with --restart"
        ) from None


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Replace the file atomically: a crash leaves the old or the new checkpoint, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(checkpoint.to_json())
        os.replace(tmp, path)
    except OSError as exc:
        raise ReplayError(
            f"cannot write the checkpoint {path}: {exc.strerror}; choose a file with --checkpoint"
        ) from None
