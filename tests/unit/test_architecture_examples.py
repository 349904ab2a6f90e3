"""The worked examples of docs/architecture.md run as written: a feature, an importer, a CLI
command and a sink (the policy example has its own test, ``test_policy_registry.py``).

Each example is read from the page (the ``python`` block whose first line names its file), so
an example that stops fitting the code fails here instead of misleading a reader.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import io
import re
import types
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from engine.campaigns import Campaign
from engine.errors import INVALID_EVENT_CODES
from engine.events import parse_event
from engine.features import catalogue
from engine.features.catalogue import build_context
from engine.features.state import apply_ops, event_ops
from engine.features.store import InMemoryFeatureStore
from engine.importers import ImportFormat
from engine.importers.base import REJECT_REASONS
from engine.pipeline import DiscountEngine
from engine.policies.threshold import ThresholdPolicy
from streams.adapters.decode import DecodeLimits, RawRecord
from streams.settings import Topics
from streams.worker.batch_worker import BatchWorker

PAGE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
T0 = 1_767_225_600_000
MINUTE = 60_000


def example(first_line: str) -> str:
    """The ``python`` block of the page whose first line starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    found = [block for block in blocks if block.startswith(first_line)]
    assert len(found) == 1, f"one example starting {first_line!r} in {PAGE.name}, got {found}"
    return str(found[0])


def load_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"{PAGE.name}:{name}", "exec"), module.__dict__)
    return module


# -- a feature ----------------------------------------------------------------------------------


def test_the_feature_example_computes_its_share_from_the_raw_state() -> None:
    source = example("# engine/features/catalogue.py, in _declare()")
    spec = eval(source, dict(vars(catalogue)))  # the expression, in its module's namespace
    assert spec.name == "search_share_24h" and spec.name not in catalogue.FEATURE_NAMES
    state: dict[str, float] = {}
    docs: list[dict[str, Any]] = [
        {"type": "search", "query": "lamp"},
        {"type": "search", "query": "desk lamp"},
        {"type": "search", "query": "led lamp"},
        {"type": "browse", "action": "view", "item_id": "i1", "category": "home", "price": 20.0},
        {"type": "browse", "action": "cart", "item_id": "i1", "category": "home", "price": 20.0},
    ]
    for n, doc in enumerate(docs):
        event = parse_event({"event_id": f"e{n}", "user_id": "u1", "ts": T0 + n * MINUTE, **doc})
        apply_ops(state, event_ops(event))
    now = T0 + len(docs) * MINUTE
    assert spec.compute(build_context(state, now)) == 0.75  # 3 searches, 1 view; carts ignored
    assert spec.compute(build_context(state, now + 25 * 60 * MINUTE)) == 0.0  # outside 24 h
    assert spec.compute(build_context({}, now)) == 0.0


# -- an importer --------------------------------------------------------------------------------


def test_the_importer_example_emits_search_events_and_rejects_with_known_reasons() -> None:
    module = load_module("searchlog", example("# engine/importers/searchlog.py"))
    lines = ["u1,1767225600,desk lamp\n", "\n", "u2,soon,tea\n", "u3,1767225660\n", ",5,x\n"]
    run = module.import_searchlog(lines)
    events = list(run)
    assert events == [
        {
            "schema_version": 1,
            "event_id": "searchlog-1",
            "user_id": "u1",
            "type": "search",
            "ts": 1_767_225_600_000,
            "query": "desk lamp",
        }
    ]
    assert [(r.line, r.reason) for r in run.rejects] == [
        (3, "bad_ts"),
        (4, "field_count"),
        (5, run.rejects[2].reason),
    ]
    known = set(REJECT_REASONS) | set(INVALID_EVENT_CODES)
    assert {r.reason for r in run.rejects} <= known
    assert run.stats.balanced and run.stats.records == 4 and run.stats.skipped["blank"] == 1
    (entry,) = eval(  # the line as it stands in the FORMATS tuple, trailing comma included
        example('ImportFormat("searchlog"'),
        {"ImportFormat": ImportFormat, "import_searchlog": module.import_searchlog},
    )
    assert isinstance(entry, ImportFormat) and entry.name == "searchlog"
    assert entry.importer is module.import_searchlog


# -- a CLI command ------------------------------------------------------------------------------


def test_the_cli_example_registers_its_subcommand_and_handler() -> None:
    module = load_module("pending", example("# streams/cli/pending.py"))
    parser = argparse.ArgumentParser(prog="dealstream")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["pending"])
    assert args.handler is module.run_pending_command
    assert inspect.iscoroutinefunction(module.count_pending)
    assert "pending" in parser.format_help()
    # Heavy clients are imported inside the handler, not when the module loads.
    assert "redis" not in vars(module) and "aioredis" not in vars(module)


# -- a sink -------------------------------------------------------------------------------------


def test_the_sink_example_receives_a_workers_outputs_as_json_lines() -> None:
    source = example("# streams/adapters/sinks.py")
    namespace: dict[str, Any] = {
        "IO": IO,
        "Sequence": Sequence,
        "Awaitable": Awaitable,
        "asyncio": asyncio,
        "orjson": orjson,
    }
    exec(compile(source, f"{PAGE.name}:sinks", "exec"), namespace)
    out = io.BytesIO()
    sink = namespace["JsonLinesSink"](out)
    engine = DiscountEngine(
        InMemoryFeatureStore(),
        campaigns=[Campaign("spring", ThresholdPolicy(threshold=0.0), decision_interval_ms=0)],
    )
    topics = Topics("x.")
    worker = BatchWorker(
        engine, sink, topics=topics, limits=DecodeLimits(), wall_clock_ms=lambda: T0
    )
    browse = {
        "event_id": "e1",
        "user_id": "u1",
        "type": "browse",
        "ts": T0,
        "item_id": "i1",
        "category": "books",
        "price": 12.5,
    }
    records = [
        RawRecord("x.events.browse", 0, 0, b"u1", orjson.dumps(browse), T0, ()),
        RawRecord("x.events.browse", 0, 1, b"u1", b"{oops", T0, ()),
    ]

    async def run() -> None:
        await worker.handle(records)
        await (await sink.delivery())  # as the worker's event consumer waits
        await sink.flush()

    asyncio.run(run())
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    counters = worker.counters
    assert counters.balanced() and counters.decisions == 1
    by_topic = [line["topic"] for line in lines]
    assert by_topic.count(topics.decisions) == counters.decisions
    assert by_topic.count(topics.offers) == counters.offers
    assert by_topic.count(topics.dlq) == sum(counters.dead_lettered.values()) == 1
    decision = next(line for line in lines if line["topic"] == topics.decisions)
    assert decision["key"] == "u1" and orjson.loads(decision["value"])["user_id"] == "u1"
    dead = next(line for line in lines if line["topic"] == topics.dlq)
    assert dead["value"] == "{oops" and "dealstream.error.reason" in dead["headers"]
