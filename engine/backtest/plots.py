"""The report's plots as inline SVG, each a pure function of ``report.json`` sections.

Every plot is an ``<svg>`` with a stable id (``PLOT_IDS``) and a ``<title>``; data marks are
``polyline.series``, ``circle.dot`` and ``rect.bar`` elements, which the browser test counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.backtest.svg import Chart, colour

PLOT_IDS = (
    "plot-calibration",
    "plot-discounts",
    "plot-budget-burn",
    "plot-qini",
    "plot-segment-offer-rate",
    "plot-segment-discount",
)
DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
SEGMENT_WIDTH = 1136
"""Segment plots span the page: up to 16 segments side by side."""


def calibration_plot(model: Mapping[str, Any]) -> str:
    chart = Chart(
        "plot-calibration",
        "Calibration (prequential)",
        "mean predicted P(purchase)",
        "observed purchase rate",
        (0.0, 1.0),
        (0.0, 1.0),
    )
    chart.line([(0.0, 0.0), (1.0, 1.0)], "#999", dashed=True)
    bins = model.get("calibration") or []
    total = sum(b["count"] for b in bins) or 1
    chart.line([(b["p_mean"], b["rate"]) for b in bins], colour(0))
    for b in bins:
        radius = 3.0 + 9.0 * (b["count"] / total) ** 0.5
        chart.point(
            b["p_mean"],
            b["rate"],
            colour(0),
            radius,
            f"p={b['p_mean']:.3f} rate={b['rate']:.3f} n={b['count']}",
        )
    chart.add_legend("model", colour(0))
    chart.add_legend("perfect", "#999", dashed=True)
    return chart.render(None if bins else "no labels yet")


def discount_plot(campaigns: Mapping[str, Any]) -> str:
    levels = sorted(
        {
            d["discount_pct"]
            for c in campaigns.values()
            for d in c["discount_distribution"]
            if d["discount_pct"] > 0
        }
    )
    counts = [
        d["count"]
        for c in campaigns.values()
        for d in c["discount_distribution"]
        if d["discount_pct"] > 0
    ]
    chart = Chart(
        "plot-discounts",
        "Offers by discount",
        "discount %",
        "offers",
        (-0.5, len(levels) - 0.5),
        (0.0, max(counts, default=1) * 1.1),
        x_ticks=[(i, f"{v:g} %") for i, v in enumerate(levels)],
    )
    width = 0.8 / max(len(campaigns), 1)
    for index, (key, c) in enumerate(campaigns.items()):
        chart.add_legend(key, colour(index))
        for d in c["discount_distribution"]:
            if d["discount_pct"] > 0:
                x0 = levels.index(d["discount_pct"]) - 0.4 + index * width
                chart.bar(
                    x0,
                    x0 + width,
                    d["count"],
                    colour(index),
                    f"{key}: {d['discount_pct']:g} % x {d['count']}",
                )
    return chart.render(None if levels else "no offers")


def budget_plot(campaigns: Mapping[str, Any], first_ts: int | None) -> str:
    origin = first_ts or 0
    points = [p for c in campaigns.values() for p in c["budget_burn"]]
    budgets = [c["daily_budget"] for c in campaigns.values() if c.get("daily_budget")]
    top = max([p[2] for p in points] + budgets + [1.0]) * 1.3
    end = max([(p[1] - origin) / HOUR_MS for p in points] + [1.0])
    chart = Chart(
        "plot-budget-burn",
        "Budget burn (committed spend within each day)",
        "event time (hours since the first event)",
        "spend this day",
        (0.0, end),
        (0.0, top),
    )
    for index, (key, c) in enumerate(campaigns.items()):
        chart.add_legend(key, colour(index))
        by_day: dict[int, list[tuple[float, float]]] = {}
        for day, ts, spend in c["budget_burn"]:
            series = by_day.setdefault(day, [])
            if not series:
                start = max(day * DAY_MS, origin)
                series.append(((start - origin) / HOUR_MS, 0.0))
            series.append(((ts - origin) / HOUR_MS, spend))
        for series in by_day.values():
            chart.line(series, colour(index))
        if c.get("daily_budget"):
            chart.line(
                [(0.0, c["daily_budget"]), (end, c["daily_budget"])], colour(index), dashed=True
            )
    return chart.render(None if points else "no offers")


def qini_plot(campaigns: Mapping[str, Any]) -> str:
    curves = {k: c["qini"]["points"] for k, c in campaigns.items() if c["qini"]["points"]}
    values = [p[1] for pts in curves.values() for p in pts]
    low, high = min([*values, 0.0]), max([*values, 1.0])
    pad = (high - low) * 0.08
    chart = Chart(
        "plot-qini",
        "Qini curve (ranked by recorded P(purchase))",
        "fraction of decisions targeted",
        "incremental conversions",
        (0.0, 1.0),
        (low - pad, high + pad),
    )
    for index, (key, pts) in enumerate(curves.items()):
        colour_index = list(campaigns).index(key)
        chart.line([(p[0], p[1]) for p in pts], colour(colour_index))
        chart.line([(0.0, 0.0), (1.0, pts[-1][1])], colour(colour_index), dashed=True)
        chart.add_legend(key, colour(colour_index))
        del index
    if curves:
        chart.add_legend("random", "#999", dashed=True)
    return chart.render(None if curves else "needs labelled treated and holdout decisions")


def segment_plot(campaigns: Mapping[str, Any], field: str) -> str:
    names = sorted({s["segment"] for c in campaigns.values() for s in c["segments"]})
    values = [s[field] or 0.0 for c in campaigns.values() for s in c["segments"]]
    scale = 100.0 if field == "offer_rate" else 1.0
    title = "Offer rate by segment" if field == "offer_rate" else "Mean discount by segment"
    y_label = "offer rate %" if field == "offer_rate" else "mean discount % (offers)"
    chart_id = "plot-segment-offer-rate" if field == "offer_rate" else "plot-segment-discount"
    chart = Chart(
        chart_id,
        title,
        "segment (non-holdout decisions)",
        y_label,
        (-0.5, len(names) - 0.5),
        (0.0, max([*values, 0.01]) * scale * 1.1),
        x_ticks=[(i, _short(n)) for i, n in enumerate(names)],
        width=SEGMENT_WIDTH,
    )
    width = 0.8 / max(len(campaigns), 1)
    for index, (key, c) in enumerate(campaigns.items()):
        chart.add_legend(key, colour(index))
        for s in c["segments"]:
            if s[field] is not None:
                x0 = names.index(s["segment"]) - 0.4 + index * width
                chart.bar(
                    x0,
                    x0 + width,
                    s[field] * scale,
                    colour(index),
                    f"{key} {s['segment']}: {s[field] * scale:.3g} ({s['decisions']} dec.)",
                )
    return chart.render(None if names else "no decisions")


def _short(segment: str) -> str:
    """Axis label: ``customer:new`` -> ``new``, ``p_purchase:0.1-0.2`` -> ``p.1-.2``."""
    kind, _, value = segment.partition(":")
    return "p" + value.replace("0.", ".") if kind == "p_purchase" else value
