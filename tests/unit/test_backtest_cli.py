"""``dealstream backtest`` end to end in-process: files written, determinism, errors, HTML."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.analysis.ope.decision_log import read_decision_log
from engine.analysis.reporting.html import render_html
from engine.analysis.reporting.plots import PLOT_IDS
from engine.analysis.simulation.world import open_loop
from streams.cli.main import main

CAMPAIGNS = """
[[campaign]]
name = '{name}'
policy = "threshold"
threshold = 0.3
triggers = ["view", "cart"]
decision_interval_s = 300
daily_budget = 40.0
holdout = 0.25

[[campaign]]
name = "explorer"
policy = "profit"
epsilon = 0.3
max_discount_pct = 20
triggers = ["cart", "view"]
decision_interval_s = 300
holdout = 0.25
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEALSTREAM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DEALSTREAM_ATTRIBUTION_WINDOW_S", "1800")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backtest")
    events = root / "sim.jsonl"
    with events.open("wb") as handle:
        for event in open_loop(users=80, events=2500, seed=11, mean_gap_ms=4000):
            handle.write(orjson.dumps(event) + b"\n")
    first = root / "first.toml"
    first.write_text(CAMPAIGNS.format(name='cart <b>&</b> "savers"'), "utf-8")
    second = root / "second.toml"
    second.write_text(CAMPAIGNS.format(name="plain"), "utf-8")
    return {"events": events, "first": first, "second": second, "root": root}


def backtest(files: dict[str, Path], out: Path, *extra: str) -> int:
    args = ["backtest", "--in", str(files["events"]), "--campaigns", str(files["first"])]
    return main([*args, "--out", str(out), *extra])


def test_same_file_and_seed_give_identical_report_json(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert backtest(files, tmp_path / "a", "--seed", "3") == 0
    assert backtest(files, tmp_path / "b", "--seed", "3") == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "report.json").read_bytes() == (b / "report.json").read_bytes()
    assert (a / "report.html").read_bytes() == (b / "report.html").read_bytes()
    assert (a / "decisions.jsonl").read_bytes() == (b / "decisions.jsonl").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == [
        "decisions.jsonl",
        "pending_decisions.jsonl",
        "report.html",
        "report.json",
        "timing.json",
    ]
    timing = orjson.loads((a / "timing.json").read_bytes())
    assert timing["elapsed_s"] > 0 and timing["events_per_second"] > 0
    report = orjson.loads((a / "report.json").read_bytes())
    assert report["input"]["file"] == "sim.jsonl" and len(report["input"]["sha256"]) == 64
    assert str(tmp_path) not in (a / "report.json").read_text()
    assert "events/s" in capsys.readouterr().out


def test_the_decision_log_is_what_ope_reads(files: dict[str, Path], tmp_path: Path) -> None:
    assert backtest(files, tmp_path) == 0
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    with (tmp_path / "decisions.jsonl").open("rb") as handle:
        log = read_decision_log(handle)
    assert not log.bad and len(log.records) == report["decisions"] - report["pending_decisions"]
    pending = (tmp_path / "pending_decisions.jsonl").read_bytes().splitlines()
    assert len(pending) == report["pending_decisions"]
    assert all(orjson.loads(line)["reward"] is None for line in pending)
    explorer = report["campaigns"]["explorer"]
    assert explorer["ope"]["records"] > 0
    targets = {t["target"]: t for t in explorer["ope"]["targets"]}
    assert set(targets) == {"constant:0", "constant:5", "constant:10", "constant:15", "constant:20"}
    assert targets["constant:0"]["snips"]["value"] is not None
    threshold = next(c for k, c in report["campaigns"].items() if k != "explorer")
    assert threshold["ope"] is None and "no exploration" in threshold["ope_reason"]


def test_several_campaign_files_are_keyed_by_file_stem(
    files: dict[str, Path], tmp_path: Path
) -> None:
    code = backtest(files, tmp_path, "--campaigns", str(files["second"]))
    assert code == 0
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert sorted(report["campaigns"]) == sorted(
        [
            'first/cart <b>&</b> "savers"',
            "first/explorer",
            "second/plain",
            "second/explorer",
        ]
    )
    # Each file runs in its own engine: the pair gives what each file gives alone.
    args = ["backtest", "--in", str(files["events"]), "--campaigns", str(files["second"])]
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    alone = orjson.loads((tmp_path / "alone" / "report.json").read_bytes())
    for name, section in alone["campaigns"].items():
        paired = report["campaigns"][f"second/{name}"]
        assert paired["campaign_set"] == "second" and section["campaign_set"] is None
        assert {**paired, "campaign_set": None} == section


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (
            lambda f, t: ["--in", str(t / "missing.jsonl"), "--campaigns", str(f["first"])],
            "does not exist",
        ),
        (
            lambda f, t: ["--in", str(f["events"]), "--campaigns", str(t / "nope.toml")],
            "cannot read",
        ),
        (
            lambda f, t: ["--in", str(f["events"]), "--campaigns", str(t / "bad.toml")],
            "not valid TOML",
        ),
        (
            lambda f, t: [
                "--in",
                str(f["events"]),
                "--campaigns",
                str(f["first"]),
                "--campaigns",
                str(f["first"]),
            ],
            "two campaigns files",
        ),
        (
            lambda f, t: ["--in", str(t / "empty.jsonl"), "--campaigns", str(f["first"])],
            "no valid events",
        ),
        (
            lambda f, t: ["--in", str(t / "junk.csv"), "--campaigns", str(f["first"])],
            "cannot tell the format",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make_args: Any,
    message: str,
) -> None:
    (tmp_path / "bad.toml").write_text("[[campaign]\nname=", "utf-8")
    (tmp_path / "empty.jsonl").write_text('{"event_id": "x"}\n', "utf-8")
    (tmp_path / "junk.csv").write_text("a;b;c\n", "utf-8")
    code = main(["backtest", *make_args(files, tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dealstream: ") and message in err, err


def test_out_must_be_a_directory(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "file"
    target.write_text("x", "utf-8")
    assert backtest(files, target) == 2
    assert "not a directory" in capsys.readouterr().err


def test_html_is_self_contained_escaped_and_has_every_plot(
    files: dict[str, Path], tmp_path: Path
) -> None:
    assert backtest(files, tmp_path) == 0
    page = (tmp_path / "report.html").read_text("utf-8")
    assert "<script" not in page and "http" not in page and " src=" not in page
    assert "<b>" not in page and "cart &lt;b&gt;&amp;&lt;/b&gt; &quot;savers&quot;" in page
    for plot_id in PLOT_IDS:
        svg = re.search(f'<svg id="{plot_id}"[^>]*>(.*?)</svg>', page, re.S)
        assert svg is not None, plot_id
        assert "<title>" in svg.group(1)
        marks = len(re.findall(r'class="(?:series|dot|bar)"', svg.group(1)))
        assert marks > 0, plot_id


def test_extra_sections_render_as_tables(files: dict[str, Path], tmp_path: Path) -> None:
    assert backtest(files, tmp_path) == 0
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    report["simulation"] = {
        "regret": [
            {"policy": "<profit>", "incremental_margin": 12.5, "oracle_margin": 20.0, "regret": 7.5}
        ]
    }
    page = render_html(report)
    section = page.split('<h2 id="section-simulation">', 1)[1]
    assert "<th" in section and "oracle_margin" in section and "&lt;profit&gt;" in section
    assert "7.5" in section
    assert render_html(report) == page
