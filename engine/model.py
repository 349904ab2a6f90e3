"""The online purchase model: P(purchase within the attribution window | features, discount).

A River pipeline (standard scaling, then logistic regression) learns one labelled example at a
time. The offered discount is an input, and so are its interactions with a few behavioural
features, so the model can tell who responds to a discount and who would buy anyway.

A model travels between processes (learner -> Redis -> workers) as a signed snapshot::

    header   b"DSMODEL" + format byte                           8 bytes
    version  length byte + UTF-8 version id                     1 + n bytes
    mac      HMAC-SHA256(key, header + version + payload)       32 bytes
    payload  pickle of the River pipeline and counters          the rest

``PurchaseModel.restore`` checks the header, then the MAC with ``hmac.compare_digest``, before
it unpickles anything: bytes signed with another key, truncated or altered raise
``ModelSnapshotError`` and never reach pickle. Even verified bytes are unpickled through an
allow-list (River classes, a few containers and builtins), a second line of defence.

>>> model = PurchaseModel()
>>> model.learn({"cart_count_24h": 2}, 10, 1)
>>> blob = model.snapshot(b"a shared secret key")
>>> twin = PurchaseModel.restore(blob, b"a shared secret key")
>>> twin.version, twin.predict({"cart_count_24h": 2}, 5) == model.predict({"cart_count_24h": 2}, 5)
('lr-1', True)
>>> try:
...     PurchaseModel.restore(blob, b"another key")
... except ModelSnapshotError as exc:
...     print(type(exc).__name__)
ModelSnapshotError
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import pickle
from collections.abc import Mapping
from typing import Any

import river
from river import compose, linear_model, optim, preprocessing

from engine.errors import ModelSnapshotError

MODEL_FEATURES: tuple[str, ...] = (
    "view_count_1h",
    "view_count_24h",
    "cart_count_1h",
    "cart_count_24h",
    "cart_count_7d",
    "favorite_count_7d",
    "search_count_24h",
    "purchase_count_30d",
    "spend_30d",
    "recency_cart_s",
    "recency_purchase_s",
    "session_events",
    "category_affinity",
    "discount_sensitivity",
)
"""Catalogue features the model reads; counts and amounts enter as log1p.

``days_since_first_seen`` stays out: it only grows, so in a live stream it mostly encodes
when a user was first seen rather than how they shop, and its early near-zero variance makes
the scaled input explode."""

DISCOUNT_INTERACTIONS: tuple[str, ...] = ("cart_count_24h", "purchase_count_30d", "session_events")

_LOG_SCALED_PREFIXES = ("view_", "cart_", "favorite_", "search_", "purchase_", "spend_", "recency_")

SNAPSHOT_MAGIC = b"DSMODEL"
SNAPSHOT_FORMAT = 1
"""Bump when the payload layout changes; ``restore`` refuses formats it does not know."""
_HEADER = SNAPSHOT_MAGIC + bytes([SNAPSHOT_FORMAT])
_MAC_SIZE = hashlib.sha256().digest_size
_MAX_VERSION_BYTES = 255
_PICKLE_PROTOCOL = 5
_RIVER_VERSION = str(getattr(river, "__version__", "unknown"))


INPUT_NAMES: tuple[str, ...] = (
    *MODEL_FEATURES,
    "discount",
    *(f"discount_x_{name}" for name in DISCOUNT_INTERACTIONS),
)
"""The model's inputs in ``model_inputs`` order (the order River sums the linear score in)."""
_LOG_SCALED: tuple[bool, ...] = tuple(n.startswith(_LOG_SCALED_PREFIXES) for n in MODEL_FEATURES)
_INTERACTION_SLOTS: tuple[int, ...] = tuple(MODEL_FEATURES.index(n) for n in DISCOUNT_INTERACTIONS)
_FEATURE_INPUTS: tuple[tuple[str, bool], ...] = tuple(zip(MODEL_FEATURES, _LOG_SCALED, strict=True))
_DISCOUNT_SLOT = len(MODEL_FEATURES)
"""Index of ``discount`` in ``INPUT_NAMES``; the interactions follow it."""


