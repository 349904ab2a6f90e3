"""Backtests: the live engine's code, in-process, over a file or any event source."""
