"""The report's plots as inline SVG, each a pure function of ``report.json`` sections.

Every plot is an ``<svg>`` with a stable id (``PLOT_IDS``) and a ``<title>``; data marks are
``polyline.series``, ``circle.dot`` and ``rect.bar`` elements, which the browser test counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from engine.analysis.reporting.svg import Chart, colour

PLOT_IDS = (
    "plot-calibration",
    "plot-discounts",
    "plot-budget-burn",
    "plot-qini",
    "plot-segment-offer-rate",
    "plot-segment-discount",
    "plot-calibration-served",
    "plot-fairness",
)
DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000
SEGMENT_WIDTH = 1136
"""Segment plots span the page: up to 16 segments side by side."""
MAX_DISCOUNT_LEVELS = 12
"""Up to this many distinct discounts get a bar each; more are binned into a histogram."""
MAX_DISCOUNT_BINS = 30
BIN_WIDTHS = (0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 25.0, 50.0, 100.0)


def calibration_plot(stats: Mapping[str, Any], chart_id: str, title: str) -> str:
    """Mean predicted P against the observed rate per calibration bin (dot area ~ labels)."""
    chart = Chart(
        chart_id,
        title,
        "mean predicted P(purchase)",
        "observed purchase rate",
        (0.0, 1.0),
        (0.0, 1.0),
    )
    chart.line([(0.0, 0.0), (1.0, 1.0)], "#999", dashed=True)
    bins = stats.get("calibration") or []
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


def discount_bin_width(levels: Sequence[float]) -> float | None:
    """None when each distinct discount can have its own bar, else the histogram's bin width:
    the smallest of ``BIN_WIDTHS`` giving at most ``MAX_DISCOUNT_BINS`` bins."""
    if len(levels) <= MAX_DISCOUNT_LEVELS:
        return None
    low, high = min(levels), max(levels)
    for width in BIN_WIDTHS:
        if math.floor(high / width) - math.floor(low / width) + 1 <= MAX_DISCOUNT_BINS:
            return width
    return BIN_WIDTHS[-1]


def discount_bin(discount: float, width: float) -> float:
    """The left edge of the bin [k w, (k + 1) w) holding ``discount``."""
    return math.floor(discount / width + 1e-9) * width


def binned_discounts(
    distribution: Sequence[Mapping[str, Any]], width: float | None
) -> dict[float, int]:
    """Offers (discount > 0) per distinct discount, or per bin's left edge."""
    counts: dict[float, int] = {}
    for d in distribution:
        if d["discount_pct"] > 0:
            key = d["discount_pct"] if width is None else discount_bin(d["discount_pct"], width)
            counts[key] = counts.get(key, 0) + d["count"]
    return counts


def discount_plot(campaigns: Mapping[str, Any]) -> str:
    """Offers per discount level, or a histogram when the policy offers many distinct ones
    (the linear policy's discounts are continuous)."""
    levels = sorted(
        {
            d["discount_pct"]
            for c in campaigns.values()
            for d in c["discount_distribution"]
            if d["discount_pct"] > 0
        }
    )
    width = discount_bin_width(levels)
    binned = {
        key: binned_discounts(c["discount_distribution"], width) for key, c in campaigns.items()
    }
    top = max((n for counts in binned.values() for n in counts.values()), default=1)
    slots = max(len(campaigns), 1)
    if width is None:
        chart = Chart(
            "plot-discounts",
            "Offers by discount",
            "discount %",
            "offers",
            (-0.5, len(levels) - 0.5),
            (0.0, top * 1.1),
            x_ticks=[(i, f"{v:g} %") for i, v in enumerate(levels)],
        )
        position = {level: i - 0.4 for i, level in enumerate(levels)}
        span = 0.8
    else:
        low, high = discount_bin(levels[0], width), discount_bin(levels[-1], width) + width
        chart = Chart(
            "plot-discounts",
            f"Offers by discount ({width:g}-point bins)",
            "discount % (bins include their left edge)",
            "offers",
            (low, high),
            (0.0, top * 1.1),
        )
        position = {edge: edge + width * 0.05 for counts in binned.values() for edge in counts}
        span = width * 0.9
    for index, (key, counts) in enumerate(binned.items()):
        chart.add_legend(key, colour(index))
        for level, count in sorted(counts.items()):
            x0 = position[level] + index * span / slots
            label = f"{level:g} %" if width is None else f"{level:g}-{level + width:g} %"
            chart.bar(x0, x0 + span / slots, count, colour(index), f"{key}: {label} x {count}")
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
    """Each campaign's Qini curve by served uplift score, with its random-targeting line."""
    curves = {k: c["qini"] for k, c in campaigns.items() if c["qini"]["points"]}
    values = [p[1] for q in curves.values() for p in q["points"]]
    low, high = min([*values, 0.0]), max([*values, 1.0])
    pad = (high - low) * 0.08
    chart = Chart(
        "plot-qini",
        "Qini curve (ranked by served uplift score)",
        "fraction of decisions targeted",
        "incremental conversions",
        (0.0, 1.0),
        (low - pad, high + pad),
    )
    for key, qini in curves.items():
        pts = qini["points"]
        colour_index = list(campaigns).index(key)
        chart.line([(p[0], p[1]) for p in pts], colour(colour_index))
        chart.line([(0.0, 0.0), (1.0, pts[-1][1])], colour(colour_index), dashed=True)
        chart.add_legend(f"{key} ({qini['method']})", colour(colour_index))
    if curves:
        chart.add_legend("random", "#999", dashed=True)
    return chart.render(None if curves else "no campaign has a Qini curve: see the table")


def fairness_plot(campaigns: Mapping[str, Any]) -> str:
    """Offer rate of new vs returning customers and of each activity quintile."""
    rows: dict[str, dict[str, float]] = {}
    for key, c in campaigns.items():
        dims = c["fairness"]["dimensions"]
        for s in [*dims["customer"]["segments"], *dims["activity"]["segments"]]:
            if s["offer_rate"] is not None:
                rows.setdefault(key, {})[s["segment"]] = s["offer_rate"] * 100
    order = ["new", "returning", "Q1", "Q2", "Q3", "Q4", "Q5"]
    names = [n for n in order if any(n in r for r in rows.values())]
    values = [v for r in rows.values() for v in r.values()]
    chart = Chart(
        "plot-fairness",
        "Offer rate by customer and activity quintile",
        "segment (non-holdout decisions; Q1 least active)",
        "offer rate %",
        (-0.5, len(names) - 0.5),
        (0.0, max([*values, 1.0]) * 1.1),
        x_ticks=list(enumerate(names)),
    )
    width = 0.8 / max(len(campaigns), 1)
    for index, key in enumerate(campaigns):
        chart.add_legend(key, colour(index))
        for name, rate in rows.get(key, {}).items():
            x0 = names.index(name) - 0.4 + index * width
            chart.bar(x0, x0 + width, rate, colour(index), f"{key} {name}: {rate:.3g} %")
    return chart.render(None if names else "no decisions")


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
