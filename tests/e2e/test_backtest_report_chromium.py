"""``dealstream backtest`` through the real CLI, then report.html in headless Chromium.

Chromium renders the page from a file (no server, nothing fetched). Two runs: a replayed
event file (three campaigns: one with a holdout and a tight ``max_disparity``, one exploring
profit policy, both with a stop-loss, one linear policy without a holdout whose discounts are
continuous) and a closed-loop simulated world. The dumped DOM must hold what an analyst
reads first (title, verdict, ranking, what to set where a figure is missing, the stop-losses,
both calibration curves, the Qini and fairness sections) and every plot with data marks. The
page has no JavaScript, so label overlap is measured on a test-only wrapper page: the report's
own SVGs plus a script that writes each text's ``getBBox()`` into the DOM. The screenshot is
kept as an artefact (``DEALSTREAM_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from itertools import combinations
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.analysis.reporting.plots import PLOT_IDS
from engine.analysis.reporting.svg import FONT_PX, PALETTE, TITLE_PX, text_width
from engine.analysis.simulation.world import open_loop

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = next(
    (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))),
    None,
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
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
max_disparity = 1.0
stop_loss = { window_h = 12, min_decisions = 100 }

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
stop_loss = { window_h = 12, min_decisions = 100 }

[[campaign]]
name = "linear-no-holdout"
policy = "linear"
a = 40
b = 0
max_discount_pct = 30
triggers = ["view", "cart"]
cooldown_s = 3600
"""
SIMULATED_CAMPAIGNS = """
[[campaign]]
name = "profit"
policy = "profit"
ladder = [0, 5, 10, 15, 20]
epsilon = 0.1
max_discount_pct = 30
triggers = ["view", "cart"]
decision_interval_s = 600
cooldown_s = 3600

[[campaign]]
name = "linear"
policy = "linear"
a = 20
b = 0
max_discount_pct = 30
triggers = ["view", "cart"]
decision_interval_s = 600
cooldown_s = 3600
"""
MEASURE = """
<pre id="result"></pre>
<script>
const out = {};
for (const svg of document.querySelectorAll("svg.plot")) {
  const box = svg.viewBox.baseVal;
  out[svg.id] = {width: box.width, height: box.height, texts: [...svg.querySelectorAll("text")]
    .map((t) => { const b = t.getBBox(); return {cls: t.getAttribute("class") || "",
      text: t.textContent, x: b.x, y: b.y, w: b.width, h: b.height,
      length: t.getComputedTextLength(), rotated: t.hasAttribute("transform")}; })};
}
document.getElementById("result").textContent = JSON.stringify(out);
</script>
"""
WINDOW = (1280, 4800)


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
            *("--no-first-run", f"--window-size={WINDOW[0]},{WINDOW[1]}"),
            "--virtual-time-budget=5000",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def dump_dom(page: Path) -> str:
    dom = chromium(
        "--run-all-compositor-stages-before-draw", "--dump-dom", page.as_uri(), cwd=page.parent
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALSTREAM_")}
    env["DEALSTREAM_ATTRIBUTION_WINDOW_S"] = "7200"
    run = subprocess.run(
        [sys.executable, "-m", "streams.cli", "backtest", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def file_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    events = root / "sim.jsonl"
    with events.open("wb") as handle:
        # 20 s apart on average: 20,000 events span ~4.2 days, so budgets reset and the
        # two-hour attribution windows close.
        for event in open_loop(users=400, events=20_000, seed=3, mean_gap_ms=20_000):
            handle.write(orjson.dumps(event) + b"\n")
    campaigns = root / "campaigns.toml"
    campaigns.write_text(CAMPAIGNS, "utf-8")
    out = root / "out"
    run = cli(
        "--in",
        str(events),
        "--campaigns",
        str(campaigns),
        "--out",
        str(out),
        "--seed",
        "1",
        cwd=REPO,
    )
    assert "events/s" in run.stdout
    return out


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("simulated")
    campaigns = root / "world.toml"
    campaigns.write_text(SIMULATED_CAMPAIGNS, "utf-8")
    out = root / "out"
    cli(
        "--simulate",
        "150:6000",
        "--campaigns",
        str(campaigns),
        "--out",
        str(out),
        "--seed",
        "1",
        cwd=REPO,
    )
    return out


def section(dom: str, element_id: str) -> str:
    """The markup of the element with ``element_id`` up to the end of its table or block."""
    match = re.search(f'<(\\w+)[^>]*id="{element_id}"[^>]*>(.*?)</\\1>', dom, re.S)
    assert match is not None, f"#{element_id} missing from the rendered DOM"
    return match.group(2)


def text_of(markup: str, sep: str = " ") -> str:
    """The text of some markup; ``sep`` replaces each tag."""
    return html.unescape(re.sub(r"<[^>]+>", sep, markup))


def test_file_report_reads_top_down_in_chromium(file_run: Path) -> None:
    report = orjson.loads((file_run / "report.json").read_bytes())
    assert report["events"] == 20_000 and report["model"]["n_labels"] > 1000
    assert "<script" not in (file_run / "report.html").read_text("utf-8")
    dom = dump_dom(file_run / "report.html")

    # Header: the file's name, its sha256 written once (no entity escaped twice).
    assert "&amp;#" not in dom and "&amp;amp;" not in dom
    assert "<title>dealstream backtest: sim.jsonl</title>" in dom
    meta = text_of(section(dom, "meta"))
    assert f"sha256 {report['input']['sha256']}" in meta and "campaigns.toml" in meta

    # The verdict comes first, with the ranking by ITT incremental margin.
    assert dom.index('id="verdict"') < dom.index('id="summary"') < dom.index('id="campaigns"')
    ranking = report["ranking"]
    assert ranking["basis"] == "holdout" and ranking["verdict"]
    assert text_of(section(dom, "verdict"), "") == ranking["verdict"].replace("`", "")
    ranked = text_of(section(dom, "ranking"))
    for key in report["campaigns"]:
        assert key in ranked
    measured = [row for row in ranking["rows"] if row["incremental_margin"] is not None]
    assert {row["campaign"] for row in measured} == {"paper-threshold", "profit-ladder"}
    assert all(row["ci95"][0] <= row["incremental_margin"] <= row["ci95"][1] for row in measured)

    # The campaign without a holdout says what to set and how large a holdout it needs.
    linear = report["campaigns"]["linear-no-holdout"]
    assert linear["uplift"] is None and "`holdout = 0.1`" in linear["reason"]
    power = linear["holdout_power"]
    assert power["labelled_needed"] > 0 and power["effect_source"].startswith("assumed")
    row = next(r for r in section(dom, "power").split("<tr>") if "linear-no-holdout" in r)
    assert "no holdout" in row and "<code>holdout = " in row
    qini_row = next(r for r in section(dom, "qini").split("<tr>") if "linear-no-holdout" in r)
    assert "deterministic" in qini_row and "<code>holdout = 0.1</code>" in qini_row

    # Qini by served uplift score: IPW for the exploring policy, holdout for the threshold.
    assert report["campaigns"]["profit-ladder"]["qini"]["method"] == "ipw"
    assert report["campaigns"]["paper-threshold"]["qini"]["method"] == "holdout"
    qini_svg = section(dom, "plot-qini")
    assert qini_svg.count('class="series"') == 2

    # The stop-loss section follows the campaigns: one row per campaign with a stop-loss.
    assert dom.index('id="campaigns"') < dom.index('id="section-stop-loss"')
    assert dom.index('id="section-stop-loss"') < dom.index('id="plot-calibration-served"')
    guarded = {k: c["stop_loss"] for k, c in report["campaigns"].items() if c["stop_loss"]}
    assert set(guarded) == {"paper-threshold", "profit-ladder"}
    stop_loss = section(dom, "stop-loss")
    assert stop_loss.count("<tr>") == 1 + 2 and "linear-no-holdout" not in stop_loss
    for key, found in guarded.items():
        row = next(r for r in stop_loss.split("<tr>") if key in r)
        assert ("stopped" if found["final"]["stopped"] else "active") in text_of(row)
        kept, omitted = len(found["transitions"]), found["transitions_omitted"]
        assert kept + omitted == found["transitions_total"]
        if found["transitions"]:
            assert f"{key}: stopped at" in text_of(section(dom, "stop-loss-transitions"), "")

    # Both calibration curves: as served (what decisions used) and prequential.
    served = section(dom, "plot-calibration-served")
    assert served.count('class="dot"') == len(report["model"]["served"]["calibration"]) > 1

    # Fairness: max_disparity 1.0 flags any difference, in the section and the warnings.
    fairness = report["campaigns"]["paper-threshold"]["fairness"]
    assert fairness["flagged"]
    assert "above max_disparity" in section(dom, "fairness")
    assert any("paper-threshold: offer-rate disparity" in w for w in report["warnings"])

    # The linear policy's many discounts are binned: a readable number of bars and labels.
    levels = {d["discount_pct"] for d in linear["discount_distribution"]}
    assert len(levels) > 100
    discounts = section(dom, "plot-discounts")
    assert "-point bins" in discounts and discounts.count('class="bar"') <= 3 * 30

    for plot_id in PLOT_IDS:
        svg = section(dom, plot_id)
        assert re.search(r"<title>[^<]+</title>", svg), plot_id
        marks = re.findall(r'class="(?:series|dot|bar)"', svg)
        assert len(marks) >= 2, f"{plot_id} has no data marks"
    assert dom.count('<svg id="plot-') == len(PLOT_IDS)


def overlaps(a: dict[str, Any], b: dict[str, Any], slack: float = 0.5) -> bool:
    return (
        a["x"] + slack < b["x"] + b["w"]
        and b["x"] + slack < a["x"] + a["w"]
        and a["y"] + slack < b["y"] + b["h"]
        and b["y"] + slack < a["y"] + a["h"]
    )


@pytest.mark.parametrize("run", ["file_run", "simulated_run"])
def test_no_plot_text_overlaps_or_leaves_its_plot(run: str, request: pytest.FixtureRequest) -> None:
    out: Path = request.getfixturevalue(run)
    page = (out / "report.html").read_text("utf-8")
    style = re.search(r"<style>.*?</style>", page, re.S)
    svgs = re.findall(r'<svg id="plot-.*?</svg>', page, re.S)
    assert style is not None and len(svgs) == len(PLOT_IDS)
    wrapper = out / "measure.html"  # test-only: the report itself stays script-free
    wrapper.write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8">{style.group(0)}</head><body>'
        + "".join(svgs)
        + MEASURE
        + "</body></html>",
        "utf-8",
    )
    dom = dump_dom(wrapper)
    boxes: dict[str, Any] = json.loads(html.unescape(section(dom, "result")))
    assert set(boxes) == set(PLOT_IDS)
    for plot_id, plot in boxes.items():
        texts = [t for t in plot["texts"] if not t["rotated"] and t["w"] > 0]
        assert any(t["cls"] == "tick-x" for t in texts), plot_id
        for t in texts:
            where = f"{plot_id}: {t['cls']} {t['text']!r}"
            assert t["x"] >= -0.5 and t["x"] + t["w"] <= plot["width"] + 0.5, where
            assert t["y"] >= -0.5 and t["y"] + t["h"] <= plot["height"] + 0.5, where
            # The Python estimate that laid the labels out is never narrower than the text.
            font = TITLE_PX if t["cls"] == "chart-title" else FONT_PX
            estimate = text_width(t["text"], font, bold=t["cls"] == "chart-title")
            assert estimate >= t["length"], f"{where}: estimated {estimate} < {t['length']}"
        for a, b in combinations(texts, 2):
            assert not overlaps(a, b), f"{plot_id}: {a['text']!r} overlaps {b['text']!r}"


def test_simulated_report_names_the_world_and_ranks_against_the_oracle(
    simulated_run: Path,
) -> None:
    report = orjson.loads((simulated_run / "report.json").read_bytes())
    dom = dump_dom(simulated_run / "report.html")
    title = "dealstream backtest: simulated world 150:6000 (users:events), seed 1"
    assert f"<title>{title}</title>" in dom and f"<h1>{title}</h1>" in dom
    assert "&amp;#" not in dom and "sha256 &#8211;" not in dom and "sha256 \u2013" not in dom
    simulation, ranking = report["simulation"], report["ranking"]
    assert ranking["basis"] == "simulation"
    assert ranking["baseline_margin"] == simulation["baseline"]["margin"]
    assert ranking["oracle_incremental_margin"] == simulation["oracle_incremental_margin"]
    best = max(simulation["policies"], key=lambda p: p["incremental_margin"])
    assert ranking["rows"][0]["campaign"] == best["campaign"]
    assert ranking["decision"] in {"run", "do_not_run", "inconclusive", "no_offers"}
    verdict = text_of(section(dom, "verdict"))
    assert best["campaign"] in verdict and ("oracle" in verdict or ranking["decision"] == "run")
    ranked = text_of(section(dom, "ranking"))
    assert "oracle" in ranked and "regret" in ranked
    for row in simulation["policies"]:
        assert f"{row['oracle_incremental_margin']:+,.2f}" in ranked
    note = text_of(dom.split('id="ranking"', 1)[0].rsplit('<p class="note">', 1)[1])
    assert f"{simulation['baseline']['margin']:,.2f}" in note


def test_screenshot_shows_the_plots(file_run: Path) -> None:
    screenshot = file_run / "backtest_report.png"
    shot = chromium(f"--screenshot={screenshot}", (file_run / "report.html").as_uri(), cwd=file_run)
    assert shot.returncode == 0, shot.stderr[-2000:]
    width, height, rows = read_png(screenshot.read_bytes())
    assert (width, height) == WINDOW
    colours = {row[i : i + 3] for row in rows[::2] for i in range(0, len(row), 6)}  # 1 in 4
    assert len(colours) > 50, "the screenshot is (nearly) blank"
    for hex_colour in PALETTE[:3]:  # the three campaigns' series colours are drawn
        rgb = bytes.fromhex(hex_colour[1:])
        assert rgb in colours, f"{hex_colour} not on the screenshot"
    kept = Path(os.environ.get("DEALSTREAM_TEST_ARTIFACTS", file_run))
    kept.mkdir(parents=True, exist_ok=True)
    if kept != file_run:
        shutil.copy(screenshot, kept / screenshot.name)
    print(f"backtest report screenshot: {kept / screenshot.name}")
