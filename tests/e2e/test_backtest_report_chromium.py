"""``dealstream backtest`` through the real CLI, then report.html in headless Chromium.

Chromium renders the page from a file (no server, nothing fetched); the DOM it dumps must
hold every plot with data marks, and its screenshot must show the series colours.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import orjson
import pytest

from engine.backtest.plots import PLOT_IDS
from engine.backtest.svg import PALETTE
from engine.simulator import generate

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next(
    (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))),
    None,
)
CAMPAIGNS = """
[[campaign]]
name = "paper-threshold"
policy = "threshold"
threshold = 0.5
discount_pct = 10
triggers = ["view", "cart"]
cooldown_s = 3600
daily_budget = 150.0
holdout = 0.2

[[campaign]]
name = "profit-ladder"
policy = "profit"
ladder = [0, 5, 10, 15, 20]
epsilon = 0.2
max_discount_pct = 20
triggers = ["cart", "view"]
cooldown_s = 3600
daily_budget = 150.0
holdout = 0.2
"""


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered rows of an 8-bit RGB/RGBA PNG (what Chromium writes)."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0
    bpp = 3 if colour_type == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            up_left = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[i] = (line[i] + predictor) & 0xFF
        rows.append(bytes(line) if bpp == 3 else bytes(b for j, b in enumerate(line) if j % 4 != 3))
        previous = line
    return width, height, rows


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            *("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
            *("--no-first-run", "--window-size=1280,2600", "--virtual-time-budget=5000"),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_backtest_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no Chromium (apt-get install chromium)")
    events = tmp_path / "sim.jsonl"
    with events.open("wb") as handle:
        # 20 s apart on average: 20,000 events span ~4.6 days, so budgets reset and the
        # two-hour attribution windows close.
        for event in generate(users=400, events=20_000, seed=3, mean_gap_ms=20_000):
            handle.write(orjson.dumps(event) + b"\n")
    campaigns = tmp_path / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS, "utf-8")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALSTREAM_")}
    env["DEALSTREAM_ATTRIBUTION_WINDOW_S"] = "7200"
    run = subprocess.run(
        [
            *(sys.executable, "-m", "streams.cli", "backtest", "--in", str(events)),
            *("--campaigns", str(campaigns), "--out", str(out), "--seed", "1"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "events/s" in run.stdout
    report = orjson.loads((out / "report.json").read_bytes())
    assert report["events"] == 20_000 and report["model"]["n_labels"] > 1000
    for section in report["campaigns"].values():
        assert section["offers"] > 0 and section["uplift"] is not None
        assert section["qini"]["points"] and section["budget_burn"]

    url = (out / "report.html").as_uri()
    dom = chromium("--dump-dom", url, cwd=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for plot_id in PLOT_IDS:
        match = re.search(f'<svg id="{plot_id}"[^>]*>(.*?)</svg>', html, re.S)
        assert match is not None, f"{plot_id} missing from the rendered DOM"
        assert re.search(r"<title>[^<]+</title>", match.group(1)), plot_id
        marks = re.findall(r'class="(?:series|dot|bar)"', match.group(1))
        assert len(marks) >= 2, f"{plot_id} has no data marks"
    assert html.count('<svg id="plot-') == len(PLOT_IDS)
    for key in report["campaigns"]:
        assert key in html

    screenshot = tmp_path / "backtest_report.png"
    shot = chromium(f"--screenshot={screenshot}", url, cwd=tmp_path)
    assert shot.returncode == 0, shot.stderr[-2000:]
    width, height, rows = read_png(screenshot.read_bytes())
    assert (width, height) == (1280, 2600)
    colours = {row[i : i + 3] for row in rows[::2] for i in range(0, len(row), 6)}  # 1 in 4
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    for hex_colour in PALETTE[:2]:  # the two campaigns' series colours are drawn
        rgb = bytes.fromhex(hex_colour[1:])
        assert rgb in colours, f"{hex_colour} not on the screenshot"
    kept = Path(os.environ.get("DEALSTREAM_TEST_ARTIFACTS", tmp_path))
    kept.mkdir(parents=True, exist_ok=True)
    if kept != tmp_path:
        shutil.copy(screenshot, kept / screenshot.name)
    print(f"backtest report screenshot: {kept / screenshot.name}")
