"""``report.html``: a self-contained page rendered from ``report.json`` alone.

Inline CSS and inline SVG, no JavaScript and nothing fetched, so it opens from a file, in a
mail attachment or in CI artefacts. Every string that comes from the report (campaign names,
file names, reasons, extra sections) is HTML-escaped exactly once, where it is put into the
page; fixed markup (dashes, arrows) is never passed through ``escape``. Plots carry the
stable ids of ``engine.analysis.reporting.plots.PLOT_IDS``.

The page reads top down the way an analyst decides: the verdict and the ranking first, then
what could not be measured and which setting fixes it, then the evidence (campaigns and their
stop-losses, model, offers, uplift ranking, fairness, off-policy estimates) and any extra
sections.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import Any

from engine.analysis.backtest.uplift import SUGGESTED_HOLDOUT
from engine.analysis.reporting.plots import (
    budget_plot,
    calibration_plot,
    discount_plot,
    fairness_plot,
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
td.why{text-align:left;font-size:12px;max-width:520px;color:#444}
td:first-child{white-space:nowrap}
.meta{color:#555;overflow-wrap:anywhere}.plots{display:flex;flex-wrap:wrap;gap:16px}
svg.plot{font-size:11px;border:1px solid #eee;background:#fff}
svg .chart-title{font-size:13px;font-weight:600}svg .axis{fill:#444}svg .empty{fill:#999}
.note{color:#666;font-size:12px;max-width:1150px}
.verdict{font-size:16px;font-weight:600;padding:8px 12px;margin:8px 0;max-width:1150px;
border-left:5px solid #999;background:#f5f5f5}.verdict.run{border-color:#2ca02c;
background:#eef7ee}.verdict.do_not_run,.verdict.no_offers{border-color:#d62728;
background:#fbeeee}.verdict.inconclusive,.verdict.unknown{border-color:#f0b45a;
background:#fff4e5}.flag{color:#b00;font-weight:600}
#ope td{white-space:nowrap}#ope td:last-child{white-space:normal;max-width:460px;
font-size:12px;text-align:left}
"""
DASH = "&#8211;"
"""What an absent figure shows (markup: never escaped again)."""


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return escape(str(value))


def _pct(value: Any) -> str:
    return DASH if value is None else f"{100 * float(value):.2f}&nbsp;%"


def _seconds(value: Any) -> str:
    """A duration: seconds, and hours or days when that reads better."""
    if value is None:
        return DASH
    seconds = float(value)
    text = f"{seconds:,.0f} s"
    if seconds >= 2 * 86400:
        return f"{text} ({seconds / 86400:.1f} days)"
    if seconds >= 2 * 3600:
        return f"{text} ({seconds / 3600:.1f} h)"
    return text


def _money(value: Any) -> str:
    return DASH if value is None else f"{float(value):+,.2f}"


def _text(value: Any) -> str:
    return DASH if value is None else escape(str(value))


