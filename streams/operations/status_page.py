"""The worker's live status page (``/``): one self-contained HTML document, no external assets.

It fetches ``/status.json`` every 2 s and renders readiness (with the reasons), partitions with
lag and time lag, rates, the model, the budgets and each stop-loss campaign's state (since
when, in event time, and its incremental margin per decision with the 95 % interval). Values
are inserted as text, never as HTML. With ``DEALSTREAM_HTTP_TOKEN`` set, open the page as
``/#token=<token>``: the fragment never leaves the browser, and the page sends it as a bearer
token.
"""

from __future__ import annotations

STATUS_PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dealstream worker</title>
<style>
  :root { --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --muted: #57606a; --line: #d0d7de; }
  * { box-sizing: border-box; }
  body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
         color: #1f2328; background: #f6f8fa; }
  header { display: flex; align-items: center; gap: 16px; padding: 12px 20px;
           background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 18px; margin: 0; }
  .badge { padding: 3px 10px; border-radius: 12px; color: #fff; font-weight: 600; }
  .badge.ok { background: var(--ok); } .badge.bad { background: var(--bad); }
  .badge.unknown { background: var(--muted); }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr));
         gap: 16px; padding: 16px 20px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 6px;
            padding: 12px 14px; }
  section.wide { grid-column: 1 / -1; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: right; padding: 3px 8px; border-bottom: 1px solid #eaeef2;
           font-variant-numeric: tabular-nums; }
  th:first-child, td:first-child { text-align: left; }
  th { color: var(--muted); font-weight: 600; }
  tr.lagging td { color: var(--warn); } tr.mine td:first-child { font-weight: 600; }
  tr.stopped td { color: var(--bad); } tr.stopped td:nth-child(2) { font-weight: 600; }
  dl { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; }
  dt { color: var(--muted); } dd { margin: 0; font-variant-numeric: tabular-nums; }
  ul { margin: 0; padding-left: 18px; } li.bad { color: var(--bad); } li.ok { color: var(--ok); }
  .muted { color: var(--muted); } #error { color: var(--bad); }
</style>
</head>
<body>
<header>
  <h1>dealstream worker</h1>
  <span id="ready" class="badge unknown">loading</span>
  <span id="group" class="muted"></span>
  <span id="updated" class="muted"></span>
  <span id="error"></span>
</header>
<main>
  <section>
    <h2>Readiness</h2>
    <ul id="checks"></ul>
  </section>
  <section>
    <h2>Throughput</h2>
    <dl id="rates"></dl>
  </section>
  <section>
    <h2>Model</h2>
    <dl id="model"></dl>
  </section>
  <section class="wide">
    <h2>Partitions <span id="lag-total" class="muted"></span></h2>
    <table id="partitions">
      <thead><tr><th>topic</th><th>partition</th><th>end</th><th>committed</th><th>lag</th>
        <th>lag (s)</th><th>here</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
  <section class="wide">
    <h2>Budgets (current event-time day)</h2>
    <table id="budgets">
      <thead><tr><th>campaign</th><th>daily budget</th><th>spent</th><th>remaining</th>
        <th>used</th></tr></thead>
      <tbody></tbody>
    </table>
    <p id="pending" class="muted"></p>
  </section>
  <section class="wide">
    <h2>Stop-loss (incremental margin per decision against the holdout)</h2>
    <table id="stop-loss">
      <thead><tr><th>campaign</th><th>state</th><th>since (event time, UTC)</th>
        <th>margin / decision</th><th>95 % interval</th><th>decisions in window</th>
        <th>window</th><th>explore</th></tr></thead>
      <tbody></tbody>
    </table>
    <p id="stop-loss-note" class="muted"></p>
  </section>
