"""The closed loop on the command line: ``backtest --simulate`` and ``simulate --closed-loop``."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from engine.analysis.reporting.report import canonical
from streams.cli.main import main

PAPER = Path(__file__).resolve().parents[2] / "deploy" / "campaigns" / "paper.toml"
ORDER = ["profit", "threshold", "linear", "rules"]


def test_backtest_simulate_writes_a_report_with_the_regret_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bt"
    argv = ["backtest", "--simulate", "30:1500", "--campaigns", str(PAPER), "--out", str(out)]
    assert main([*argv, "--seed", "2"]) == 0
    report = orjson.loads((out / "report.json").read_bytes())
    simulation = report["simulation"]
    # The report rounds every float to 6 significant digits (the world's 1/6 too);
    # simulation.json keeps them exact.
    assert simulation == canonical(orjson.loads((out / "simulation.json").read_bytes()))
    assert [row["campaign"] for row in simulation["policies"]] == ORDER
    assert set(report["campaigns"]) == set(ORDER)  # each campaign's own closed loop
    assert report["input"]["simulated"]["users"] == 30
    html = (out / "report.html").read_text("utf-8")
    assert 'id="section-simulation"' in html and "regret_per_1000_decisions" in html
    printed = capsys.readouterr()
    assert "regret" in printed.out and "report.html" in printed.out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--campaigns", str(PAPER), "--out", "DIR"], "--in FILE or --simulate"),
        (["--simulate", "10", "--campaigns", str(PAPER), "--out", "DIR"], "USERS:EVENTS"),
        (["--simulate", "0:10", "--campaigns", str(PAPER), "--out", "DIR"], "positive"),
        (["--simulate", "a:b", "--campaigns", str(PAPER), "--out", "DIR"], "USERS:EVENTS"),
        (
            ["--simulate", "5:10", "--in", "x.jsonl", "--campaigns", str(PAPER), "--out", "DIR"],
            "--in FILE or --simulate",
        ),
    ],
)
def test_backtest_simulate_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    argv = [str(tmp_path / a) if a in ("DIR", "x.jsonl") else a for a in argv]
    assert main(["backtest", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_simulate_closed_loop_command_writes_the_simulation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--closed-loop",
            "--campaigns",
            str(PAPER),
            "--users",
            "30",
            "--events",
            "1500",
            "--seed",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    simulation = orjson.loads((out / "simulation.json").read_bytes())
    assert [row["campaign"] for row in simulation["policies"]] == [
        "profit",
        "threshold",
        "linear",
        "rules",
    ]
    printed = capsys.readouterr()
    assert "regret" in printed.out and "threshold" in printed.out
    assert "simulation.json" in printed.err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--closed-loop", "--out", "DIR"], "--campaigns"),
        (["--closed-loop", "--campaigns", "missing.toml", "--out", "DIR"], "cannot read"),
        (["--campaigns", str(PAPER), "--out", "x.jsonl"], "--closed-loop"),
        (["--closed-loop", "--campaigns", str(PAPER), "--kafka"], "--campaigns FILE and --out"),
        (
            ["--closed-loop", "--campaigns", str(PAPER), "--campaigns", str(PAPER), "--out", "D"],
            "unique",
        ),
        (["--closed-loop", "--campaigns", str(PAPER), "--users", "0", "--out", "DIR"], "user"),
    ],
)
def test_closed_loop_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    argv = [str(tmp_path / a) if a in ("DIR", "D", "missing.toml", "x.jsonl") else a for a in argv]
    assert main(["simulate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
