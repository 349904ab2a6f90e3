"""World variants on the command line (streams/cli/world_options.py): ``--world FILE`` and the
flags of ``simulate`` and ``backtest --simulate``, flags over the file, one-line errors, the world
recorded in the reports."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson
import pytest

from engine.analysis.simulation.params import WorldParams
from engine.analysis.simulation.world import open_loop
from engine.model.feedback import Feedback
from streams.cli.main import build_parser, main
from streams.cli.world_options import closed_loop_config, world_choice

ROOT = Path(__file__).resolve().parents[2]
WORLDS = ROOT / "deploy" / "worlds"
ONE_CAMPAIGN = """
[[campaign]]
name = "threshold"
policy = "threshold"
threshold = 0.5
discount_pct = 10
triggers = ["view", "cart"]
decision_interval_s = 600
cooldown_s = 3600
"""


@pytest.fixture
def campaigns(tmp_path: Path) -> Path:
    path = tmp_path / "one.toml"
    path.write_text(ONE_CAMPAIGN, "utf-8")
    return path


def write_world(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "world.toml"
    path.write_text(text, "utf-8")
    return path


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["simulate", "--out", "x.jsonl", *argv])


def test_no_world_flags_give_the_default_world_and_the_commands_defaults() -> None:
    choice = world_choice(parse())
    assert choice.params == WorldParams()
    assert (choice.mean_gap_ms, choice.margin) == (None, None)
    config = closed_loop_config(choice, users=5, events=10, seed=1, feedback=Feedback())
    assert (config.margin, config.mean_gap_ms, config.batch_size) == (0.3, 3000.0, 10)


def test_every_flag_sets_its_parameter() -> None:
    args = parse(
        *("--deal-seekers", "0.6", "--deal-seeker-sensitivity", "2:5", "--sensitivity", "0:0.5"),
        *("--propensity-beta", "2:4", "--propensity-cap", "0.8", "--cart-p", "0.3"),
        *("--favorite-p", "0.1", "--search-p", "0.2", "--session-end-p", "0.2"),
        *("--mean-gap-ms", "500", "--margin", "0.4"),
    )
    choice = world_choice(args)
    assert choice.params == WorldParams(
        deal_seekers=0.6,
        deal_seeker_sensitivity=(2.0, 5.0),
        sensitivity=(0.0, 0.5),
        propensity_beta=(2.0, 4.0),
        propensity_cap=0.8,
        cart_p=0.3,
        favorite_p=0.1,
        search_p=0.2,
        session_end_p=0.2,
    )
    config = closed_loop_config(
        choice, users=5, events=10, seed=1, feedback=Feedback(), batch_size=20
    )
    assert (config.margin, config.mean_gap_ms, config.batch_size) == (0.4, 500.0, 20)
    assert config.world == choice.params


def test_flags_override_the_file_and_the_file_overrides_the_defaults(tmp_path: Path) -> None:
    path = write_world(
        tmp_path,
        "[world]\ndeal_seekers = 0.6\ncart_p = 0.3\nmean_gap_ms = 800\nmargin = 0.25\n",
    )
    args = parse("--world", str(path), "--deal-seekers", "0.1", "--margin", "0.5")
    choice = world_choice(args)
    assert choice.params == WorldParams(deal_seekers=0.1, cart_p=0.3)
    assert (choice.mean_gap_ms, choice.margin) == (800.0, 0.5)
    # The old spelling of --mean-gap-ms still works.
    assert world_choice(parse("--gap-ms", "250")).mean_gap_ms == 250.0


def test_simulate_writes_the_default_world_unless_told_otherwise(tmp_path: Path) -> None:
    plain, variant = tmp_path / "plain.jsonl", tmp_path / "variant.jsonl"
    base = ["simulate", "--users", "30", "--events", "2000", "--seed", "3", "--out"]
    assert main([*base, str(plain)]) == 0
    expected = b"".join(
        orjson.dumps(event) + b"\n" for event in open_loop(users=30, events=2000, seed=3)
    )
    assert plain.read_bytes() == expected
    argv = [*base, str(variant), "--world", str(WORLDS / "no-deal-seekers.toml")]
    assert main([*argv, "--cart-p", "0.5", "--mean-gap-ms", "50"]) == 0
    params = WorldParams(deal_seekers=0.0, sensitivity=(0.0, 0.05), cart_p=0.5)
    stream = open_loop(users=30, events=2000, seed=3, mean_gap_ms=50.0, params=params)
    assert variant.read_bytes() == b"".join(orjson.dumps(event) + b"\n" for event in stream)


def test_closed_loop_simulate_records_the_world_it_ran(tmp_path: Path, campaigns: Path) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--closed-loop", "--campaigns", str(campaigns), "--out", str(out)]
    argv += ["--users", "30", "--events", "1500", "--world", str(WORLDS / "deal-seekers-60.toml")]
    assert main([*argv, "--margin", "0.35"]) == 0
    simulation = orjson.loads((out / "simulation.json").read_bytes())
    assert simulation["world"] == WorldParams(deal_seekers=0.6).as_dict()
    assert (simulation["margin"], simulation["mean_gap_ms"]) == (0.35, 3000.0)


def test_backtest_simulate_records_the_world_in_the_report(tmp_path: Path, campaigns: Path) -> None:
    out = tmp_path / "bt"
    argv = ["backtest", "--simulate", "30:1500", "--campaigns", str(campaigns), "--out", str(out)]
    assert main([*argv, "--deal-seekers", "0", "--sensitivity", "0:0.05"]) == 0
    report = orjson.loads((out / "report.json").read_bytes())
    recorded = report["simulation"]["world"]
    assert recorded["deal_seekers"] == 0.0 and recorded["sensitivity"] == [0.0, 0.05]
    assert report["input"]["simulated"]["world"] == recorded
    assert orjson.loads((out / "simulation.json").read_bytes())["world"] == (
        WorldParams(deal_seekers=0.0, sensitivity=(0.0, 0.05)).as_dict()
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--deal-seekers", "1.5"], "--deal-seekers must be within [0, 1], got 1.5"),
        (["--deal-seekers", "many"], "--deal-seekers takes a number, got 'many'"),
        (["--sensitivity", "0-1"], "--sensitivity takes two numbers LOW:HIGH"),
        (["--sensitivity", "2:1"], "--sensitivity must be two finite numbers low:high"),
        (["--propensity-beta", "0:6"], "--propensity-beta must be two finite numbers a:b"),
        (["--propensity-cap", "0"], "--propensity-cap must be within (0, 1]"),
        (["--cart-p", "0.95"], "--cart-p + favorite_p must be at most 1"),
        (["--search-p", "-1"], "--search-p must be within [0, 1]"),
        (["--session-end-p", "0.01"], "--session-end-p must be within [0.1, 1], got 0.01"),
        (["--world", "WORLD", "--favorite-p", "0.5"], "cart_p + --favorite-p must be at most 1"),
        (["--world", "BAD"], "cart_p must be within [0, 1], got 2.0"),
        (["--world", "missing.toml"], "cannot read world file"),
        (["--mean-gap-ms", "0"], "mean_gap_ms must be a positive number"),
        (["--mean-gap-ms", "soon"], "--mean-gap-ms takes a number"),
        (["--closed-loop", "--margin", "1.5", "--campaigns", "ONE"], "margin must be within"),
        (["--kafka", "--mean-gap-ms", "5"], "--mean-gap-ms does not apply to --kafka"),
    ],
)
def test_bad_world_values_are_one_line_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    campaigns: Path,
    argv: list[str],
    says: str,
) -> None:
    files = {
        "WORLD": write_world(tmp_path, "[world]\ncart_p = 0.6\n"),
        "BAD": tmp_path / "bad.toml",
        "missing.toml": tmp_path / "missing.toml",
        "ONE": campaigns,
    }
    files["BAD"].write_text("[world]\ncart_p = 2\n", "utf-8")
    argv = [str(files[a]) if a in files else a for a in argv]
    target = [] if "--kafka" in argv else ["--out", str(tmp_path / "out")]
    assert main(["simulate", "--users", "5", "--events", "10", *target, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--simulate", "5:10", "--deal-seekers", "2"], "--deal-seekers must be within [0, 1]"),
        (["--simulate", "5:10", "--margin", "0"], "margin must be within (0, 1]"),
        (["--in", "x.jsonl", "--deal-seekers", "0.5"], "--deal-seekers describes the simulated"),
        (["--in", "x.jsonl", "--world", "w.toml"], "--world describes the simulated world"),
    ],
)
def test_backtest_world_errors_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    campaigns: Path,
    argv: list[str],
    says: str,
) -> None:
    argv = [str(tmp_path / a) if a in ("x.jsonl", "w.toml") else a for a in argv]
    out = ["--campaigns", str(campaigns), "--out", str(tmp_path / "out")]
    assert main(["backtest", *argv, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
