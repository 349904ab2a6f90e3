"""The learner process: learns the training topic in order, publishes signed model snapshots,
and serves its own ``/metrics``, ``/health`` and ``/ready``.
"""
