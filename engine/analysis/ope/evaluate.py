"""``estimate``: a target policy's value from a decision log (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.analysis.ope.decision_log import LoggedDecision
from engine.analysis.ope.errors import OpeError
from engine.analysis.ope.estimators import (
    DEFAULT_BOOTSTRAP,
    MIN_ESS,
    FloatArray,
    OpeReport,
    estimate_arrays,
)
from engine.analysis.ope.reward import (
    Fitter,
    action_mean_fitter,
    cross_fit,
    fit_linear,
    folds_for,
    is_binary,
)
from engine.analysis.ope.targets import ConstantTarget, TargetPolicy, action_key
from engine.model.inputs import model_inputs

DETERMINISTIC = 1.0 - 1e-9
"""A logged propensity at or above this was a certain action (holdout, denial, fixed policy)."""


def _design(records: Sequence[LoggedDecision], discounts: Sequence[float]) -> FloatArray:
    names: list[str] | None = None
    rows: list[list[float]] = []
    for record, discount in zip(records, discounts, strict=True):
        row = model_inputs(record.features, discount)
        if names is None:
            names = list(row)
        rows.append([row[name] for name in names])
    return np.asarray(rows, dtype=float)


def estimate(
    records: Sequence[LoggedDecision],
    target: TargetPolicy,
    *,
    seed: int,
    n_bootstrap: int = DEFAULT_BOOTSTRAP,
    min_ess: float = MIN_ESS,
) -> OpeReport:
    """IPS, SNIPS and DR estimates of ``target``'s mean reward per decision, with intervals.

    Raises ``OpeError`` when no record is left to evaluate.
    """
    if not records:
        raise OpeError("no valid logged decision to evaluate")
    evaluation = target.actions(records)
    kept = [
        (record, dist)
        for record, dist in zip(records, evaluation.distributions, strict=True)
        if dist is not None
    ]
    if not kept:
        raise OpeError("no logged decision belongs to a campaign of the target")
    used = [record for record, _ in kept]
    dists = [dist for _, dist in kept]
    n = len(used)

    p = np.array([r.propensity for r in used])
    r = np.array([r.reward for r in used])
    logged_actions = [action_key(rec.discount_pct) for rec in used]
    pi_logged = np.array([d.get(a, 0.0) for d, a in zip(dists, logged_actions, strict=True)])
    w = pi_logged / p

    owners: list[int] = []
    pair_actions: list[float] = []
    pair_probs: list[float] = []
    for index, dist in enumerate(dists):
        for action, prob in sorted(dist.items()):
            if prob > 0:
                owners.append(index)
                pair_actions.append(action)
                pair_probs.append(prob)
    owner = np.array(owners, dtype=np.int64)
    fold = folds_for(n, seed)

    if any(rec.features for rec in used):
        reward_model = "logistic" if is_binary(r) else "ridge"
        reward_model += " on features + discount (PurchaseModel inputs), 2-fold cross-fitted"
        x = _design(used, logged_actions)
        pairs_x = _design([used[i] for i in owners], pair_actions)
        fitter: Fitter = fit_linear
    else:
        reward_model = "mean reward per discount, 2-fold cross-fitted"
        x = np.array(logged_actions, dtype=float)[:, None]
        pairs_x = np.array(pair_actions, dtype=float)[:, None]
        fitter = action_mean_fitter()
    q_logged, q_target = cross_fit(fitter, x, r, fold, pairs_x, owner, np.array(pair_probs))

    warnings: list[str] = []
    certain = p >= DETERMINISTIC
    blind = certain & (pi_logged < 1.0 - 1e-9)
    if np.any(blind):
        mass = float(np.sum(1.0 - pi_logged[blind]))
        warnings.append(
            f"{int(blind.sum())} decisions were logged with propensity 1 (holdout, guardrail "
            "denial or a deterministic policy) and the target would act otherwise on them "
            f"(probability mass {mass:.1f}): the log never shows those actions there, so IPS "
            "and SNIPS leave them out and DR fills them in from its reward model"
        )
    if isinstance(target, ConstantTarget) and not np.any(w > 0):
        warnings.append(
            f"no logged decision with a non-zero propensity has discount {target.discount_pct:g} %"
        )
    details = {
        "target": target.description,
        "records_by_kind": {
            "holdout": sum(1 for rec in used if rec.holdout),
            "denied": sum(1 for rec in used if rec.denied),
            "propensity_1": int(certain.sum()),
        },
        **evaluation.details,
    }
    return estimate_arrays(
        w,
        r,
        q_logged,
        q_target,
        seed=seed,
        n_bootstrap=n_bootstrap,
        reward_model=reward_model,
        min_ess=min_ess,
        warnings=tuple(warnings),
        details=details,
    )
