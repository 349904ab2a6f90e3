"""``report.html``: a self-contained page rendered from ``report.json`` alone.

Inline CSS and inline SVG, no JavaScript and nothing fetched, so it opens from a file, in a
mail attachment or in CI artefacts. Every string that comes from the report (campaign names,
file names, extra sections) is HTML-escaped. Plots carry stable ids: ``plot-calibration``,
``plot-discounts``, ``plot-budget-burn``, ``plot-qini``, ``plot-segment-offer-rate``,
``plot-segment-discount``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from engine.backtest.plots import (
    budget_plot,
    calibration_plot,
    discount_plot,
    qini_plot,
    segment_plot,
)

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
.warnings{background:#fff4e5;border:1px solid #f0b45a;padding:8px 8px 8px 28px}
h1{font-size:22px;margin:0 0 4px}h3{font-size:15px;margin:14px 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}
.meta{color:#555}.plots{display:flex;flex-wrap:wrap;gap:16px}
svg.plot{font-size:11px;border:1px solid #eee;background:#fff}
svg .chart-title{font-size:13px;font-weight:600}svg .axis{fill:#444}svg .empty{fill:#999}
.note{color:#666;font-size:12px;max-width:1150px}
#ope td{white-space:nowrap}#ope td:last-child{white-space:normal;max-width:460px;
font-size:12px;text-align:left}
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&#8211;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return escape(str(value))


def _pct(value: Any) -> str:
    return "&#8211;" if value is None else f"{100 * float(value):.2f} %"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], table_id: str = "") -> str:
    attr = f' id="{escape(table_id)}"' if table_id else ""
    head = "".join(
        f'<th class="{"l" if i == 0 else ""}">{escape(h)}</th>' for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i == 0 else ""}">{cell}</td>' for i, cell in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def _with_ci(value: Any, ci: Any) -> str:
    text = _pct(value)
    return f"{text} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else text


def _campaign_rows(campaigns: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, c in campaigns.items():
        # Intervals over users (decisions of one user are not independent); see docs.
        uplift = _with_ci(c.get("uplift"), (c.get("uplift_by_user") or {}).get("ci95"))
        itt = c.get("itt") or {}
        margin = (
            _num(c.get("incremental_margin"))
            if c.get("incremental_margin") is not None
            else escape(str(c["reason"]))
            if c.get("reason")
            else "&#8211;"
        )
        rows.append(
            [
                escape(key),
                escape(str(c.get("policy"))),
                _num(c.get("decisions")),
                _num(c.get("offers")),
                _pct(c.get("offer_rate")),
                _pct(c.get("conversion_treated")),
                _pct(c.get("conversion_holdout")),
                uplift,
                _with_ci(itt.get("uplift"), (itt.get("uplift_by_user") or {}).get("ci95")),
                _num(c.get("spend")),
                _num(c.get("committed_spend")),
                margin,
                _num(itt.get("incremental_margin")),
                _num(c.get("pending", {}).get("total")),
            ]
        )
    return rows


def _generic(value: Any) -> str:
    """Render any JSON value: a list of objects as a table, an object as field/value rows,
    another list as comma-separated cells, a scalar as text."""
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            headers = list(dict.fromkeys(k for row in value for k in row))
            rows = [[_generic(row.get(h)) for h in headers] for row in value]
            return _table(headers, rows)
        return ", ".join(_generic(v) for v in value) if value else "&#8211;"
    if isinstance(value, Mapping):
        rows = [[escape(str(k)), _generic(v)] for k, v in value.items()]
        return _table(["field", "value"], rows)
    return _num(value)


def _interval(estimate: Mapping[str, Any] | None) -> str:
    if not estimate or estimate.get("value") is None:
        return "&#8211;"
    return f"{_pct(estimate['value'])} [{_pct(estimate['low'])}, {_pct(estimate['high'])}]"


def _ope_block(key: str, section: Mapping[str, Any]) -> str:
    """One campaign's constant-discount estimates as a table, or why there are none."""
    ope = section.get("ope")
    title = f"<h3>{escape(key)}</h3>"
    if not ope:
        return f'{title}<p class="note">{escape(str(section.get("ope_reason", "")))}</p>'
    rows = [
        [
            escape(str(t.get("target"))),
            _interval(t.get("ips")),
            _interval(t.get("snips")),
            _interval(t.get("dr")),
            _num(t.get("ess")),
            _num(t.get("supported")),
            escape(str(t.get("error") or "; ".join(t.get("warnings") or []) or "")),
        ]
        for t in ope.get("targets", [])
    ]
    note = (
        f'<p class="note">{_num(ope.get("records"))} labelled non-holdout decisions; logged '
        f"conversion {_pct(ope.get('logged_value'))}; 95 % bootstrap intervals "
        f"({_num(ope.get('n_bootstrap'))} resamples).</p>"
    )
    headers = ["target", "IPS", "SNIPS", "DR", "ESS", "supported", "warnings"]
    return title + note + _table(headers, rows)