def _prose(value: Any) -> str:
    """Escaped text whose `backticked` settings are shown as code."""
    if value is None:
        return DASH
    parts = escape(str(value)).split("`")
    if len(parts) % 2 == 0:  # unbalanced: leave the backticks as they are
        return "`".join(parts)
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    table_id: str = "",
    why: int | None = None,
) -> str:
    """A table of already-escaped cells; column ``why`` (an index) holds prose."""
    attr = f' id="{escape(table_id)}"' if table_id else ""
    head = "".join(
        f'<th class="{"l" if i in (0, why) else ""}">{escape(h)}</th>'
        for i, h in enumerate(headers)
    )

    def css(i: int) -> str:
        return "l" if i == 0 else "why" if i == why else ""

    body = "".join(
        "<tr>" + "".join(f'<td class="{css(i)}">{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def _with_ci(value: Any, ci: Any) -> str:
    text = _pct(value)
    return f"{text} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else text


def _money_ci(value: Any, ci: Any) -> str:
    text = _money(value)
    return f"{text} [{_money(ci[0])}, {_money(ci[1])}]" if value is not None and ci else text


def report_title(report: Mapping[str, Any]) -> str:
    """Names what was replayed: the input file, or the simulated world and its seed."""
    source = report.get("input") or {}
    simulated = source.get("simulated")
    if isinstance(simulated, Mapping):
        return (
            f"dealstream backtest: simulated world {simulated.get('users')}:"
            f"{simulated.get('events')} (users:events), seed {simulated.get('seed')}"
        )
    if source.get("file"):
        return f"dealstream backtest: {source['file']}"
    return "dealstream backtest"


def _campaign_files(source: Mapping[str, Any]) -> str:
    files = source.get("campaign_files") or []
    return ", ".join(
        f"{_text(f.get('file'))} (sha256 {_text(str(f.get('sha256', ''))[:12])}…)" for f in files
    )


def _header(report: Mapping[str, Any]) -> str:
    source: Mapping[str, Any] = report.get("input") or {}
    span = report.get("event_time") or {}
    simulated = source.get("simulated")
    parts: list[str] = []
    if isinstance(simulated, Mapping):
        gap = simulated.get("mean_gap_ms")
        parts.append(
            f"closed-loop simulation: mean gap {DASH if gap is None else f'{gap:,g}'} ms "
            f"between events, margin {_num(simulated.get('margin'))}"
        )
    else:
        parts.append(f"sha256 {_text(source.get('sha256'))}")
        if source.get("format"):
            parts.append(f"format {_text(source.get('format'))}")
        if source.get("attribution_window_s") is not None:
            parts.append(f"attribution window {_seconds(source.get('attribution_window_s'))}")
    if source.get("campaign_files"):
        parts.append(f"campaigns {_campaign_files(source)}")
    parts += [
        f"seed {_num(report.get('seed'))}",
        f"event time {_seconds(span.get('span_s'))}",
        f"report v{_num(report.get('report_version'))}",
    ]
    title = escape(report_title(report))
    return f'<h1>{title}</h1><p class="meta" id="meta">{" · ".join(parts)}</p>'


def _verdict(report: Mapping[str, Any]) -> str:
    ranking = report.get("ranking")
    if not isinstance(ranking, Mapping):
        return ""
    simulated = ranking.get("basis") == "simulation"
    headers = ["campaign", "policy", "offers", "incremental margin [95 % CI]"]
    if simulated:
        headers += ["oracle", "regret"]
    headers.append("note")
    rows = []
    for row in ranking.get("rows", []):
        cells = [
            _text(row.get("campaign")),
            _text(row.get("policy")),
            _num(row.get("offers")),
            _money_ci(row.get("incremental_margin"), row.get("ci95")),
        ]
        if simulated:
            regret = row.get("regret")
            cells += [
                _money(row.get("oracle_incremental_margin")),
                DASH if regret is None else f"{float(regret):,.2f}",
            ]
        cells.append(_prose(row.get("reason")) if row.get("reason") else "")
        rows.append(cells)
    baseline = ranking.get("baseline_margin")
    basis = f"Ranked by {_text(ranking.get('measure'))}."
    if baseline is not None:
        basis += (
            f" The no-offer world's margin is {_num(baseline)}; the best oracle earns "
            f"{_money(ranking.get('oracle_incremental_margin'))} on top of it."
        )
    decision = escape(str(ranking.get("decision")))
    return (
        f'<h2 id="section-verdict">Verdict</h2>'
        f'<p class="verdict {decision}" id="verdict">{_prose(ranking.get("verdict"))}</p>'
        f'<p class="note">{basis}</p>' + _table(headers, rows, "ranking", why=len(headers) - 1)
    )


def _warnings(warnings: object) -> str:
    if not isinstance(warnings, list) or not warnings:
        return ""
    items = "".join(f"<li>{_prose(w)}</li>" for w in warnings)
    return f'<ul class="warnings" id="warnings">{items}</ul>'


def _overview(report: Mapping[str, Any]) -> str:
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
    return f"<h2>Summary</h2>{_warnings(report.get('warnings'))}{summary}"


def _campaign_rows(campaigns: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, c in campaigns.items():
        # Intervals over users (decisions of one user are not independent); see docs.
        uplift = _with_ci(c.get("uplift"), (c.get("uplift_by_user") or {}).get("ci95"))
        itt = c.get("itt") or {}
        rows.append(
            [
                escape(key),
                _text(c.get("policy")),
                _num(c.get("holdout_fraction")),
                _num(c.get("decisions")),
                _num(c.get("offers")),
                _pct(c.get("offer_rate")),
                _pct(c.get("conversion_treated")),
                _pct(c.get("conversion_holdout")),
                uplift,
                _with_ci(itt.get("uplift"), (itt.get("uplift_by_user") or {}).get("ci95")),
                _num(c.get("spend")),
                _num(c.get("committed_spend")),
                _num(c.get("incremental_margin")),
                _money_ci(itt.get("incremental_margin"), itt.get("incremental_margin_ci95")),
                _num(c.get("pending", {}).get("total")),
            ]
        )
    return rows


def _suggested_holdout(share: float) -> str:
    """The ``holdout`` setting to write, rounded up to a hundredth."""
    return f"holdout = {math.ceil(share * 100 - 1e-9) / 100:g}"


def _power_advice(holdout: float, power: Mapping[str, Any]) -> str:
    """What to set, from the power estimate's fields (the long reasons stay in report.json)."""
    share, total = power.get("share_needed"), power.get("labelled_needed")
    if power.get("enough"):
        return "the holdout is large enough to resolve the effect"
    prefix = "no holdout: " if not holdout else "holdout too small: "
    if share is not None and share <= 0.5:
        return f"{prefix}set <code>{_suggested_holdout(share)}</code>"
    if total is not None:
        now = (power.get("labelled") or 0) + (power.get("holdout_labelled") or 0)
        return (
            f"{prefix}set <code>holdout = {_num(power.get('planned_holdout'))}</code> and run "
            f"longer: about {_num(total)} labelled decisions (this run has {_num(now)})"
        )
    fallback = (
        f"no holdout: set <code>holdout = {SUGGESTED_HOLDOUT:g}</code>; " if not holdout else ""
    )
    return f"{fallback}the size it needs cannot be estimated yet: {_prose(power.get('reason'))}"


def _power_rows(campaigns: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for key, c in campaigns.items():
        power = c.get("holdout_power") or {}
        effect = power.get("effect")
        rows.append(
            [
                escape(key),
                _num(c.get("holdout_fraction")),
                _num(power.get("holdout_labelled")),
                _pct(power.get("conversion")),
                DASH if effect is None else f"{_pct(effect)} ({_text(power.get('effect_source'))})",
                _num(power.get("design_effect"), 3),
                _num(power.get("holdout_needed")),
                _power_advice(float(c.get("holdout_fraction") or 0.0), power),
            ]
        )
    return rows


def _campaigns(report: Mapping[str, Any]) -> str:
    campaigns: Mapping[str, Any] = report.get("campaigns", {})
    table = _table(
        [
            "campaign",
            "policy",
            "holdout",
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
            "ITT incr. margin [95 % CI]*",
            "pending",
        ],
        _campaign_rows(campaigns),
        "campaigns",
    )
    power = _table(
        [
            "campaign",
            "holdout",
            "labelled holdout",
            "conversion",
            "effect to resolve",
            "design effect",
            "holdout decisions needed",
            "what to do",
        ],
        _power_rows(campaigns),
        "power",
        why=7,
    )
    return (
        f"<h2>Campaigns</h2>{table}"
        '<p class="note">Conversion: a purchase within the attribution window labels the '
        "decision 1. Treated = non-holdout decisions with an offer; ITT = every non-holdout "
        "decision (offer or not) against the holdout; pending decisions are excluded from "
        "rates. *Intervals treat users as clusters. Spend = discount on converted offers; "
        "committed = what the ledger charged at issue time. A dash: the figure needs a "
        "holdout; the table below says what to set. See docs/backtest.md.</p>"
        f'<h3 id="section-power">Holdout and power</h3>{power}'
        '<p class="note">Labelled holdout decisions needed for the ITT uplift\'s 95 % '
        "interval (users as clusters: the design effect) to be narrower than the effect: "
        "10 % of the conversion rate, or the observed ITT uplift when larger. The holdout "
        "share to set assumes a run of the same length; when no share is enough, the run "
        "length needed at the planned share.</p>"
    )


def _hours(ts: Any, origin: Any, digits: int = 1) -> str:
    """An event time as hours since the first event (the budget-burn plot's axis)."""
    if ts is None:
        return DASH
    return f"{(int(ts) - int(origin or 0)) / 3_600_000:,.{digits}f}&nbsp;h"


def _stop_loss_row(key: str, section: Mapping[str, Any], origin: Any) -> list[str]:
    final = section.get("final") or {}
    ci = (final.get("lower_bound"), final.get("upper_bound"))
    stops = int(section.get("stops") or 0)
    if final.get("stopped"):
        state = f'<span class="flag">stopped</span> since {_hours(final.get("since_ts"), origin)}'
    elif final.get("since_ts") is not None:
        state = f"active since {_hours(final.get('since_ts'), origin)}"
    else:
        state = "active (never stopped)"
    return [
        escape(key),
        f"{_num(section.get('window_h'))}&nbsp;h",
        _num(section.get("min_decisions")),
        _pct(section.get("explore")),
        f"{_num(stops)} / {_num(int(section.get('transitions_total') or 0) - stops)}",
        _seconds(section.get("stopped_s")),
        f"{_pct(section.get('stopped_share'))} ({_num(section.get('stopped_decisions'))})",
        _num(section.get("stopped_offers")),
        state,
        _money_ci(final.get("incremental_margin"), ci if ci[0] is not None else None),
        _num(final.get("decisions")),
    ]


def _transitions(key: str, section: Mapping[str, Any], origin: Any) -> str:
    """One line per campaign: each change of state on the budget-burn plot's time axis."""
    changes = section.get("transitions") or []
    if not changes:
        return ""
    text = ", ".join(
        f"{escape(str(t.get('direction')))} at {_hours(t.get('ts'), origin, 2)}" for t in changes
    )
    omitted = section.get("transitions_omitted") or 0
    more = f"; {_num(omitted)} more in report.json" if omitted else ""
    return f"<li><b>{escape(key)}</b>: {text}{more}</li>"


def _stop_loss(report: Mapping[str, Any]) -> str:
    campaigns: Mapping[str, Any] = report.get("campaigns", {})
    guarded = {key: c["stop_loss"] for key, c in campaigns.items() if c.get("stop_loss")}
    if not guarded:
        return ""
    origin = (report.get("event_time") or {}).get("first_ts")
    table = _table(
        [
            "campaign",
            "window",
            "min decisions",
            "explore",
            "stops / resumes",
            "time stopped",
            "non-holdout decisions while stopped",
            "offers while stopped",
            "state at the end",
            "incr. margin / decision [95 % CI] at the end",
            "decisions in window",
        ],
        [_stop_loss_row(key, section, origin) for key, section in guarded.items()],
        "stop-loss",
    )
    lines = "".join(_transitions(key, section, origin) for key, section in guarded.items())
    changes = f'<ul class="note" id="stop-loss-transitions">{lines}</ul>' if lines else ""
    return (
        f'<h2 id="section-stop-loss">Stop-loss</h2>{table}{changes}'
        '<p class="note">A campaign stops when the 95 % upper bound of its incremental margin '
        "per sampled decision (its live offer proposals against its holdout users' would-be "
        "offers, users as clusters, over the window) is below 0; it then makes only the "
        "explore share of its proposals until the bound is no longer below 0. Times are hours "
        "of event time since the first event, as on the budget-burn plot. The figures at the "
        "end are the last window's, in currency units per decision; a dash: too few users in "
        "an arm. See docs/backtest.md.</p>"
    )


def _model(report: Mapping[str, Any]) -> str:
    model: Mapping[str, Any] = report.get("model", {})
    served = model.get("served") or {}
    table = _table(
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
                ("as served (P at decision time)", served),
                ("prequential (scored just before learning)", model),
            )
            if stats
        ],
        "model",
    )
    plots = calibration_plot(
        served, "plot-calibration-served", "Calibration as served (P at decision)"
    ) + calibration_plot(model, "plot-calibration", "Calibration (prequential)")
    return (
        f'<h2>Model</h2>{table}<div class="plots">{plots}</div>'
        '<p class="note">As served: the P(purchase) each decision was made with, against its '
        "label: what the policies acted on. Prequential: each label scored just before the "
        "model learned it: what the learner can do once labels have caught up.</p>"
    )


def _offers(report: Mapping[str, Any]) -> str:
    campaigns: Mapping[str, Any] = report.get("campaigns", {})
    span = report.get("event_time") or {}
    plots = "".join(
        [
            discount_plot(campaigns),
            budget_plot(campaigns, span.get("first_ts")),
            segment_plot(campaigns, "offer_rate"),
            segment_plot(campaigns, "mean_discount_pct"),
        ]
    )
    return f'<h2>Offers and budget</h2><div class="plots">{plots}</div>'


def _uplift_ranking(report: Mapping[str, Any]) -> str:
    campaigns: Mapping[str, Any] = report.get("campaigns", {})
    rows = []
    for key, c in campaigns.items():
        q = c.get("qini") or {}
        rows.append(
            [
                escape(key),
                _text(q.get("method")),
                _num(q.get("decisions")),
                _num(q.get("auuc")),
                _num(q.get("coefficient")),
                _num(q.get("normalised")),
                _prose(q.get("reason") or q.get("note") or ""),
            ]
        )
    table = _table(
        ["campaign", "method", "decisions ranked", "AUUC", "Qini coeff.", "normalised", "note"],
        rows,
        "qini",
        why=6,
    )
    return (
        f'<h2 id="section-qini">Uplift ranking</h2><div class="plots">{qini_plot(campaigns)}'
        f"</div>{table}"
        '<p class="note">Decisions ranked by the served uplift score (the model\'s P at the '
        "offered discount minus P without an offer). ipw: exploring decisions weighted by "
        "their offer propensity; holdout: offered against holdout decisions. AUUC = area "
        "under the curve; Qini coefficient = area above the random line; normalised = "
        "coefficient / |incremental conversions at 100 %|.</p>"
    )


def _ratio(dimension: Mapping[str, Any]) -> str:
    if dimension.get("zero_rate"):
        return "&#8734; (a segment gets no offers)"
    if dimension.get("disparity") is None:
        return f"{DASH} ({_text(dimension.get('reason'))})"
    return f"{float(dimension['disparity']):.2f}"


def _segment_rate(dimension: Mapping[str, Any], which: str) -> str:
    name = dimension.get(which)
    if name is None:
        return DASH
    return f"{escape(str(name))} ({_pct(dimension.get(f'{which}_offer_rate'))})"


def _segment_table(segments: Sequence[Mapping[str, Any]], limit: int | None = None) -> str:
    shown = segments[:limit] if limit else segments
    rows = [
        [
            _text(s.get("segment")),
            f"{_num(s.get('activity_min'))}&#8211;{_num(s.get('activity_max'))}"
            if "activity_min" in s
            else "",
            _num(s.get("decisions")),
            _num(s.get("offers")),
            _pct(s.get("offer_rate")),
            _num(s.get("mean_discount_pct")),
        ]
        for s in shown
    ]
    table = _table(
        ["segment", "30-day events", "decisions", "offers", "offer rate", "mean discount %"], rows
    )
    if limit and len(segments) > limit:
        table += f'<p class="note">{len(segments) - limit} more in report.json.</p>'
    return table


def _fairness(report: Mapping[str, Any]) -> str:
    campaigns: Mapping[str, Any] = report.get("campaigns", {})
    rows, details = [], []
    for key, c in campaigns.items():
        fairness = c.get("fairness") or {}
        limit = fairness.get("max_disparity")
        for name, dim in (fairness.get("dimensions") or {}).items():
            status = (
                '<span class="flag">above max_disparity</span>'
                if dim.get("exceeds")
                else "within"
                if dim.get("exceeds") is False
                else "not checked"
            )
            rows.append(
                [
                    escape(key),
                    escape(str(name)),
                    _num(dim.get("compared")),
                    _segment_rate(dim, "highest"),
                    _segment_rate(dim, "lowest"),
                    _ratio(dim),
                    _num(limit),
                    status,
                ]
            )
        dims = fairness.get("dimensions") or {}
        details.append(
            f"<details><summary>{escape(key)}: segments</summary>"
            + "".join(
                f"<h3>{escape(str(name))}</h3>"
                + _segment_table(dim.get("segments") or [], 12 if name == "category" else None)
                for name, dim in dims.items()
            )
            + "</details>"
        )
    table = _table(
        [
            "campaign",
            "dimension",
            "segments compared",
            "highest offer rate",
            "lowest offer rate",
            "disparity (highest / lowest)",
            "max_disparity",
            "status",
        ],
        rows,
        "fairness",
    )
    return (
        f'<h2 id="section-fairness">Fairness</h2><div class="plots">{fairness_plot(campaigns)}'
        f"</div>{table}"
        '<p class="note">Non-holdout decisions. Dimensions: new vs returning customers (a '
        "purchase in the last 30 days), the trigger event's category, and quintiles of the "
        "user's 30-day event count. Disparity = highest over lowest offer rate among segments "
        "with enough decisions; a segment with no offers makes it infinite (&#8734;), which "
        "exceeds any max_disparity. Set <code>max_disparity</code> in a campaign to check "
        "it.</p>" + "".join(details)
    )


def _ope_interval(estimate: Mapping[str, Any] | None) -> str:
    if not estimate or estimate.get("value") is None:
        return DASH
    return f"{_pct(estimate['value'])} [{_pct(estimate['low'])}, {_pct(estimate['high'])}]"


def _ope_block(key: str, section: Mapping[str, Any]) -> str:
    """One campaign's constant-discount estimates as a table, or why there are none."""
    ope = section.get("ope")
    title = f"<h3>{escape(key)}</h3>"
    if not ope:
        return f'{title}<p class="note">{_prose(section.get("ope_reason", ""))}</p>'
    rows = [
        [
            _text(t.get("target")),
            _ope_interval(t.get("ips")),
            _ope_interval(t.get("snips")),
            _ope_interval(t.get("dr")),
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


def _ope(report: Mapping[str, Any]) -> str:
    campaigns: Mapping[str, Any] = report.get("campaigns", {})
    blocks = "".join(_ope_block(key, section) for key, section in campaigns.items())
    return f'<h2>Off-policy evaluation</h2><div id="ope">{blocks}</div>'


def _generic(value: Any) -> str:
    """Render any JSON value: a list of objects as a table, an object as field/value rows,
    another list as comma-separated cells, a scalar as text."""
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            headers = list(dict.fromkeys(k for row in value for k in row))
            rows = [[_generic(row.get(h)) for h in headers] for row in value]
            return _table(headers, rows)
        return ", ".join(_generic(v) for v in value) if value else DASH
    if isinstance(value, Mapping):
        rows = [[escape(str(k)), _generic(v)] for k, v in value.items()]
        return _table(["field", "value"], rows)
    return _num(value)


KNOWN_SECTIONS = frozenset(
    {
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
        "ranking",
    }
)
"""Top-level report keys with a section of their own; any other key renders as tables."""


def _extras(report: Mapping[str, Any]) -> str:
    return "".join(
        f'<h2 id="section-{escape(str(name))}">{escape(str(name))}</h2>{_generic(value)}'
        for name, value in report.items()
        if name not in KNOWN_SECTIONS
    )


SECTIONS: tuple[Callable[[Mapping[str, Any]], str], ...] = (
    _verdict,
    _overview,
    _campaigns,
    _stop_loss,
    _model,
    _offers,
    _uplift_ranking,
    _fairness,
    _ope,
    _extras,
)
"""The page's sections in reading order, each a pure function of the report."""


def render_html(report: Mapping[str, Any]) -> str:
    """The page; a pure function of the report dict."""
    title = escape(report_title(report))
    body = _header(report) + "".join(section(report) for section in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )
