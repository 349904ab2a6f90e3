"""A backtest's report: ``report.json`` (``report``, with its ``ranking`` and ``ope`` sections)
and ``report.html`` rendered from it alone (``html``, ``plots``, ``svg``)."""