def _warnings(warnings: object) -> str:
    if not isinstance(warnings, list) or not warnings:
        return ""
    items = "".join(f"<li>{escape(str(w))}</li>" for w in warnings)
    return f'<ul class="warnings" id="warnings">{items}</ul>'


def render_html(report: Mapping[str, Any]) -> str:
    """The page; a pure function of the report dict."""
    campaigns: Mapping[str, Any] = report.get("campaigns", {})
    model: Mapping[str, Any] = report.get("model", {})
    source = report.get("input", {})
    span = report.get("event_time", {})
    summary = _table(
        [
            "events",
            "decisions",
            "offers",
            "discount spend",
            "committed spend",
            "pending decisions",
            "input rate (events/s of event time)",
        ],
        [
            [
                _num(report.get("events")),
                _num(report.get("decisions")),
                _num(report.get("offers")),
                _num(report.get("discount_spend")),
                _num(report.get("committed_spend")),
                _num(report.get("pending_decisions")),
                _num(report.get("events_per_second")),
            ]
        ],
        "summary",
    )
    campaign_table = _table(
        [
            "campaign",
            "policy",
            "decisions",
            "offers",
            "offer rate",
            "conv. treated",
            "conv. holdout",
            "uplift [95 % CI]*",
            "ITT uplift [95 % CI]*",
            "spend",
            "committed",
            "incr. margin",
            "ITT incr. margin",
            "pending",
        ],
        _campaign_rows(campaigns),
        "campaigns",
    )
    served = model.get("served") or {}
    model_table = _table(
        ["scores", "labels", "AUC", "log loss", "ECE"],
        [
            [
                escape(name),
                _num(stats.get("n_labels")),
                _num(stats.get("auc")),
                _num(stats.get("log_loss")),
                _num(stats.get("ece")),
            ]
            for name, stats in (
                ("prequential (scored just before learning)", model),
                ("as served (P at decision time)", served),
            )
            if stats
        ],
        "model",
    )
    ope = "".join(_ope_block(key, section) for key, section in campaigns.items())
    known = {
        "report_version",
        "seed",
        "batch_size",
        "input",
        "events",
        "events_by_kind",
        "event_statuses",
        "event_time",
        "events_per_second",
        "decisions",
        "offers",
        "discount_spend",
        "committed_spend",
        "pending_decisions",
        "warnings",
        "model",
        "models",
        "campaigns",
    }
    extras = "".join(
        f'<h2 id="section-{escape(str(name))}">{escape(str(name))}</h2>{_generic(value)}'
        for name, value in report.items()
        if name not in known
    )
    plots = "".join(
        [
            discount_plot(campaigns),
            budget_plot(campaigns, span.get("first_ts")),
            qini_plot(campaigns),
            segment_plot(campaigns, "offer_rate"),
            segment_plot(campaigns, "mean_discount_pct"),
        ]
    )
    title = f"dealstream backtest: {source.get('file', 'input')}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(str(title))}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(str(title))}</h1>"
        f'<p class="meta">sha256 {escape(str(source.get("sha256", "&#8211;")))} · seed '
        f"{_num(report.get('seed'))} · event time {_num(span.get('span_s'))} s · "
        f"report v{_num(report.get('report_version'))}</p>"
        f"<h2>Summary</h2>{_warnings(report.get('warnings'))}{summary}"
        f"<h2>Campaigns</h2>{campaign_table}"
        '<p class="note">Conversion: a purchase within the attribution window labels the '
        "decision 1. Treated = non-holdout decisions with an offer; ITT = every non-holdout "
        "decision (offer or not) against the holdout; pending decisions are excluded from "
        "rates. *Intervals treat users as clusters. Spend = discount on converted offers; "
        "committed = what the ledger charged at issue time. See docs/backtest.md.</p>"
        f'<h2>Model</h2>{model_table}<div class="plots">{calibration_plot(model)}</div>'
        f'<h2>Offers, budget and uplift</h2><div class="plots">{plots}</div>'
        f'<h2>Off-policy evaluation</h2><div id="ope">{ope}</div>'
        f"{extras}</body></html>\n"
    )
