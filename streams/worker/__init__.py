"""The stream worker process: the Faust app and its agent, the batch step, its HTTP endpoints
(``/metrics``, ``/health``, ``/ready``, the status page) and the process lifecycle (preflight,
topics, run until a signal).
"""
