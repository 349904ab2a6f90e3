"""The engine package must stay pure: no Kafka, Faust or Redis client in it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FORBIDDEN = {"faust", "aiokafka", "redis", "mode", "kafka"}
ENGINE = Path(__file__).resolve().parents[2] / "engine"


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def engine_modules() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def test_engine_has_modules() -> None:
    assert len(engine_modules()) >= 5


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: p.name)
def test_engine_module_imports_no_io_client(path: Path) -> None:
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.name} imports {sorted(bad)}; engine/ must stay free of I/O clients"


def test_detector_catches_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("import json\nfrom redis.asyncio import Redis\nimport aiokafka.admin\n")
    assert imported_roots(sample) & FORBIDDEN == {"redis", "aiokafka"}
