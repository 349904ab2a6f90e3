"""Importers: Taobao UserBehavior CSV, OTTO sessions JSONL and event v1 JSONL to event v1.

Every emitted event must pass ``parse_event`` and the JSON Schema, and come out in canonical
form; every source record must be accounted for (emitted, merged or rejected with its line).
The last section runs over the real files in ``../shared/data`` and skips when they are absent.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from engine.analysis.simulation.world import open_loop
from engine.errors import INVALID_EVENT_CODES
from engine.events import event_to_dict, parse_event
from engine.importers import FORMATS, detect_format, import_events
from engine.importers.base import (
    PLAUSIBLE_WINDOW,
    REJECT_REASONS,
    ImporterError,
    ImportRun,
    Reject,
    TimeWindow,
    UnknownFormat,
)
from engine.importers.jsonl import import_jsonl
from engine.importers.otto import import_otto
from engine.importers.taobao import TAOBAO_WINDOW, import_taobao

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@cache
def event_schema() -> Draft202012Validator:
    schema = json.loads((REPO / "schemas" / "event.v1.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema)


def assert_valid(events: Iterable[dict[str, Any]], *, schema: bool = True) -> None:
    """Each event passes parse_event (and the JSON Schema) and is already canonical."""
    for event in events:
        assert event_to_dict(parse_event(event)) == event, event
        if schema:
            errors = [e.message for e in event_schema().iter_errors(event)]
            assert not errors, (event, errors)


def assert_accounted(run: ImportRun) -> None:
    stats = run.stats
    assert stats.complete
    assert stats.balanced, stats.to_dict()
    assert stats.records == stats.emitted + stats.merged + stats.rejected
    assert sum(stats.records_by_kind.values()) == stats.records
    assert sum(stats.emitted_by_kind.values()) == stats.emitted
    assert sum(stats.rejected_by_reason.values()) == stats.rejected
    known = REJECT_REASONS.keys() | INVALID_EVENT_CODES
    assert set(stats.rejected_by_reason) <= known


def run_all(run: ImportRun) -> list[dict[str, Any]]:
    events = list(run)
    assert_valid(events)
    assert_accounted(run)
    return events


def reasons(run: ImportRun) -> list[tuple[int, int | None, str]]:
    return [(r.line, r.index, r.reason) for r in run.rejects]


# -- Taobao ---------------------------------------------------------------------------------------

TAOBAO_LINES = [
    "1,100,10,pv,1511658000",  # 1 view
    "1,101,10,cart,1511658001",  # 2 cart
    "2,100,10,fav,1511658002",  # 3 favorite
    "2,100,10,buy,1511658003",  # 4 purchase
    "",  # 5 blank: skipped, not a record
    "3,102,11,pv",  # 6 field_count
    "3,102,11,click,1511658004",  # 7 unknown_behavior
    "3,x102,11,pv,1511658004",  # 8 bad_id
    "3,102,11,pv,1511658004.5",  # 9 bad_ts
    "301780,543546,4181361,pv,15",  # 10 ts_out_of_range (the real excerpt's truncated last row)
    "4,103,12,pv,1511658005\r\n",  # 11 view (CRLF line end)
]
TAOBAO_REJECTS = [
    (6, None, "field_count"),
    (7, None, "unknown_behavior"),
    (8, None, "bad_id"),
    (9, None, "bad_ts"),
    (10, None, "ts_out_of_range"),
]


def test_taobao_maps_each_behavior() -> None:
    events = run_all(import_taobao(TAOBAO_LINES))
    assert [(e["type"], e.get("action")) for e in events] == [
        ("browse", "view"),
        ("browse", "cart"),
        ("browse", "favorite"),
        ("purchase", None),
        ("browse", "view"),
    ]
    assert events[0] == {
        "schema_version": 1,
        "event_id": "tb-1-1511658000-100-pv",
        "user_id": "tb-1",
        "type": "browse",
        "ts": 1_511_658_000_000,
        "item_id": "100",
        "category": "10",
        "price": 0.0,
        "action": "view",
    }
    assert events[3] == {
        "schema_version": 1,
        "event_id": "tb-2-1511658003-100-buy",
        "user_id": "tb-2",
        "type": "purchase",
        "ts": 1_511_658_003_000,
        "order_id": "tb-2-1511658003-100",
        "items": [{"item_id": "100", "category": "10", "price": 0.0, "quantity": 1}],
        "amount": 0.0,
    }


def test_taobao_rejects_are_counted_with_line_numbers() -> None:
    run = import_taobao(TAOBAO_LINES)
    assert len(run_all(run)) == 5
    assert reasons(run) == TAOBAO_REJECTS
    stats = run.stats
    assert (stats.lines, stats.records, stats.emitted, stats.rejected) == (11, 10, 5, 5)
    assert stats.skipped == Counter(blank=1)
    assert stats.records_by_kind == Counter(pv=5, cart=1, fav=1, buy=1, other=2)
    assert stats.emitted_by_kind == Counter(view=2, cart=1, favorite=1, purchase=1)
    assert stats.rejected_by_reason == Counter(r for _, _, r in TAOBAO_REJECTS)
    bad_ts = run.rejects[-1]
    assert bad_ts.text == "301780,543546,4181361,pv,15"
    assert "1970-01-01T00:00:15Z" in bad_ts.detail and "window=None" in bad_ts.detail
    assert str(bad_ts).startswith("line 10: ts_out_of_range: ")


def test_taobao_window_none_keeps_rows_outside_the_documented_period() -> None:
    run = import_taobao(TAOBAO_LINES, window=None)
    events = run_all(run)
    assert [e["ts"] for e in events if e["user_id"] == "tb-301780"] == [15_000]
    assert "ts_out_of_range" not in run.stats.rejected_by_reason
    assert 1_511_658_000_000 in TAOBAO_WINDOW and 15_000 not in TAOBAO_WINDOW


def test_taobao_reads_plain_and_gzip_files_alike(tmp_path: Path) -> None:
    text = "\n".join(TAOBAO_LINES) + "\n"
    plain = tmp_path / "rows.csv"
    plain.write_text(text, encoding="utf-8")
    zipped = tmp_path / "rows.data"  # gzip is recognised by content, not by name
    zipped.write_bytes(gzip.compress(text.encode()))
    expected = list(import_taobao(TAOBAO_LINES))
    for path in (plain, zipped, str(zipped)):
        run = import_taobao(path)
        assert run_all(run) == expected
        assert reasons(run) == TAOBAO_REJECTS
        assert run.stats.source == str(path)
        assert detect_format(path) == "taobao"


def test_taobao_bytes_lines_and_bad_utf8() -> None:
    lines = [b"1,100,10,pv,1511658000\n", b"\xff\xfe,100,10,pv,1511658000\n"]
    run = import_taobao(lines)
    assert len(run_all(run)) == 1
    assert reasons(run) == [(2, None, "not_utf8")]


def test_taobao_header_is_skipped_only_on_the_first_line() -> None:
    header = "user_id,item_id,category_id,behavior,timestamp"
    run = import_taobao([header, "1,100,10,pv,1511658000", header])
    assert len(run_all(run)) == 1
    assert run.stats.skipped == Counter(header=1)
    assert reasons(run) == [(3, None, "unknown_behavior")]


def test_taobao_ids_are_deterministic_and_duplicate_rows_share_them() -> None:
    lines = ["7,100,10,pv,1511658000", "7,100,10,pv,1511658000", "7,100,10,cart,1511658000"]
    first = [e["event_id"] for e in import_taobao(lines)]
    second = [e["event_id"] for e in import_taobao(list(reversed(lines)))]
    assert first == ["tb-7-1511658000-100-pv"] * 2 + ["tb-7-1511658000-100-cart"]
    assert sorted(first) == sorted(second)  # an id depends on the row, not on its position


# -- OTTO -----------------------------------------------------------------------------------------

T = 1_659_304_800_000


def otto_line(session: object, events: object) -> str:
    return json.dumps({"session": session, "events": events})


def ev(aid: object, ts: object, kind: object) -> dict[str, object]:
    return {"aid": aid, "ts": ts, "type": kind}


OTTO_LINES = [
    otto_line(  # 1: 7 records -> 5 events (2 purchases), 2 merged
        1,
        [
            ev(10, T, "clicks"),
            ev(10, T + 1, "carts"),
            ev(10, T + 2, "orders"),
            ev(11, T + 2, "orders"),
            ev(10, T + 2, "orders"),  # the same aid twice in one order: quantity 2
            ev(12, T + 3, "clicks"),
            ev(12, T + 5, "orders"),
        ],
    ),
    "{not json",  # 2: invalid_json (one record)
    otto_line("s-3", [ev(1, T, "clicks"), ev(2, T, "clicks")]),  # 3: bad_session x2
    otto_line(  # 4: one reject per bad event
        4,
        [
            "oops",
            ev(1, T, "views"),
            {"ts": T, "type": "clicks"},
            ev(1, str(T), "clicks"),
            ev(1, T // 1000, "clicks"),  # seconds, not milliseconds
        ],
    ),
    otto_line(5, []),  # 5: empty session, skipped
    json.dumps({"session": 6}),  # 6: bad_session (one record)
    "",  # 7: blank
]
OTTO_REJECTS = [
    (2, None, "invalid_json"),
    (3, 0, "bad_session"),
    (3, 1, "bad_session"),
    (4, 0, "bad_event"),
    (4, 1, "unknown_behavior"),
    (4, 2, "bad_id"),
    (4, 3, "bad_ts"),
    (4, 4, "ts_out_of_range"),
    (6, None, "bad_session"),
]


def test_otto_maps_clicks_carts_and_groups_orders() -> None:
    events = run_all(import_otto(OTTO_LINES))
    assert [(e["event_id"], e["type"], e.get("action")) for e in events] == [
        (f"otto-1-{T}-clicks-10", "browse", "view"),
        (f"otto-1-{T + 1}-carts-10", "browse", "cart"),
        (f"otto-1-{T + 2}-orders", "purchase", None),
        (f"otto-1-{T + 3}-clicks-12", "browse", "view"),
        (f"otto-1-{T + 5}-orders", "purchase", None),
    ]
    assert events[0] == {
        "schema_version": 1,
        "event_id": f"otto-1-{T}-clicks-10",
        "user_id": "otto-1",
        "type": "browse",
        "ts": T,
        "item_id": "10",
        "category": "unknown",
        "price": 0.0,
        "action": "view",
    }
    assert events[2] == {
        "schema_version": 1,
        "event_id": f"otto-1-{T + 2}-orders",
        "user_id": "otto-1",
        "type": "purchase",
        "ts": T + 2,
        "order_id": f"otto-1-{T + 2}",
        "items": [
            {"item_id": "10", "category": "unknown", "price": 0.0, "quantity": 2},
            {"item_id": "11", "category": "unknown", "price": 0.0, "quantity": 1},
        ],
        "amount": 0.0,
    }


def test_otto_rejects_and_accounting() -> None:
    run = import_otto(OTTO_LINES)
    run_all(run)
    assert reasons(run) == OTTO_REJECTS
    stats = run.stats
    assert (stats.lines, stats.records) == (7, 16)
    assert (stats.emitted, stats.merged, stats.rejected) == (5, 2, 9)
    assert stats.skipped == Counter(blank=1, empty_session=1)
    assert stats.records_by_kind == Counter(clicks=7, carts=1, orders=4, other=4)
    assert stats.emitted_by_kind == Counter(view=2, cart=1, purchase=2)
    seconds = run.rejects[-2]
    assert "looks like seconds" in seconds.detail
    assert seconds.text.startswith('{"session": 4')


def test_otto_order_size_limit() -> None:
    at_limit = otto_line(1, [ev(aid, T, "orders") for aid in range(500)])
    too_big = otto_line(2, [ev(aid, T, "orders") for aid in range(501)])
    run = import_otto([at_limit, too_big], keep_rejects=1000)
    events = run_all(run)
    assert [len(e["items"]) for e in events] == [500]
    assert reasons(run) == [(2, i, "order_too_large") for i in range(501)]
    assert (run.stats.emitted, run.stats.merged, run.stats.rejected) == (1, 499, 501)


def test_otto_gzip_file_and_window_none(tmp_path: Path) -> None:
    path = tmp_path / "otto.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(OTTO_LINES).encode()))
    assert detect_format(path) == "otto"
    assert list(import_otto(path)) == list(import_otto(OTTO_LINES))
    run = import_otto(path, window=None)
    events = run_all(run)
    assert (4, 4, "ts_out_of_range") not in reasons(run)
    assert [e["ts"] for e in events if e["user_id"] == "otto-4"] == [T // 1000]


# -- event v1 JSONL -------------------------------------------------------------------------------


def test_jsonl_round_trips_simulated_events(tmp_path: Path) -> None:
    source = list(open_loop(users=20, events=300, seed=7))
    path = tmp_path / "sim.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(orjson.dumps(e) + b"\n" for e in source)))
    assert detect_format(path) == "jsonl"
    run = import_jsonl(path)
    events = run_all(run)
    assert events == [event_to_dict(parse_event(e)) for e in source]
    assert run.stats.records_by_kind.keys() <= {"browse", "search", "purchase"}
    assert run.stats.out_of_order == 0


@pytest.mark.parametrize("fmt", ["jsonl", "taobao", "otto"])
def test_typed_events_are_the_parsed_dicts_with_the_same_counts(fmt: str, tmp_path: Path) -> None:
    """``events()`` (the backtest's input: JSONL events stay typed, other formats' dicts are
    parsed) yields what ``parse_event`` makes of ``__iter__``'s dicts, and counts the same."""
    if fmt == "jsonl":
        source = list(open_loop(users=20, events=300, seed=7))
        lines: list[str | bytes] = [orjson.dumps(e) for e in source] + [b'{"event_id": 1}']
    else:
        lines = list(TAOBAO_LINES if fmt == "taobao" else OTTO_LINES)
    path = tmp_path / f"input.{fmt}"
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines)
    )
    as_dicts, typed = import_events(path, fmt), import_events(path, fmt)
    dicts = list(as_dicts)
    events = list(typed.events())
    assert events and events == [parse_event(d) for d in dicts]
    assert typed.stats.to_dict() == as_dicts.stats.to_dict()
    assert typed.stats.rejected == (1 if fmt == "jsonl" else as_dicts.stats.rejected)
    with pytest.raises(ImporterError, match="iterated once"):
        typed.events()


