"""report.html pieces: label layout without a browser, discount bins, header, escaping."""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.analysis.backtest.runner import run_backtest
from engine.analysis.reporting.html import render_html, report_title
from engine.analysis.reporting.plots import (
    MAX_DISCOUNT_BINS,
    MAX_DISCOUNT_LEVELS,
    binned_discounts,
    discount_bin_width,
    discount_plot,
)
from engine.analysis.reporting.report import build_report, dumps_report
from engine.analysis.reporting.svg import FONT_PX, LABEL_GAP_PX, text_width, thin_labels
from engine.analysis.simulation.world import open_loop
from engine.campaigns import parse_campaigns
from engine.events import parse_event
from engine.pipeline import EngineConfig


def test_text_width_is_on_the_wide_side_of_dejavu_sans() -> None:
    # DejaVu Sans advance widths (em): digits 0.636, % 0.950, space 0.318, m 0.974.
    assert text_width("0123456789") >= 10 * 0.636 * FONT_PX
    assert text_width("100 %") >= (3 * 0.636 + 0.318 + 0.950) * FONT_PX
    assert text_width("mmm") >= 3 * 0.974 * FONT_PX
    assert text_width("ä") == FONT_PX  # outside ASCII: a full em


def extents(
    positions: list[float], labels: list[str], shown: list[bool]
) -> list[tuple[float, float]]:
    return [
        (x - text_width(label) / 2, x + text_width(label) / 2)
        for x, label, keep in zip(positions, labels, shown, strict=True)
        if keep
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 2000), st.text("0123456789.% -abcmw", min_size=1, max_size=12)),
        min_size=1,
        max_size=80,
    )
)
def test_thinned_labels_never_overlap(ticks: list[tuple[float, str]]) -> None:
    ticks.sort()
    positions, labels = [t[0] for t in ticks], [t[1] for t in ticks]
    shown = thin_labels(positions, labels)
    assert shown[0]
    boxes = extents(positions, labels, shown)
    assert all(b[0] - a[1] >= LABEL_GAP_PX for a, b in pairwise(boxes))


def test_few_labels_are_all_kept() -> None:
    assert thin_labels([100.0, 200.0, 300.0], ["5 %", "10 %", "15 %"]) == [True] * 3


def distribution(levels: list[float]) -> list[dict[str, Any]]:
    return [{"discount_pct": 0.0, "count": 50}] + [
        {"discount_pct": level, "count": 1 + index % 3} for index, level in enumerate(levels)
    ]


def test_many_distinct_discounts_become_a_histogram() -> None:
    ladder = [5.0, 10.0, 15.0, 20.0]
    assert discount_bin_width(ladder) is None
    linear = [round(0.01 * i, 2) for i in range(1, 3001)]  # 0.01 .. 30.00
    width = discount_bin_width(linear)
    assert width == 2.0 and len(linear) > MAX_DISCOUNT_LEVELS  # 16 bins of 2 points
    binned = binned_discounts(distribution(linear), width)
    assert len(binned) <= MAX_DISCOUNT_BINS
    assert sum(binned.values()) == sum(d["count"] for d in distribution(linear)[1:])
    assert binned[10.0] == sum(1 + i % 3 for i, v in enumerate(linear) if 10.0 <= v < 12.0)
    wide = discount_bin_width([0.5 * i for i in range(1, 200)])  # 0.5 .. 99.5
    assert wide == 5.0


def x_labels(svg: str) -> list[tuple[float, str]]:
    return [
        (float(x), text)
        for x, text in re.findall(r'<text class="tick-x" x="([\d.]+)"[^>]*>([^<]*)</text>', svg)
    ]