def model_inputs(features: Mapping[str, float], discount_pct: float) -> dict[str, float]:
    """The model's input row: selected features (log1p where heavy-tailed) plus the discount."""
    row: dict[str, float] = {}
    for name in MODEL_FEATURES:
        value = float(features.get(name, 0.0))
        if name.startswith(_LOG_SCALED_PREFIXES):
            value = math.log1p(max(value, 0.0))
        row[name] = value
    discount = discount_pct / 100.0
    row["discount"] = discount
    for name in DISCOUNT_INTERACTIONS:
        row[f"discount_x_{name}"] = discount * row[name]
    return row


class PurchaseModel:
    """Scaled logistic regression over ``model_inputs``.

    ``version`` is ``lr-<examples learned>``: stable, deterministic for a given training
    stream, and kept by ``snapshot`` / ``restore``.
    """

    def __init__(self, *, learning_rate: float = 0.05, l2: float = 0.0) -> None:
        self.learning_rate = learning_rate
        self.l2 = l2
        self._scaler = preprocessing.StandardScaler()
        self._classifier = linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate), l2=l2
        )
        self._pipeline = compose.Pipeline(self._scaler, self._classifier)
        self.examples_learned = 0
        self._terms: LinearTerms | None = None

    @property
    def version(self) -> str:
        return f"lr-{self.examples_learned}"

    def predict(self, features: Mapping[str, float], discount_pct: float) -> float:
        row = model_inputs(features, discount_pct)
        return float(self._pipeline.predict_proba_one(row).get(True, 0.0))

    def learn(self, features: Mapping[str, float], discount_pct: float, label: int) -> None:
        self._pipeline.learn_one(model_inputs(features, discount_pct), bool(label))
        self.examples_learned += 1
        self._terms = None

    def linear_terms(self) -> LinearTerms:
        """The scaler's and classifier's parameters as they stand, read once per model state."""
        terms = getattr(self, "_terms", None)
        if terms is None:
            terms = self._terms = LinearTerms.read(self._scaler, self._classifier)
        return terms

    def scorer(self, features: Mapping[str, float]) -> Scorer:
        """P(purchase | features, discount) for one user at several discounts, computed fast.

        Exactly ``predict`` (bit for bit, see ``Scorer``) when ``predict`` is this class's own;
        a subclass that overrides ``predict`` or ``contributions`` gets its own methods called.
        """
        cls = type(self)
        if (
            cls.predict is PurchaseModel.predict
            and cls.contributions is PurchaseModel.contributions
        ):
            return Scorer(self, features)
        return _FallbackScorer(self, features)

    def contributions(
        self, features: Mapping[str, float], discount_pct: float, top: int = 3
    ) -> list[tuple[str, float]]:
        """The largest terms w_i * x_i of the linear score (x after scaling), by magnitude."""
        scaled = self._scaler.transform_one(model_inputs(features, discount_pct))  # type: ignore[no-untyped-call]
        weights = self._classifier.weights
        terms = [(name, float(weights.get(name, 0.0)) * value) for name, value in scaled.items()]
        terms.sort(key=lambda term: (-abs(term[1]), term[0]))
        return [(name, round(value, 6)) for name, value in terms[:top]]

    def _contributions_from(
        self, scaled: list[float], weights: tuple[float, ...], top: int
    ) -> list[tuple[str, float]]:
        terms = [(name, w * x) for name, w, x in zip(INPUT_NAMES, weights, scaled, strict=True)]
        terms.sort(key=lambda term: (-abs(term[1]), term[0]))
        return [(name, round(value, 6)) for name, value in terms[:top]]

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot(self, key: bytes) -> bytes:
        """The model as signed bytes (see the module docstring); ``key`` is the HMAC key."""
        _check_key(key)
        state = {
            "format": SNAPSHOT_FORMAT,
            "river": _RIVER_VERSION,
            "learning_rate": self.learning_rate,
            "l2": self.l2,
            "examples_learned": self.examples_learned,
            "scaler": self._scaler,
            "classifier": self._classifier,
            "pipeline": self._pipeline,
        }
        payload = pickle.dumps(state, protocol=_PICKLE_PROTOCOL)
        version = _encode_version(self.version)
        mac = hmac.new(key, _HEADER + version + payload, hashlib.sha256).digest()
        return _HEADER + version + mac + payload

    @classmethod
    def restore(cls, blob: bytes, key: bytes) -> PurchaseModel:
        """The model in a ``snapshot``; ``ModelSnapshotError`` unless it verifies with ``key``."""
        version, payload = verify_snapshot(blob, key)
        try:
            state = _AllowListUnpickler(io.BytesIO(payload)).load()
        except Exception as exc:
            raise ModelSnapshotError(
                f"model snapshot {version} verifies but cannot be loaded ({type(exc).__name__}: "
                f"{exc}); it was probably written by an incompatible dealstream or River version"
            ) from None
        return cls._from_state(state, version)

    @classmethod
    def _from_state(cls, state: Any, version: str) -> PurchaseModel:
        unexpected = ModelSnapshotError(f"model snapshot {version} has an unexpected payload")
        if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
            raise unexpected
        try:
            scaler, classifier, pipeline = state["scaler"], state["classifier"], state["pipeline"]
            learned = state["examples_learned"]
            learning_rate, l2 = float(state["learning_rate"]), float(state["l2"])
        except (KeyError, TypeError, ValueError):
            raise unexpected from None
        if not (
            isinstance(scaler, preprocessing.StandardScaler)
            and isinstance(classifier, linear_model.LogisticRegression)
            and isinstance(pipeline, compose.Pipeline)
            and [id(step) for step in pipeline.steps.values()] == [id(scaler), id(classifier)]
            and type(learned) is int
            and learned >= 0
        ):
            raise unexpected
        model = cls.__new__(cls)
        model.learning_rate = learning_rate
        model.l2 = l2
        model._scaler = scaler
        model._classifier = classifier
        model._pipeline = pipeline
        model.examples_learned = learned
        model._terms = None
        if model.version != version:
            raise ModelSnapshotError(
                f"model snapshot header says {version} but its payload is {model.version}"
            )
        return model