def test_jsonl_rejects_use_the_invalid_event_codes() -> None:
    good = {"event_id": "e1", "user_id": "u1", "type": "search", "ts": 5, "query": "tea"}
    lines = [
        json.dumps({**good, "extra": [1]}),  # extra fields are dropped from the output
        "[1, 2]",
        "{broken",
        json.dumps({**good, "ts": -1}),
        json.dumps({**good, "type": "click"}),
        "   ",
        json.dumps({**good, "event_id": "e2", "ts": 4}),
    ]
    run = import_jsonl(lines)
    events = run_all(run)
    assert [e["event_id"] for e in events] == ["e1", "e2"]
    assert "extra" not in events[0]
    assert reasons(run) == [
        (2, None, "not_an_object"),
        (3, None, "invalid_json"),
        (4, None, "out_of_range"),
        (5, None, "unknown_type"),
    ]
    assert run.stats.records_by_kind == Counter(search=3, other=3)
    assert run.stats.out_of_order == 1
    assert (run.stats.min_ts, run.stats.max_ts) == (4, 5)


def test_jsonl_window_is_optional() -> None:
    line = json.dumps({"event_id": "e", "user_id": "u", "type": "search", "ts": 5, "query": ""})
    assert len(list(import_jsonl([line]))) == 1
    run = import_jsonl([line], window=PLAUSIBLE_WINDOW)
    assert list(run) == [] and reasons(run) == [(1, None, "ts_out_of_range")]


