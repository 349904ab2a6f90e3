"""Backtests: the live engine's code, in-process, over a file or any event source.

The API (pure: no wall clock, no files opened here; ``dealstream backtest`` does the I/O)::

    from engine.analysis.reporting.html import render_html
    from engine.analysis.reporting.report import build_report, dumps_report
    from engine.analysis.backtest.runner import run_backtest

    result = run_backtest(
        source,                      # Iterable[Event], pulled lazily batch by batch
        campaigns,                   # Sequence[Campaign], or {set name: campaigns} to compare
        seed=0,                      # added to every campaign's exploration seed
        batch_size=2000,
        on_offers=None,              # Callable[[list[offer v1 dict]], None], see below
        decisions_out=None,          # binary stream for decision lines (reward placeholder)
        config=None,                 # EngineConfig: attribution window, lateness
    )                                # -> BacktestResult
    report = build_report(result, inputs={...}, ope={...}, extra={"simulation": {...}})
    data = dumps_report(report)      # canonical bytes: same input + seed -> same bytes
    page = render_html(orjson.loads(data))

- Each campaign set runs in its own ``DiscountEngine`` (in-memory store, ledger and model,
  ``learn_inline``), over the same events; report keys are ``"<set>/<campaign>"``, or just the
  campaign name when there is one set.
- Closed loop: after each batch, ``on_offers(offers)`` receives that batch's offers of every
  engine (each with ``campaign_key`` added) BEFORE the next batch is pulled from ``source``,
  so a simulated world can react (for instance by yielding purchases that redeem them).
- ``extra`` sections go to the top level of report.json; report.html renders any of them
  as tables (a list of objects, e.g. a regret table with policy / incremental margin /
  oracle margin / regret, becomes one table).
- ``engine.analysis.backtest.runner.finalize_decision_lines`` fills in each decision's reward once
the run has ended.

See ``docs/backtest.md`` for every metric's definition.
"""
