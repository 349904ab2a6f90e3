"""What operators look at, shared by the worker and the learner: Prometheus metrics, consumer
lag, the status page's HTML and structured logs.
"""