# -- the common API -------------------------------------------------------------------------------


def test_formats_registry_and_import_events() -> None:
    assert set(FORMATS) == {"jsonl", "taobao", "otto", "dunnhumby"}
    for name, fmt in FORMATS.items():
        assert fmt.name == name and fmt.description
    run = import_events(TAOBAO_LINES, "taobao")
    assert run.stats.format == "taobao" and run.stats.source == "<lines>"
    assert list(run) == list(import_taobao(TAOBAO_LINES))
    with pytest.raises(UnknownFormat, match="use one of jsonl, taobao, otto"):
        import_events(TAOBAO_LINES, "csv")
    with pytest.raises(UnknownFormat, match="name the format"):
        import_events(TAOBAO_LINES)


def test_import_events_detects_the_format_of_files(tmp_path: Path) -> None:
    path = tmp_path / "otto.jsonl"
    path.write_text("\n" + "\n".join(OTTO_LINES), encoding="utf-8")  # leading blank line
    run = import_events(path)
    assert run.stats.format == "otto"
    assert list(run) == list(import_otto(OTTO_LINES))


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "no data lines"), (b"\n\n", "no data lines"), (b"a;b;c\n", "fits none of")],
)
def test_detect_format_says_when_it_cannot_tell(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(UnknownFormat, match=match):
        detect_format(path)
    assert issubclass(UnknownFormat, ImporterError)


def test_missing_file_fails_at_call_time(tmp_path: Path) -> None:
    for importer in (import_taobao, import_otto, import_jsonl):
        with pytest.raises(FileNotFoundError, match="no such file"):
            importer(tmp_path / "absent.csv")


def test_rejects_go_to_the_handler_and_only_the_first_are_kept() -> None:
    seen: list[Reject] = []
    run = import_taobao(TAOBAO_LINES, on_reject=seen.append, keep_rejects=2)
    list(run)
    assert [(r.line, r.index, r.reason) for r in seen] == TAOBAO_REJECTS
    assert run.rejects == seen[:2]
    assert run.stats.rejected == 5
    assert seen[0].to_dict() == {
        "line": 6,
        "reason": "field_count",
        "detail": seen[0].detail,
        "text": "3,102,11,pv",
    }


def test_a_run_is_iterated_once_and_can_stop_early(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(TAOBAO_LINES), encoding="utf-8")
    with import_taobao(path) as run:
        first = next(iter(run))
    assert first["event_id"] == "tb-1-1511658000-100-pv"
    assert not run.stats.complete
    assert (run.stats.emitted, run.stats.records) == (1, 1)  # counted up to where it stopped
    assert "incomplete" in run.stats.summary()
    with pytest.raises(ImporterError, match="iterated once"):
        list(run)


def test_stats_summary_and_dict() -> None:
    run = import_taobao(TAOBAO_LINES)
    list(run)
    summary = run.stats.summary()
    assert "10 records read, 5 events emitted" in summary
    assert "5 rejected (bad_id 1, bad_ts 1, field_count 1, ts_out_of_range 1" in summary
    as_dict = run.stats.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["rejected_by_reason"]["bad_ts"] == 1


def test_time_window_bounds() -> None:
    window = TimeWindow(10, 20)
    assert 10 in window and 19 in window and 20 not in window and 10.0 not in window
    assert str(TAOBAO_WINDOW) == "[2017-11-24T16:00:00Z, 2017-12-03T16:00:00Z)"
    with pytest.raises(ValueError, match="start_ms < end_ms"):
        TimeWindow(20, 10)


# -- properties: no input crashes an importer, and every record is accounted for --------------

taobao_field = st.one_of(
    st.from_regex(r"[0-9]{1,8}", fullmatch=True),
    st.sampled_from(["pv", "cart", "fav", "buy", "", "-1", "1511658000", "15", "1.5", "é"]),
    st.text(max_size=6),
)
taobao_line = st.one_of(
    st.lists(taobao_field, min_size=5, max_size=5).map(",".join),
    st.lists(taobao_field, max_size=7).map(",".join),
    st.binary(max_size=20),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(taobao_line, max_size=12))
def test_any_taobao_input_is_accounted_for(lines: list[str | bytes]) -> None:
    run = import_taobao(lines)
    assert_valid(list(run), schema=False)
    assert_accounted(run)


json_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 2**64),
    st.just(T),
    st.text(max_size=5),
    st.sampled_from(["clicks", "carts", "orders"]),
)
otto_event = st.one_of(
    st.fixed_dictionaries(
        {
            "aid": st.integers(0, 5) | json_value,
            "ts": st.integers(T, T + 3) | json_value,
            "type": st.sampled_from(["clicks", "carts", "orders"]) | json_value,
        }
    ),
    json_value,
)
otto_session = st.fixed_dictionaries(
    {"session": st.integers(0, 9) | json_value, "events": st.lists(otto_event, max_size=6)}
)


