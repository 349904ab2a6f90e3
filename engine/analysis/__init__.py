"""Analysis tools apart from the core: backtests, their reports, off-policy evaluation and the
simulated world. They run the core engine's code; the core never imports them."""
