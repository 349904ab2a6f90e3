"""Off-policy evaluation: what a target policy would have earned, from logged decisions.

The API (pure; the backtest and ``dealstream ope`` call it)::

    from engine.analysis.ope.decision_log import read_decision_log
    from engine.analysis.ope.evaluate import estimate
    from engine.analysis.ope.targets import parse_target

    log = read_decision_log(open("decisions.jsonl", "rb"))  # decision v1 + reward lines
    report = estimate(log.records, parse_target("constant:10"), seed=0, n_bootstrap=200)
    report.to_dict()
    # {"n", "ess", "max_weight", "supported", "defined",
    #  "ips": {"value", "low", "high"}, "snips": {...}, "dr": {...},
    #  "logged_value", "logged": {...}, "n_bootstrap", "seed", "reward_model", "warnings",
    #  "target", "records_by_kind", ...}

- ``estimate(records: Sequence[LoggedDecision], target: TargetPolicy, *, seed: int,
  n_bootstrap: int = 200) -> OpeReport``: deterministic for a seed. Values are the target's
  mean reward per decision; intervals are 95 % bootstrap percentile intervals. With no
  supported record (the target never takes a logged action) IPS/SNIPS/DR are ``None``.
- A ``TargetPolicy`` has ``description`` and ``actions(records) -> TargetActions`` (one
  distribution {discount_pct: probability} per record, or ``None`` to skip it):
  ``ConstantTarget(d)``, ``CampaignsTarget(campaigns)``, or ``parse_target(spec)``, all in
  ``engine.analysis.ope.targets``.
- ``engine.analysis.ope.estimators.estimate_arrays(w, r, q_logged, q_target, seed=...)`` is the
  estimator core for any other logged bandit data (``engine.analysis.ope.open_bandit`` uses it).

Estimators, with ``w = pi(a|x) / p``: IPS = mean(w r); SNIPS = sum(w r) / sum(w);
DR = mean(q(x, pi) + w (r - q(x, a))) with a cross-fitted reward model q. See docs/ope.md.
"""
