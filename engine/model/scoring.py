"""Fast, exact scoring: the purchase model's P(purchase) at several discounts for one user.

A profit policy asks the model for every level of its discount ladder, and the engine asks
for every decision, so a River pipeline call on a freshly built input dict per discount was a
large part of the hot path. ``Scorer`` prepares one user's inputs once and computes River's
own arithmetic by hand; it is how ``PurchaseModel`` predicts and explains (``predict_one``,
``contributions``), so the linear score and its terms have this one implementation. River's
``predict_proba_one`` stays the reference: ``tests/unit/test_engine_fast_paths.py`` holds
``Scorer`` to it bit for bit.

``LinearTerms`` (compiled: ``native/src/logistic.rs``) holds the model's parameters per input
in ``INPUT_NAMES`` order and computes River's own arithmetic in River's order: each input
scaled as ``(x - mean) / var ** 0.5`` (0 when the variance is 0), the products with the
weights summed left to right, plus the intercept, through River's sigmoid. ``products`` gives
the terms too (an offer's reasons are the largest: ``top_terms``); ``total`` only their sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

from dealstream_native import LinearTerms, TermNames

from engine.model.inputs import (
    DISCOUNT_SLOT,
    INPUT_NAMES,
    base_inputs,
    interacting_inputs,
)

_TERM_NAMES = TermNames(INPUT_NAMES)


def top_terms(products: list[float], top: int) -> list[tuple[str, float]]:
    """The ``top`` largest terms w_i * x_i (``INPUT_NAMES`` order) by magnitude, then name,
    each rounded to 6 decimals (compiled: ``TermNames.top``)."""
    return _TERM_NAMES.top(products, top)


class ScoredModel(Protocol):
    """What a scorer reads of the model it scores with
    (``engine.model.purchase_model.PurchaseModel``)."""

    def linear_terms(self) -> LinearTerms: ...

    def predict_one(self, features: Mapping[str, float], discount_pct: float) -> float: ...

    def contributions(
        self, features: Mapping[str, float], discount_pct: float, top: int = 3
    ) -> list[tuple[str, float]]: ...


def sigmoid(z: float) -> float:
    """River's ``utils.math.sigmoid``, with its cut-offs."""
    if z < -30:
        return 0.0
    if z > 30:
        return 1.0
    return 1 / (1 + math.exp(-z))


class Scorer:
    """One user's inputs, prepared once; ``scorer(d)`` is P(purchase | features, d).

    The behavioural inputs do not depend on the discount, so their terms and their part of
    the linear score are computed once per model state; each discount then adds the discount
    and its interaction terms. The left-to-right sum is the one River computes, so the result
    is identical to the last bit. Reads the model's parameters at call time (a scorer follows
    the model as it learns).
    """

    __slots__ = ("_base", "_interacting", "_model", "_partial", "_products", "_terms")

    def __init__(self, model: ScoredModel, features: Mapping[str, float]) -> None:
        self._model = model
        self._base = base_inputs(features)
        self._interacting = interacting_inputs(self._base)
        self._terms: LinearTerms | None = None
        self._products: list[float] = []
        self._partial = 0.0

    @property
    def model(self) -> ScoredModel:
        return self._model

    def _prepare(self) -> LinearTerms:
        terms = self._model.linear_terms()
        if terms is not self._terms:
            self._products, self._partial = terms.products(self._base, 0, 0.0)
            self._terms = terms
        return terms

    def __call__(self, discount_pct: float) -> float:
        terms = self._prepare()
        total = terms.discount_total(self._interacting, discount_pct, DISCOUNT_SLOT, self._partial)
        return sigmoid(total + terms.intercept)

    def contributions(self, discount_pct: float, top: int = 3) -> list[tuple[str, float]]:
        """The largest terms w_i * x_i of the linear score (x after scaling), by magnitude."""
        terms = self._prepare()
        discount, _ = terms.discount_products(
            self._interacting, discount_pct, DISCOUNT_SLOT, self._partial
        )
        return top_terms(self._products + discount, top)


class FallbackScorer(Scorer):
    """For a subclass with its own ``predict_one`` or ``contributions``: calls them."""

    __slots__ = ("_features",)

    def __init__(self, model: ScoredModel, features: Mapping[str, float]) -> None:
        super().__init__(model, features)
        self._features = features

    def __call__(self, discount_pct: float) -> float:
        return self._model.predict_one(self._features, discount_pct)

    def contributions(self, discount_pct: float, top: int = 3) -> list[tuple[str, float]]:
        return self._model.contributions(self._features, discount_pct, top)
