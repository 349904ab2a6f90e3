"""The stream worker process: the Faust app and its agents, the batch step, the process
lifecycle (preflight, topics, run until a signal).
"""