class LinearTerms:
    """The model's parameters per input, in ``INPUT_NAMES`` order, for hand-computed scores.

    The score is River's own arithmetic, in River's order: each input scaled as
    ``(x - mean) / var ** 0.5`` (0 when the variance is 0), the products with the weights
    summed in input order, plus the intercept, through River's sigmoid. ``tests/unit/
    test_model.py`` checks bit-for-bit equality with ``predict_proba_one``.
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
    four discount terms. The left-to-right sum is the one River computes, so the result is
    identical to the last bit. Reads the model's parameters at call time, like ``predict``.
    """

    __slots__ = ("_base", "_interactions", "_model", "_partial", "_scaled", "_terms")

    def __init__(self, model: PurchaseModel, features: Mapping[str, float]) -> None:
        get = features.get
        log1p = math.log1p
        base = [
            log1p(max(float(get(name, 0.0)), 0.0)) if log_scaled else float(get(name, 0.0))
            for name, log_scaled in _FEATURE_INPUTS
        ]
        self._model = model
        self._base = base
        self._interactions = [base[i] for i in _INTERACTION_SLOTS]
        self._terms: LinearTerms | None = None
        self._scaled: list[float] = []
        self._partial = 0.0

    @property
    def model(self) -> PurchaseModel:
        return self._model

    def _prepare(self) -> LinearTerms:
        model = self._model
        terms = model._terms or model.linear_terms()
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
        discount = discount_pct / 100.0
        means, sds = terms.means, terms.sds
        i = _DISCOUNT_SLOT
        sd = sds[i]
        scaled = [(discount - means[i]) / sd if sd is not None else 0.0]
        for x in self._interactions:
            i += 1
            sd = sds[i]
            scaled.append((discount * x - means[i]) / sd if sd is not None else 0.0)
        return scaled

    def __call__(self, discount_pct: float) -> float:
        terms = self._prepare()
        total = self._partial
        weights = terms.weights
        i = _DISCOUNT_SLOT
        for value in self._discount_terms(terms, discount_pct):
            total += weights[i] * value
            i += 1
        return _sigmoid(total + terms.intercept)

    def contributions(self, discount_pct: float, top: int = 3) -> list[tuple[str, float]]:
        """``model.contributions(features, discount_pct, top)`` from the prepared inputs."""
        terms = self._prepare()
        scaled = self._scaled + self._discount_terms(terms, discount_pct)
        return self._model._contributions_from(scaled, terms.weights, top)


