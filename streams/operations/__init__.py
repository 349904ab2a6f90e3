"""What operators look at: the worker's HTTP endpoints and status page, Prometheus metrics,
consumer lag and structured logs.
"""
