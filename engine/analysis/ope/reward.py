"""Reward models for the doubly-robust estimator, fitted with cross-fitting.

DR needs q(x, a), the expected reward of action ``a`` in context ``x``. A model that has seen
record ``i`` fits its reward too well and biases DR, so the records are split into two folds by
a seeded permutation and each fold is predicted by a model fitted on the other one.

Two model families:

- ``logistic`` (0/1 rewards) or ``ridge`` (any other reward, e.g. revenue) over a numeric design
  matrix: for decision logs, :func:`engine.model.inputs.model_inputs` (the PurchaseModel's inputs:
  features + discount + discount interactions), standardised, L2-penalised, solved exactly
  (Newton / closed form) so that it is deterministic and order-free;
- ``action-mean``: the mean reward of each action key, shrunk towards the overall mean by
  ``prior`` pseudo-records (rare actions borrow from the rest instead of being 0 or 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from engine.analysis.ope.estimators import FloatArray

IntArray = npt.NDArray[np.int64]
Predictor = Callable[[FloatArray], FloatArray]
Fitter = Callable[[FloatArray, FloatArray], Predictor]

N_FOLDS = 2


def is_binary(y: FloatArray) -> bool:
    return bool(np.all((y == 0.0) | (y == 1.0)))


def _standardise(x: FloatArray) -> tuple[FloatArray, FloatArray]:
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std < 1e-12] = 1.0
    return mean, std


def fit_logistic(x: FloatArray, y: FloatArray, *, l2: float = 1.0) -> Predictor:
    """L2-penalised logistic regression by Newton's method (the intercept is not penalised)."""
    mean, std = _standardise(x)
    design = np.hstack([np.ones((x.shape[0], 1)), (x - mean) / std])
    penalty = np.full(design.shape[1], l2)
    penalty[0] = 0.0
    beta = np.zeros(design.shape[1])
    rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    beta[0] = np.log(rate / (1 - rate))
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(design @ beta, -35, 35)))
        gradient = design.T @ (y - p) - penalty * beta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if float(np.max(np.abs(step))) < 1e-8:
            break

    def predict(rows: FloatArray) -> FloatArray:
        z = np.hstack([np.ones((rows.shape[0], 1)), (rows - mean) / std]) @ beta
        result: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(z, -35, 35)))
        return result

    return predict


def fit_ridge(x: FloatArray, y: FloatArray, *, l2: float = 1.0) -> Predictor:
    """Ridge regression in closed form (the intercept is not penalised)."""
    mean, std = _standardise(x)
    design = np.hstack([np.ones((x.shape[0], 1)), (x - mean) / std])
    penalty = np.full(design.shape[1], l2)
    penalty[0] = 0.0
    beta = np.linalg.solve(design.T @ design + np.diag(penalty + 1e-9), design.T @ y)

    def predict(rows: FloatArray) -> FloatArray:
        result: FloatArray = np.hstack([np.ones((rows.shape[0], 1)), (rows - mean) / std]) @ beta
        return result

    return predict


def fit_linear(x: FloatArray, y: FloatArray) -> Predictor:
    """Logistic for 0/1 rewards, ridge otherwise."""
    return fit_logistic(x, y) if is_binary(y) else fit_ridge(x, y)


def action_mean_fitter(prior: float = 10.0) -> Fitter:
    """Per-key mean reward (the key is column 0 of the design), shrunk by ``prior`` records."""

    def fit(x: FloatArray, y: FloatArray) -> Predictor:
        overall = float(y.mean())
        keys, inverse = np.unique(x[:, 0], return_inverse=True)
        sums = np.bincount(inverse, weights=y, minlength=keys.size)
        counts = np.bincount(inverse, minlength=keys.size)
        means = (sums + prior * overall) / (counts + prior)
        table = dict(zip(keys.tolist(), means.tolist(), strict=True))

        def predict(rows: FloatArray) -> FloatArray:
            return np.array([table.get(k, overall) for k in rows[:, 0].tolist()], dtype=float)

        return predict

    return fit


def folds_for(n: int, seed: int) -> IntArray:
    """A seeded, balanced assignment of ``n`` records to ``N_FOLDS`` folds."""
    order = np.random.default_rng([seed, 0x0F01D]).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % N_FOLDS
    return fold


def cross_fit(
    fit: Fitter,
    x: FloatArray,
    y: FloatArray,
    fold: IntArray,
    pairs_x: FloatArray,
    pairs_owner: IntArray,
    pairs_prob: FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """``(q_logged, q_target)`` with every record predicted by the model of the other fold.

    ``x`` holds one row per record (its logged action); ``pairs_x`` one row per (record,
    target action) pair with its owner record and target probability, so that
    ``q_target[i] = sum of prob * q over the pairs of record i``.
    """
    n = x.shape[0]
    q_logged = np.zeros(n)
    q_pairs = np.zeros(pairs_x.shape[0])
    pair_fold = fold[pairs_owner]
    for k in range(N_FOLDS):
        train = fold != k
        if not np.any(train) or not np.any(~train):
            predictor = fit(x, y)  # too few records to split: fit on everything
        else:
            predictor = fit(x[train], y[train])
        q_logged[~train] = predictor(x[~train])
        mask = pair_fold == k
        if np.any(mask):
            q_pairs[mask] = predictor(pairs_x[mask])
    q_target = np.bincount(pairs_owner, weights=pairs_prob * q_pairs, minlength=n)
    return q_logged, q_target.astype(float)