class _FallbackScorer(Scorer):
    """For a subclass with its own ``predict``: calls it, never the fast path."""

    __slots__ = ("_features",)

    def __init__(self, model: PurchaseModel, features: Mapping[str, float]) -> None:
        super().__init__(model, features)
        self._features = features

    def __call__(self, discount_pct: float) -> float:
        return self._model.predict(self._features, discount_pct)

    def contributions(self, discount_pct: float, top: int = 3) -> list[tuple[str, float]]:
        return self._model.contributions(self._features, discount_pct, top)


def snapshot_version(blob: bytes) -> str:
    """The version id a snapshot's header claims, UNVERIFIED (for messages and logs only)."""
    version, _, _ = _split(blob)
    return version


def verify_snapshot(blob: bytes, key: bytes) -> tuple[str, bytes]:
    """``(version, payload)`` of a snapshot whose MAC verifies with ``key``.

    Raises ``ModelSnapshotError`` otherwise. Nothing is unpickled here.
    """
    _check_key(key)
    version, mac, payload = _split(blob)
    signed = _HEADER + _encode_version(version) + payload
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise ModelSnapshotError(
            f"model snapshot {version} does not verify: it was signed with another key, or "
            "altered or truncated; check that the worker and the learner share "
            "DEALSTREAM_MODEL_KEY"
        )
    return version, payload


def _split(blob: bytes) -> tuple[str, bytes, bytes]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ModelSnapshotError(f"a model snapshot is bytes, not {type(blob).__name__}")
    data = bytes(blob)
    if not data.startswith(SNAPSHOT_MAGIC):
        raise ModelSnapshotError("not a dealstream model snapshot (bad magic bytes)")
    if len(data) <= len(_HEADER):
        raise ModelSnapshotError("model snapshot is truncated (no version)")
    if data[len(SNAPSHOT_MAGIC)] != SNAPSHOT_FORMAT:
        raise ModelSnapshotError(
            f"model snapshot format {data[len(SNAPSHOT_MAGIC)]} is not supported (this "
            f"dealstream reads format {SNAPSHOT_FORMAT}); upgrade the reader"
        )
    start = len(_HEADER) + 1
    end = start + data[len(_HEADER)]
    if len(data) < end + _MAC_SIZE:
        raise ModelSnapshotError("model snapshot is truncated (header)")
    try:
        version = data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ModelSnapshotError("model snapshot has a malformed version id") from None
    return version, data[end : end + _MAC_SIZE], data[end + _MAC_SIZE :]


def _encode_version(version: str) -> bytes:
    raw = version.encode("utf-8")
    if not raw or len(raw) > _MAX_VERSION_BYTES:
        raise ModelSnapshotError(f"model version id must be 1-{_MAX_VERSION_BYTES} bytes")
    return bytes([len(raw)]) + raw


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or not key:
        raise ModelSnapshotError("the model snapshot key must be non-empty bytes")


_ALLOWED_GLOBALS: dict[str, frozenset[str] | None] = {
    "builtins": frozenset(
        {"bool", "bytes", "complex", "dict", "float", "frozenset", "int", "list", "set", "str"}
        | {"tuple"}
    ),
    "collections": frozenset({"Counter", "OrderedDict", "defaultdict", "deque"}),
}
"""Module -> names a snapshot payload may reference; ``river`` and its submodules are allowed."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get(module)
        if (module == "river" or module.startswith("river.")) or (
            allowed is not None and name in allowed
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model snapshot")
