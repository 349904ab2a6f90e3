"""``dealstream ope``: table and JSON output, counts of bad lines, one-line errors (exit 2)."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import orjson
import pytest

from engine.analysis.ope.estimators import DEFAULT_BOOTSTRAP
from streams.cli import ope as ope_command
from streams.cli.main import main

LADDER = (0, 5, 10, 15, 20)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DEALSTREAM_"):
            monkeypatch.delenv(name)


def write_log(path: Path, n: int = 2000, *, bad: bool = True) -> None:
    rng = random.Random(1)
    lines = []
    for i in range(n):
        discount = rng.choice(LADDER)
        lines.append(
            orjson.dumps(
                {
                    "decision_id": f"d{i}",
                    "user_id": f"u{i}",
                    "campaign": "profit-ladder",
                    "features": {"cart_count_24h": i % 3},
                    "discount_pct": discount,
                    "propensity": 0.2,
                    "holdout": False,
                    "reward": int(rng.random() < 0.1 + discount / 100),
                }
            )
        )
    if bad:
        lines[3] = b"{broken"
        lines[7] = orjson.dumps({"discount_pct": 5, "propensity": 0.2})
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_default_bootstrap_agrees_with_the_engine() -> None:
    assert ope_command.DEFAULT_BOOTSTRAP == DEFAULT_BOOTSTRAP


def test_table_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "decisions.jsonl"
    write_log(log)
    assert main(["ope", "--log", str(log), "--target", "constant:10", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "2000 lines, 1998 valid" in out
    assert "1 invalid_json (lines 4)" in out and "1 missing_reward (lines 8)" in out
    for row in ("logged", "IPS", "SNIPS", "DR"):
        assert f"\n{row}" in out
    assert "target: constant:10" in out


def test_json_output_is_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "decisions.jsonl.gz"
    raw = tmp_path / "raw.jsonl"
    write_log(raw, bad=False)
    log.write_bytes(gzip.compress(raw.read_bytes()))
    args = ["ope", "--log", str(log), "--target", "constant:20", "--json", "--seed", "3"]
    assert main(args) == 0
    first = orjson.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert orjson.loads(capsys.readouterr().out) == first
    assert first["n"] == 2000 and first["log"]["bad"] == {} and first["seed"] == 3
    assert first["ips"]["low"] <= first["ips"]["value"] <= first["ips"]["high"]
    assert first["n_bootstrap"] == DEFAULT_BOOTSTRAP


def test_campaigns_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "decisions.jsonl"
    write_log(log, n=600, bad=False)
    toml = tmp_path / "target.toml"
    toml.write_text('[[campaign]]\nname = "profit-ladder"\npolicy = "profit"\nepsilon = 0.5\n')
    assert main(["ope", "--log", str(log), "--target", str(toml), "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["evaluated_by_campaign"] == {"profit-ladder": 600} and doc["defined"]


def test_undefined_estimate_exits_2_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "decisions.jsonl"
    write_log(log, n=300, bad=False)
    assert main(["ope", "--log", str(log), "--target", "constant:7", "--json"]) == 2
    captured = capsys.readouterr()
    assert orjson.loads(captured.out)["defined"] is False
    assert captured.err.count("\n") == 1 and "undefined" in captured.err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--target", "constant:10"], "cannot read decision log"),
        (["--target", "nonsense"], "unknown target"),
        (["--target", "constant:10", "--bootstrap", "0"], "--bootstrap must be at least 1"),
        ([], "--target is required"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    log = tmp_path / "decisions.jsonl"
    if "cannot read" not in fragment:
        write_log(log, n=50, bad=False)
    assert main(["ope", "--log", str(log), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_a_log_without_valid_lines_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "decisions.jsonl"
    log.write_text('{"discount_pct": 5}\nnot json\n')
    assert main(["ope", "--log", str(log), "--target", "constant:5"]) == 2
    err = capsys.readouterr().err
    assert "no valid decision" in err and "1 invalid_json (lines 2)" in err
    assert err.count("\n") == 1


def test_open_bandit_dir_must_look_right(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ope", "--open-bandit", str(tmp_path)]) == 2
    assert "is not an Open Bandit sample" in capsys.readouterr().err
