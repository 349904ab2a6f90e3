"""Fast, exact scoring: the purchase model's P(purchase) at several discounts for one user.

A profit policy asks the model for every level of its discount ladder, and the engine asks
for every decision, so ``PurchaseModel.predict`` (a River pipeline call on a freshly built
input dict per discount) was a large part of the hot path. ``Scorer`` prepares one user's
inputs once and computes River's own arithmetic by hand; ``tests/unit/
test_engine_fast_paths.py`` holds it to ``predict_proba_one`` bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from engine.model.inputs import DISCOUNT_SLOT, INPUT_NAMES, base_inputs, discount_inputs

if TYPE_CHECKING:
    from river import linear_model, preprocessing


def top_terms(scaled: list[float], weights: tuple[float, ...], top: int) -> list[tuple[str, float]]:
    """``PurchaseModel.contributions`` from scaled inputs and weights in ``INPUT_NAMES`` order."""
    # Sorting (-|term|, name, term) tuples orders exactly as the key (-|term|, name) does:
    # names are unique, so the third item never decides, and no key function is called.
    terms = [
        (-abs(value), name, value)
        for name, value in zip(
            INPUT_NAMES, [w * x for w, x in zip(weights, scaled, strict=True)], strict=True
        )
    ]
    terms.sort()
    return [(name, round(value, 6)) for _, name, value in terms[:top]]


class LinearTerms:
    """The model's parameters per input, in ``INPUT_NAMES`` order, for hand-computed scores.

    The score is River's own arithmetic, in River's order: each input scaled as
    ``(x - mean) / var ** 0.5`` (0 when the variance is 0), the products with the weights
    summed in input order, plus the intercept, through River's sigmoid. ``tests/unit/
    test_engine_fast_paths.py`` checks bit-for-bit equality with ``predict_proba_one``.
    """

    __slots__ = ("intercept", "means", "sds", "weights")

    def __init__(
        self,
        means: tuple[float, ...],
        sds: tuple[float | None, ...],
        weights: tuple[float, ...],
        intercept: float,
    ) -> None:
        self.means = means
        self.sds = sds
        """``var ** 0.5``, or None where the variance is 0 (the input then scales to 0)."""
        self.weights = weights
        self.intercept = intercept

    @classmethod
    def read(
        cls, scaler: preprocessing.StandardScaler, classifier: linear_model.LogisticRegression
    ) -> LinearTerms:
        means, variances = scaler.means, scaler.vars
        weights = classifier.weights
        sds: list[float | None] = []
        for name in INPUT_NAMES:
            var = variances.get(name, 0.0)
            sds.append(var**0.5 if var else None)
        return cls(
            tuple(means.get(name, 0.0) for name in INPUT_NAMES),
            tuple(sds),
            tuple(float(weights.get(name, 0.0)) for name in INPUT_NAMES),
            classifier.intercept,
        )


class ScoredModel(Protocol):
    """What a scorer reads of the model it scores with
    (``engine.model.purchase_model.PurchaseModel``)."""

    def linear_terms(self) -> LinearTerms: ...

    def predict(self, features: Mapping[str, float], discount_pct: float) -> float: ...

    def contributions(
        self, features: Mapping[str, float], discount_pct: float, top: int = 3
    ) -> list[tuple[str, float]]: ...


def _sigmoid(z: float) -> float:
    """River's ``utils.math.sigmoid``, with its cut-offs."""
    if z < -30:
        return 0.0
    if z > 30:
        return 1.0
    return 1 / (1 + math.exp(-z))


class Scorer:
    """One user's inputs, prepared once; ``scorer(d)`` is ``model.predict(features, d)``.

    The behavioural inputs do not depend on the discount, so their scaled values and their
    part of the linear score are computed once per model state; each discount then adds the
    discount and its interaction terms. The left-to-right sum is the one River computes, so
    the result is identical to the last bit. Reads the model's parameters at call time, like
    ``predict``, and applies the model's output correction the same way.
    """

    __slots__ = ("_base", "_model", "_partial", "_scaled", "_terms")

    def __init__(self, model: ScoredModel, features: Mapping[str, float]) -> None:
        self._model = model
        self._base = base_inputs(features)
        self._terms: LinearTerms | None = None
        self._scaled: list[float] = []
        self._partial = 0.0

    @property
    def model(self) -> ScoredModel:
        return self._model

    def _prepare(self) -> LinearTerms:
        terms = self._model.linear_terms()
        if terms is not self._terms:
            scaled: list[float] = []
            partial = 0.0
            for x, mean, sd, weight in zip(
                self._base, terms.means, terms.sds, terms.weights, strict=False
            ):
                value = (x - mean) / sd if sd is not None else 0.0
                scaled.append(value)
                partial += weight * value
            self._terms, self._scaled, self._partial = terms, scaled, partial
        return terms

    def _discount_terms(self, terms: LinearTerms, discount_pct: float) -> list[float]:
        means, sds = terms.means, terms.sds
        scaled: list[float] = []
        i = DISCOUNT_SLOT
        for x in discount_inputs(self._base, discount_pct):
            sd = sds[i]
            scaled.append((x - means[i]) / sd if sd is not None else 0.0)
            i += 1
        return scaled

    def __call__(self, discount_pct: float) -> float:
        terms = self._prepare()
        total = self._partial
        weights = terms.weights
        i = DISCOUNT_SLOT
        for value in self._discount_terms(terms, discount_pct):
            total += weights[i] * value
            i += 1
        return _sigmoid(total + terms.intercept)

    def contributions(self, discount_pct: float, top: int = 3) -> list[tuple[str, float]]:
        """``model.contributions(features, discount_pct, top)`` from the prepared inputs."""
        terms = self._prepare()
        scaled = self._scaled + self._discount_terms(terms, discount_pct)
        return top_terms(scaled, terms.weights, top)


class FallbackScorer(Scorer):
    """For a subclass with its own ``predict``: calls it, never the fast path."""

    __slots__ = ("_features",)

    def __init__(self, model: ScoredModel, features: Mapping[str, float]) -> None:
        super().__init__(model, features)
        self._features = features

    def __call__(self, discount_pct: float) -> float:
        return self._model.predict(self._features, discount_pct)

    def contributions(self, discount_pct: float, top: int = 3) -> list[tuple[str, float]]:
        return self._model.contributions(self._features, discount_pct, top)