@pytest.mark.parametrize("count", [3, 12, 13, 400, 3000])
def test_discount_axis_labels_do_not_overlap_at_any_number_of_levels(count: int) -> None:
    levels = [round(30.0 * (i + 1) / count, 2) for i in range(count)]
    campaigns = {
        "linear": {"discount_distribution": distribution(levels)},
        "profit": {"discount_distribution": distribution([5.0, 10.0, 15.0, 20.0])},
    }
    svg = discount_plot(campaigns)
    labels = x_labels(svg)
    assert 2 <= len(labels) <= 31
    boxes = [(x - text_width(t) / 2, x + text_width(t) / 2) for x, t in labels]
    assert all(b[0] - a[1] >= LABEL_GAP_PX for a, b in pairwise(boxes))
    assert svg.count('class="bar"') <= 2 * max(count, 31)


CAMPAIGNS = {
    "campaign": [
        {
            "name": 'cart <b>&</b> "savers"',
            "policy": "profit",
            "epsilon": 0.3,
            "max_discount_pct": 20,
            "triggers": ["view", "cart"],
            "decision_interval_s": 300,
            "holdout": 0.2,
            "max_disparity": 1.2,
        },
        {
            "name": "linear",
            "policy": "linear",
            "a": 40,
            "b": 0,
            "max_discount_pct": 30,
            "triggers": ["view", "cart"],
            "decision_interval_s": 300,
        },
    ]
}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    events = [parse_event(e) for e in open_loop(users=60, events=2500, seed=4, mean_gap_ms=4000)]
    result = run_backtest(
        events,
        parse_campaigns(CAMPAIGNS),
        seed=1,
        config=EngineConfig(attribution_window_ms=1_800_000),
    )
    inputs = {"file": "a&b.jsonl", "sha256": "ab" * 32, "format": "jsonl"}
    return dict(orjson.loads(dumps_report(build_report(result, inputs=inputs))))


def test_title_names_the_file_or_the_simulated_world() -> None:
    assert report_title({"input": {"file": "events.jsonl"}}) == "dealstream backtest: events.jsonl"
    simulated = {"input": {"simulated": {"users": 300, "events": 20000, "seed": 7}}}
    assert report_title(simulated) == (
        "dealstream backtest: simulated world 300:20000 (users:events), seed 7"
    )
    assert report_title({}) == "dealstream backtest"


def test_page_escapes_every_string_exactly_once(report: dict[str, Any]) -> None:
    page = render_html(report)
    assert "&amp;#" not in page and "&amp;amp;" not in page and "&amp;lt;" not in page
    assert "<b>" not in page and "cart &lt;b&gt;&amp;&lt;/b&gt; &quot;savers&quot;" in page
    assert "<title>dealstream backtest: a&amp;b.jsonl</title>" in page
    assert f"sha256 {'ab' * 32}" in page
    missing = render_html({**report, "input": {}})
    assert "sha256 &#8211;" in missing


def test_page_leads_with_the_verdict_and_says_what_to_set(report: dict[str, Any]) -> None:
    page = render_html(report)
    assert page.index('id="verdict"') < page.index('id="campaigns"')
    linear = report["campaigns"]["linear"]
    assert linear["uplift"] is None and "`holdout = 0.1`" in linear["reason"]
    power_table = page.split('id="power"', 1)[1].split("</table>", 1)[0]
    assert "no holdout" in power_table and "<code>holdout = " in power_table
    qini = report["campaigns"][CAMPAIGNS["campaign"][0]["name"]]["qini"]
    assert qini["method"] == "ipw" and qini["auuc"] is not None
    assert "deterministic" in report["campaigns"]["linear"]["qini"]["reason"]


def test_fairness_flags_reach_the_warnings_and_the_page(report: dict[str, Any]) -> None:
    key = CAMPAIGNS["campaign"][0]["name"]
    fairness = report["campaigns"][key]["fairness"]
    assert fairness["max_disparity"] == 1.2
    assert report["campaigns"]["linear"]["fairness"]["flagged"] == []
    for name in fairness["flagged"]:
        assert any(
            w.startswith(f"{key}: offer-rate disparity across {name}") for w in report["warnings"]
        )
    page = render_html(report)
    assert 'id="fairness"' in page
    assert page.count("above max_disparity</span>") == len(fairness["flagged"])
