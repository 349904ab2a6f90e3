"""Tiny inline-SVG charts for the backtest report: axes, lines, points, bars, legends.

Pure string building with fixed number formatting, so the page is a deterministic function of
its data. Every text that may come from input is HTML-escaped here.

The page has no JavaScript, so text cannot be measured where it is drawn: ``text_width``
estimates a label's width from its characters, on the wide side, and axis labels that would
overlap by that estimate are left out (their tick marks stay); legends wrap onto new rows.
The browser test measures the rendered boxes and checks both the estimate and the layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from itertools import pairwise

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 560, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 24, 28, 44
FONT_PX = 11.0
"""Font size of every label but the title (``svg.plot`` in the page's CSS)."""
TITLE_PX = 13.0
LABEL_GAP_PX = 6.0
"""Least free space between two neighbouring tick labels."""
LEGEND_ROW_PX = 15
_NARROW = frozenset(" .,:;'|!ijlI()[]")
_WIDE = frozenset("mwMW%@")


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def fmt(value: float) -> str:
    """A coordinate with two decimals (stable text for identical inputs)."""
    return f"{value:.2f}"


def text_width(text: str, font_px: float = FONT_PX, *, bold: bool = False) -> float:
    """Width of ``text`` in pixels, estimated on the wide side of common sans-serif fonts.

    Per character, in ems: narrow punctuation 0.4, digits and lower case 0.66, upper case
    0.8, m, w, M, W, % and anything outside ASCII 1.0 (DejaVu Sans, Chromium's fallback on
    Debian, measures 0.64 for digits and 0.95 for %); bold adds 10 %.
    """
    ems = 0.0
    for char in text:
        if char in _NARROW:
            ems += 0.4
        elif char in _WIDE or not char.isascii():
            ems += 1.0
        elif char.isupper():
            ems += 0.8
        else:
            ems += 0.66
    return ems * font_px * (1.1 if bold else 1.0)


def thin_labels(positions: Sequence[float], labels: Sequence[str]) -> list[bool]:
    """Which of evenly or unevenly spaced axis labels to draw so that none overlap.

    Keeps every k-th label for the smallest k at which every kept pair of neighbours is
    ``LABEL_GAP_PX`` apart by ``text_width``; the first label is always kept.
    """
    count = len(labels)
    half = [text_width(label) / 2 for label in labels]
    for stride in range(1, count + 1):
        kept = list(range(0, count, stride))
        if all(
            positions[b] - half[b] - (positions[a] + half[a]) >= LABEL_GAP_PX
            for a, b in pairwise(kept)
        ):
            return [index % stride == 0 for index in range(count)]
    return [index == 0 for index in range(count)]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def tick_label(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}" if value == round(value, 3) else f"{value:.3g}"


@dataclass(slots=True)
class Chart:
    """One plot: data ranges map to the inner area; marks are appended as SVG elements.

    Text classes (the browser test finds them): ``chart-title``, ``tick-x``, ``tick-y``,
    ``axis``, ``legend``, ``empty``.
    """

    chart_id: str
    title: str
    x_label: str
    y_label: str
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    x_ticks: Sequence[tuple[float, str]] | None = None
    marks: list[str] = field(default_factory=list)
    legend: list[tuple[str, str, bool]] = field(default_factory=list)
    width: int = WIDTH

    def x(self, value: float) -> float:
        low, high = self.x_range
        span = (high - low) or 1.0
        return MARGIN_LEFT + (value - low) / span * (self.width - MARGIN_LEFT - MARGIN_RIGHT)

    def y(self, value: float) -> float:
        low, high = self.y_range
        span = (high - low) or 1.0
        return HEIGHT - MARGIN_BOTTOM - (value - low) / span * (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM)

    def line(
        self, points: Sequence[tuple[float, float]], stroke: str, *, dashed: bool = False
    ) -> None:
        if not points:
            return
        coords = " ".join(f"{fmt(self.x(px))},{fmt(self.y(py))}" for px, py in points)
        dash = ' stroke-dasharray="5 4"' if dashed else ""
        css = "ref" if dashed else "series"
        self.marks.append(
            f'<polyline class="{css}" points="{coords}" fill="none" stroke="{stroke}"'
            f' stroke-width="2"{dash}/>'
        )

    def point(self, px: float, py: float, fill: str, radius: float = 4.0, tip: str = "") -> None:
        title = f"<title>{escape(tip)}</title>" if tip else ""
        self.marks.append(
            f'<circle class="dot" cx="{fmt(self.x(px))}" cy="{fmt(self.y(py))}"'
            f' r="{fmt(radius)}" fill="{fill}">{title}</circle>'
        )

    def bar(self, x0: float, x1: float, value: float, fill: str, tip: str = "") -> None:
        top, base = self.y(max(value, 0.0)), self.y(min(value, 0.0) if value < 0 else 0.0)
        title = f"<title>{escape(tip)}</title>" if tip else ""
        self.marks.append(
            f'<rect class="bar" x="{fmt(self.x(x0))}" y="{fmt(top)}"'
            f' width="{fmt(max(self.x(x1) - self.x(x0), 1.0))}"'
            f' height="{fmt(max(base - top, 0.5))}"'
            f' fill="{fill}">{title}</rect>'
        )

    def add_legend(self, label: str, stroke: str, dashed: bool = False) -> None:
        self.legend.append((label, stroke, dashed))

    def _axes(self) -> list[str]:
        parts: list[str] = []
        left, right = MARGIN_LEFT, self.width - MARGIN_RIGHT
        top, bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
        parts.append(
            f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"'
            ' fill="#fafafa" stroke="#ccc"/>'
        )
        for value in nice_ticks(*self.y_range):
            py = fmt(self.y(value))
            parts.append(f'<line x1="{left}" y1="{py}" x2="{right}" y2="{py}" stroke="#e3e3e3"/>')
            parts.append(
                f'<text class="tick-y" x="{left - 6}" y="{py}" text-anchor="end"'
                f' dominant-baseline="middle">{escape(tick_label(value))}</text>'
            )
        x_ticks = self.x_ticks
        if x_ticks is None:
            x_ticks = [(v, tick_label(v)) for v in nice_ticks(*self.x_range)]
        positions = [self.x(value) for value, _ in x_ticks]
        shown = thin_labels(positions, [label for _, label in x_ticks])
        for px, (_, label), show in zip(positions, x_ticks, shown, strict=True):
            parts.append(
                f'<line x1="{fmt(px)}" y1="{bottom}" x2="{fmt(px)}" y2="{bottom + 4}"'
                ' stroke="#888"/>'
            )
            if show:
                parts.append(
                    f'<text class="tick-x" x="{fmt(px)}" y="{bottom + 16}"'
                    f' text-anchor="middle">{escape(label)}</text>'
                )
        parts.append(
            f'<text x="{(left + right) / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle"'
            f' class="axis">{escape(self.x_label)}</text>'
        )
        parts.append(
            f'<text x="14" y="{(top + bottom) / 2:.0f}" text-anchor="middle" class="axis"'
            f' transform="rotate(-90 14 {(top + bottom) / 2:.0f})">'
            f"{escape(self.y_label)}</text>"
        )
        return parts

    def _legend(self) -> list[str]:
        """Entries left to right, wrapping onto a new row before the plot's right edge."""
        parts: list[str] = []
        start, limit = MARGIN_LEFT + 8.0, self.width - MARGIN_RIGHT - 4.0
        x, row = start, 0
        for label, stroke, dashed in self.legend:
            entry = 22 + text_width(label) + 12
            if x > start and x + entry > limit:
                x, row = start, row + 1
            y = MARGIN_TOP + 12 + row * LEGEND_ROW_PX
            dash = ' stroke-dasharray="5 4"' if dashed else ""
            parts.append(
                f'<line x1="{fmt(x)}" y1="{y}" x2="{fmt(x + 18)}" y2="{y}"'
                f' stroke="{stroke}" stroke-width="3"{dash}/>'
            )
            parts.append(
                f'<text class="legend" x="{fmt(x + 22)}" y="{y}" dominant-baseline="middle">'
                f"{escape(label)}</text>"
            )
            x += entry
        return parts

    def render(self, empty_note: str | None = None) -> str:
        body = [*self._axes(), *self.marks, *self._legend()]
        if empty_note is not None:
            body.append(
                f'<text x="{self.width / 2:.0f}" y="{HEIGHT / 2:.0f}" text-anchor="middle"'
                f' class="empty">{escape(empty_note)}</text>'
            )
        title = escape(self.title)
        return (
            f'<svg id="{escape(self.chart_id)}" class="plot" role="img"'
            f' viewBox="0 0 {self.width} {HEIGHT}" width="{self.width}" height="{HEIGHT}"'
            ">"
            f"<title>{title}</title>"
            f'<text x="{MARGIN_LEFT}" y="16" class="chart-title">{title}</text>'
            + "".join(body)
            + "</svg>"
        )