</main>
<noscript><p>This page needs JavaScript; the same data is at <a href="status.json">status.json</a>
and <a href="metrics">metrics</a>.</p></noscript>
<script>
"use strict";
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function fmt(value, digits) {
  if (value === null || value === undefined) return "?";
  if (typeof value === "number") return value.toLocaleString(undefined, {
    maximumFractionDigits: digits === undefined ? 1 : digits });
  return String(value);
}
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "?";
  if (seconds < 120) return fmt(seconds, 1) + " s";
  if (seconds < 7200) return fmt(seconds / 60, 1) + " min";
  if (seconds < 172800) return fmt(seconds / 3600, 1) + " h";
  return fmt(seconds / 86400, 1) + " d";
}
function eventTime(ms) {
  if (ms === null || ms === undefined) return "-";
  return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
}
function money(value) {
  if (value === null || value === undefined) return "?";
  return (value > 0 ? "+" : "") + fmt(value, 2);
}
function pairs(target, entries) {
  const dl = document.getElementById(target);
  dl.replaceChildren();
  for (const [name, value] of entries) { dl.append(el("dt", name), el("dd", value)); }
}
function rows(target, items, cells, rowClass) {
  const body = document.querySelector("#" + target + " tbody");
  body.replaceChildren();
  for (const item of items) {
    const tr = el("tr");
    if (rowClass) tr.className = rowClass(item);
    for (const cell of cells(item)) tr.append(el("td", cell));
    body.append(tr);
  }
}
function render(s) {
  const ready = s.readiness.ready;
  const badge = document.getElementById("ready");
  badge.textContent = ready ? "ready" : "not ready";
  badge.className = "badge " + (ready ? "ok" : "bad");
  document.getElementById("group").textContent =
    "group " + s.group + " \\u00b7 pid " + s.pid + " \\u00b7 up " + duration(s.uptime_s) +
    " \\u00b7 " + s.assigned_partitions.length + " partition(s) here \\u00b7 " +
    s.rebalances + " rebalance(s)";
  const checks = document.getElementById("checks");
  checks.replaceChildren();
  for (const [name, check] of Object.entries(s.readiness.checks)) {
    checks.append(el("li", name + ": " + check.detail, check.ok ? "ok" : "bad"));
  }
  const r = s.rates, c = s.counters;
  pairs("rates", [
    ["events/s", fmt(r.consumed)], ["applied/s", fmt(r.applied)],
    ["offers/s", fmt(r.offers)], ["decisions/s", fmt(r.decisions)],
    ["dead letters/s", fmt(r.dead_lettered)],
    ["consumed", fmt(c.consumed, 0)], ["offers", fmt(c.offers, 0)],
    ["duplicates / late", fmt(c.duplicates, 0) + " / " + fmt(c.late, 0)],
    ["forgotten", fmt(c.forgotten, 0)],
  ]);
  const q = s.model.published || {};
  pairs("model", [["version", s.model.version], ["examples", fmt(s.model.examples, 0)],
                  ["serving for", duration(s.model.age_s)],
                  ["published", q.model_version === undefined ? "none yet" : q.model_version],
                  ["AUC", fmt(q.auc, 3)], ["log loss", fmt(q.log_loss, 3)],
                  ["ECE", fmt(q.ece, 3)], ["label rate", fmt(q.label_rate, 3)]]);
  const lag = s.lag;
  document.getElementById("lag-total").textContent = "total lag " + fmt(lag.total, 0) +
    (lag.measured_s_ago === null ? " (not measured yet)" :
      " \\u00b7 measured " + fmt(lag.measured_s_ago, 0) + " s ago") +
    (lag.error ? " \\u00b7 " + lag.error : "");
  rows("partitions", lag.partitions,
       (p) => [p.topic, p.partition, fmt(p.end, 0), p.committed === null ? "-" :
               fmt(p.committed, 0), fmt(p.lag, 0), fmt(p.lag_seconds, 1),
               p.assigned_here ? "yes" : ""],
       (p) => (p.lag > 0 ? "lagging" : "") + (p.assigned_here ? " mine" : ""));
  rows("budgets", s.budgets,
       (b) => [b.campaign, fmt(b.daily_budget, 2), fmt(b.spent, 2), fmt(b.remaining, 2),
               b.daily_budget > 0 ? fmt(100 * b.spent / b.daily_budget, 1) + " %" : "-"]);
  document.getElementById("pending").textContent =
    (s.budgets.length ? "" : "No campaign has a daily budget. ") +
    "Pending labels: " + fmt(s.pending_labels, 0);
  const stopLoss = s.stop_loss || [];
  rows("stop-loss", stopLoss,
       (c) => [c.campaign, c.stopped ? "stopped (explore only)" : "active",
               eventTime(c.since_ms) + (c.since_age_s === null ? "" :
                 " (" + duration(c.since_age_s) + " ago)"),
               money(c.incremental_margin),
               c.lower_bound === null ? "?" :
                 "[" + money(c.lower_bound) + ", " + money(c.upper_bound) + "]",
               fmt(c.decisions, 0) + " / " + fmt(c.min_decisions, 0),
               fmt(c.window_h, 2) + " h", fmt(100 * c.explore, 1) + " %"],
       (c) => (c.stopped ? "stopped" : ""));
  document.getElementById("stop-loss-note").textContent = stopLoss.length ?
    "A campaign stops when the upper bound is below 0 and resumes when it is not. " +
    "? = too few users in an arm yet; since = the last change (- = never)." :
    "No campaign has a stop-loss.";
  document.getElementById("updated").textContent =
    "updated " + new Date().toLocaleTimeString();
  document.getElementById("error").textContent = "";
}
async function refresh() {
  try {
    const token = new URLSearchParams(location.hash.slice(1)).get("token");
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch("status.json", { cache: "no-store", headers: headers });
    if (response.status === 401) throw new Error("HTTP 401: open this page as /#token=<token>");
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    document.getElementById("error").textContent = "status unavailable: " + err.message;
    const badge = document.getElementById("ready");
    badge.textContent = "unknown"; badge.className = "badge unknown";
  } finally {
    setTimeout(refresh, 2000);
  }
}
refresh();
</script>
</body>
</html>
"""