@settings(max_examples=150, deadline=None)
@given(st.lists(otto_session.map(json.dumps) | st.text(max_size=8), max_size=6))
def test_any_otto_input_is_accounted_for(lines: list[str]) -> None:
    run = import_otto(lines)
    assert_valid(list(run), schema=False)
    assert_accounted(run)


# -- the real files in ../shared/data -----------------------------------------------------------


def real_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/data/README.md)")
    return path


def test_real_taobao_excerpt() -> None:
    path = real_file("taobao-userbehavior-excerpt.csv.gz")
    assert detect_format(path) == "taobao"
    run = import_taobao(path)
    events = list(run)
    assert_accounted(run)
    stats = run.stats
    # The data README's counts per behaviour, over all 96,169 rows ...
    assert stats.records == stats.lines == 96_169
    assert stats.records_by_kind == Counter(pv=85_774, cart=5_292, fav=2_959, buy=2_144)
    # ... of which one row, the truncated last line (a pv), has a bad timestamp.
    assert [(r.line, r.reason, r.text) for r in run.rejects] == [
        (96_169, "ts_out_of_range", "301780,543546,4181361,pv,15")
    ]
    assert stats.emitted == len(events) == 96_168
    assert stats.emitted_by_kind == Counter(view=85_773, cart=5_292, favorite=2_959, purchase=2_144)
    assert stats.rejected == 1 and stats.merged == 0
    assert len({e["event_id"] for e in events}) == len(events)  # no duplicate rows in it
    assert stats.out_of_order == 0  # time-sorted
    assert (stats.min_ts, stats.max_ts) == (1_511_658_000_000, 1_511_664_909_000)
    assert_valid(events, schema=False)
    assert_valid(events[::97] + [e for e in events if e["type"] == "purchase"])


def test_real_otto_sample() -> None:
    path = real_file("otto-sessions-sample.jsonl")
    assert detect_format(path) == "otto"
    run = import_otto(path)
    events = run_all(run)
    stats = run.stats
    assert stats.lines == 20
    assert stats.records == 862  # every source event accounted for
    assert stats.records_by_kind == Counter(clicks=800, carts=52, orders=10)
    assert (stats.emitted, stats.merged, stats.rejected) == (857, 5, 0)
    assert stats.emitted_by_kind == Counter(view=800, cart=52, purchase=5)
    purchases = [e for e in events if e["type"] == "purchase"]
    assert sum(i["quantity"] for p in purchases for i in p["items"]) == 10
    assert len({e["event_id"] for e in events}) == len(events)
    assert len({e["user_id"] for e in events}) == 20


def test_formats_cannot_read_each_other() -> None:
    """A file given the wrong --format is rejected line by line, never half-imported."""
    path = real_file("otto-sessions-sample.jsonl")
    for importer in (import_taobao, import_jsonl):
        run = importer(path)
        assert list(run) == []
        assert run.stats.rejected == run.stats.records == 20
