"""The command line (streams/cli/): subcommands, one-line errors, the simulator."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from engine.events import parse_event
from streams.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[2]
UNREACHABLE = {
    "DEALSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    "DEALSTREAM_REDIS_URL": "redis://127.0.0.1:1/0",
    "DEALSTREAM_PSEUDONYM_KEY": "cli-test-pseudonym-key-0123456789",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DEALSTREAM_* variable of the caller leaks into a test."""
    for name in list(os.environ):
        if name.startswith("DEALSTREAM_"):
            monkeypatch.delenv(name)


def cli_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEALSTREAM_")}
    return {**base, **env}


#: ``python -m streams.cli ARGS`` runs with only the given DEALSTREAM_* variables set; they are
#: started together (each pays the Faust import) and awaited once per module.
SUBPROCESS_RUNS: dict[str, tuple[list[str], dict[str, str]]] = {
    "worker_unreachable": (["worker"], UNREACHABLE),
    "campaigns_missing": (["worker"], {**UNREACHABLE, "DEALSTREAM_CAMPAIGNS": "/nonexistent.toml"}),
    "kafka_unreachable": (["topics"], UNREACHABLE),
}


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cli_runs() -> dict[str, Finished]:
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "streams.cli", *args],
            cwd=REPO,
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env) in SUBPROCESS_RUNS.items()
    }
    finished: dict[str, Finished] = {}
    try:
        for name, process in started.items():
            stdout, stderr = process.communicate(timeout=60)
            finished[name] = Finished(process.returncode, stdout, stderr)
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    return finished


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    (line,) = lines
    assert line.startswith("dealstream: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in line
    return line


# -- the parser ---------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


def test_parser_lists_the_subcommands() -> None:
    parser = build_parser()
    names = set(subcommands(parser))
    assert {"worker", "simulate", "features", "forget"} <= names
    help_text = parser.format_help()
    for name in names:
        assert name in help_text


def test_help_exits_zero_and_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "worker" in out and "simulate" in out


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_simulate_needs_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--events", "5"])
    assert info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_simulate_arguments_are_typed() -> None:
    args = build_parser().parse_args(
        ["simulate", "--users", "20", "--events", "200", "--seed", "3", "--out", "x.jsonl"]
    )
    assert (args.users, args.events, args.seed, args.out) == (20, 200, 3, Path("x.jsonl"))


# -- one-line errors ----------------------------------------------------------------------------


def test_worker_with_unreachable_services_prints_one_line_and_returns_2(
    cli_runs: dict[str, Finished],
) -> None:
    result = cli_runs["worker_unreachable"]
    assert result.returncode == 2
    line = assert_one_line_error(result.stderr, "127.0.0.1:1")
    assert "make services" in line or "DEALSTREAM_" in line  # says what to do


def test_missing_campaigns_file_gives_a_one_line_error(cli_runs: dict[str, Finished]) -> None:
    result = cli_runs["campaigns_missing"]
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "/nonexistent.toml", "cannot read")


def test_unreachable_kafka_gives_a_one_line_error(cli_runs: dict[str, Finished]) -> None:
    result = cli_runs["kafka_unreachable"]
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "Kafka", "DEALSTREAM_KAFKA_BOOTSTRAP")


@pytest.mark.parametrize(
    ("name", "value"),
    [("HTTP_PORT", "abc"), ("HTTP_PORT", "70000"), ("LOG_LEVEL", "loud"), ("BATCH_MAX", "-1")],
)
def test_bad_setting_gives_a_one_line_error(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(f"DEALSTREAM_{name}", value)
    for variable, setting in UNREACHABLE.items():
        monkeypatch.setenv(variable, setting)
    assert main(["worker"]) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, f"DEALSTREAM_{name}")
    assert captured.out == ""


@pytest.mark.parametrize("command", [["worker"], ["forget", "u1"], ["features", "u1"]])
def test_no_pseudonym_key_is_a_one_line_error_that_says_what_to_do(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Privacy by default: nothing stores or looks up raw user ids unless told to."""
    for variable, setting in UNREACHABLE.items():
        if variable != "DEALSTREAM_PSEUDONYM_KEY":
            monkeypatch.setenv(variable, setting)
    assert main(command) == 2
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, "DEALSTREAM_PSEUDONYM_KEY", "DEALSTREAM_PSEUDONYMS=off")


# -- simulate -----------------------------------------------------------------------------------


def simulate(path: Path, seed: int = 3) -> int:
    return main(
        ["simulate", "--out", str(path), "--events", "200", "--users", "20", "--seed", str(seed)]
    )


def test_simulate_writes_valid_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "events.jsonl"
    assert simulate(path) == 0
    assert "200" in capsys.readouterr().err
    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = data.splitlines()
    assert len(lines) == 200
    events = [parse_event(orjson.loads(line)) for line in lines]
    assert len({e.event_id for e in events}) == 200
    assert len({e.user_id for e in events}) <= 20
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    assert {e.type for e in events} >= {"browse", "search"}


def test_simulate_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert simulate(first) == 0
    assert simulate(second) == 0
    assert simulate(other, seed=4) == 0
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()
