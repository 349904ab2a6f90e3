"""The online purchase model: P(purchase within the attribution window | features, discount).

A River pipeline (standard scaling, then logistic regression) learns one labelled example at a
time. The offered discount is an input, and so are its interactions with a few behavioural
features, so the model can tell who responds to a discount and who would buy anyway. River's
arithmetic is computed by hand, bit for bit and faster: the learning step by
``engine.model.logistic.ScaledLogistic``, the probabilities and their terms by
``engine.model.scoring.Scorer``. River's pipelines stay the reference (the tests hold both to
them) and the snapshot format (the parameters are written back into them).

A model travels between processes (learner -> Redis -> workers) as a signed snapshot::

    header     b"DSMODEL" + format byte                                 8 bytes
    version    length byte + UTF-8 version id                           1 + n bytes
    signed_at  when it was signed, epoch ms, unsigned big-endian        8 bytes
    signature  Ed25519(header + version + signed_at + payload)          64 bytes
    payload    pickle of the River pipelines and counters               the rest

The learner signs with its private key; workers hold only the public key (``engine.model.
signing``), so a worker can verify but never sign. ``PurchaseModel.restore`` checks the header,
then the signature, before it unpickles anything: bytes signed with another key, truncated or
altered raise ``ModelSnapshotError`` and never reach pickle. Even verified bytes are unpickled
through an exact allow-list of (module, class) pairs, the classes a model is made of; a dotted
name (protocol 4 resolves ``river.datasets.base`` / ``os.getcwd`` through a module's imports)
is refused, a second line of defence should the signing key leak.

>>> from engine.model.signing import generate_signing_key
>>> key = generate_signing_key()
>>> model = PurchaseModel()
>>> model.learn_one({"cart_count_24h": 2}, 10, 1)
>>> blob = model.snapshot(key, signed_at_ms=1)
>>> twin = PurchaseModel.restore(blob, key.public_key())
>>> features = {"cart_count_24h": 2}
>>> twin.version, twin.predict_one(features, 5) == model.predict_one(features, 5)
('lr-1', True)
>>> try:
...     PurchaseModel.restore(blob, generate_signing_key().public_key())
... except ModelSnapshotError as exc:
...     print(type(exc).__name__)
ModelSnapshotError
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import river
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from dealstream_native import LinearTerms
from river import compose, linear_model, optim, preprocessing

from engine.errors import ModelSnapshotError
from engine.model.inputs import input_row
from engine.model.logistic import ScaledLogistic, UnsupportedPipeline
from engine.model.scoring import FallbackScorer, Scorer
from engine.model.signing import SIGNATURE_SIZE

SNAPSHOT_MAGIC = b"DSMODEL"
SNAPSHOT_FORMAT = 3
"""Bump when the layout changes; ``restore`` refuses formats it does not know (3: Ed25519)."""
_HEADER = SNAPSHOT_MAGIC + bytes([SNAPSHOT_FORMAT])
_SIGNED_AT_SIZE = 8
_MAX_VERSION_BYTES = 255
SNAPSHOT_HEADER_MAX = len(_HEADER) + 1 + _MAX_VERSION_BYTES + _SIGNED_AT_SIZE + SIGNATURE_SIZE
"""Bytes that hold any snapshot's header and signature (what ``snapshot_claims`` reads)."""
_PICKLE_PROTOCOL = 5
_RIVER_VERSION = str(getattr(river, "__version__", "unknown"))


LEARNING_RATE = 0.003
INTERCEPT_LR = 0.02
"""Small steps for the weights (single-pass SGD averages out the noise of rare, delayed
labels), larger for the intercept (the base rate must follow the stream quickly): the served
probabilities were best calibrated so in the closed-loop simulator (docs/model-quality.md)."""


def _logistic(learning_rate: float, intercept_lr: float, l2: float) -> compose.Pipeline:
    return compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(
            optimizer=optim.SGD(learning_rate), l2=l2, intercept_lr=intercept_lr
        ),
    )


@dataclass(frozen=True, slots=True)
class RiverPipelines:
    """A model's three River pipelines, their state written back (``river_pipelines``)."""

    purchase: compose.Pipeline
    late: compose.Pipeline
    never: compose.Pipeline


class PurchaseModel:
    """Scaled logistic regression over ``model_inputs``, plus two auxiliary classifiers.

    ``version`` is ``lr-<updates learned>``: stable, deterministic for a given training
    stream, and kept by ``snapshot`` / ``restore``. The auxiliary classifiers (same inputs)
    serve the delayed-feedback learners (``engine.model.feedback``): ``late`` estimates that a
    conversion comes after the learner's wait, ``never`` that a decision not converted by
    then never converts. They are never used to serve.

    The ``*_inputs`` methods take the input row (``engine.model.inputs.input_row``), so a
    learner that predicts, consults the auxiliary classifiers and learns one example builds
    it once; the methods taking features build it and call them.
    """

    def __init__(
        self,
        *,
        learning_rate: float = LEARNING_RATE,
        intercept_lr: float = INTERCEPT_LR,
        l2: float = 0.0,
    ) -> None:
        self.learning_rate = learning_rate
        self.intercept_lr = intercept_lr
        self.l2 = l2
        self._purchase = ScaledLogistic(_logistic(learning_rate, intercept_lr, l2))
        self._late = ScaledLogistic(_logistic(learning_rate, intercept_lr, l2))
        self._never = ScaledLogistic(_logistic(learning_rate, intercept_lr, l2))
        self.examples_learned = 0

    @property
    def version(self) -> str:
        return f"lr-{self.examples_learned}"

    def predict_one(self, features: Mapping[str, float], discount_pct: float) -> float:
        """P(purchase | features, discount): River's ``predict_proba_one`` on ``model_inputs``,
        computed by ``Scorer`` (bit for bit the same, see ``engine.model.scoring``)."""
        return Scorer(self, features)(discount_pct)

    def predict_inputs(self, inputs: Sequence[float]) -> float:
        """``predict_one`` on an input row (``input_row``)."""
        return self._purchase.predict(inputs)

    def learn_one(
        self, features: Mapping[str, float], discount_pct: float, label: int, weight: float = 1.0
    ) -> None:
        self.learn_inputs(input_row(features, discount_pct), label, weight)

    def learn_inputs(self, inputs: Sequence[float], label: int, weight: float = 1.0) -> None:
        """Learn one labelled input row with sample weight ``weight`` (River's ``w``)."""
        self._purchase.learn(inputs, bool(label), weight)
        self.examples_learned += 1

    def auxiliary(self, features: Mapping[str, float], discount_pct: float) -> tuple[float, float]:
        """(P(late conversion), P(never converts | not yet)) from the auxiliary classifiers."""
        return self.auxiliary_inputs(input_row(features, discount_pct))

    def auxiliary_inputs(self, inputs: Sequence[float]) -> tuple[float, float]:
        """``auxiliary`` on an input row."""
        return self._late.predict(inputs), self._never.predict(inputs)

    def learn_auxiliary(
        self,
        features: Mapping[str, float],
        discount_pct: float,
        *,
        late: bool | None,
        never: bool | None,
    ) -> None:
        """Teach the auxiliary classifiers one closed window (None: not an example for it)."""
        self.learn_auxiliary_inputs(input_row(features, discount_pct), late=late, never=never)

    def learn_auxiliary_inputs(
        self, inputs: Sequence[float], *, late: bool | None, never: bool | None
    ) -> None:
        """``learn_auxiliary`` on an input row."""
        if late is not None:
            self._late.learn(inputs, late)
        if never is not None:
            self._never.learn(inputs, never)

    def linear_terms(self) -> LinearTerms:
        """The scaler's and classifier's parameters as they stand (one object per model state)."""
        return self._purchase.terms()

    def river_pipelines(self) -> RiverPipelines:
        """The River pipelines, with the parameters as they stand (what a snapshot pickles).

        They mirror the model: learn through the model, not through them."""
        return RiverPipelines(
            self._purchase.write_back(), self._late.write_back(), self._never.write_back()
        )

    def scorer(self, features: Mapping[str, float]) -> Scorer:
        """P(purchase | features, discount) for one user at several discounts, computed fast.

        A ``Scorer`` (what ``predict_one`` and ``contributions`` compute with) when both are this
        class's own; a subclass that overrides either gets its own methods called.
        """
        cls = type(self)
        if (
            cls.predict_one is PurchaseModel.predict_one
            and cls.contributions is PurchaseModel.contributions
        ):
            return Scorer(self, features)
        return FallbackScorer(self, features)

    def contributions(
        self, features: Mapping[str, float], discount_pct: float, top: int = 3
    ) -> list[tuple[str, float]]:
        """The largest terms w_i * x_i of the linear score (x after scaling), by magnitude,
        then by name; rounded to 6 decimals (an offer's ``reasons``). Computed by ``Scorer``."""
        return Scorer(self, features).contributions(discount_pct, top)

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot(self, key: Ed25519PrivateKey, *, signed_at_ms: int) -> bytes:
        """The model as bytes signed with the learner's private ``key`` (see the module
        docstring). ``signed_at_ms`` orders snapshots: a worker never moves to one signed
        before the one it serves (``streams.adapters.model_store.ModelReloader``)."""
        if not isinstance(key, Ed25519PrivateKey):
            raise ModelSnapshotError(
                "signing a model snapshot takes the learner's Ed25519 private key, not a "
                f"{type(key).__name__}"
            )
        pipelines = self.river_pipelines()
        state = {
            "format": SNAPSHOT_FORMAT,
            "river": _RIVER_VERSION,
            "learning_rate": self.learning_rate,
            "intercept_lr": self.intercept_lr,
            "l2": self.l2,
            "examples_learned": self.examples_learned,
            "pipeline": pipelines.purchase,
            "late": pipelines.late,
            "never": pipelines.never,
        }
        payload = pickle.dumps(state, protocol=_PICKLE_PROTOCOL)
        signed = _HEADER + _encode_version(self.version) + _encode_signed_at(signed_at_ms)
        return signed + key.sign(signed + payload) + payload

    @classmethod
    def restore(cls, blob: bytes, key: Ed25519PublicKey) -> PurchaseModel:
        """The model in a ``snapshot``; ``ModelSnapshotError`` unless it verifies with ``key``."""
        return cls.restore_verified(verify_snapshot(blob, key))

    @classmethod
    def restore_verified(cls, snapshot: VerifiedSnapshot) -> PurchaseModel:
        """The model in a snapshot ``verify_snapshot`` returned (unpickled through the
        allow-list)."""
        version = snapshot.version
        try:
            state = _AllowListUnpickler(io.BytesIO(snapshot.payload)).load()
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
            pipelines = [state["pipeline"], state["late"], state["never"]]
            learned = state["examples_learned"]
            learning_rate, l2 = float(state["learning_rate"]), float(state["l2"])
            intercept_lr = float(state["intercept_lr"])
        except (KeyError, TypeError, ValueError):
            raise unexpected from None
        if not (
            all(isinstance(p, compose.Pipeline) for p in pipelines)
            and type(learned) is int
            and learned >= 0
        ):
            raise unexpected
        try:
            purchase, late, never = (ScaledLogistic(p) for p in pipelines)
        except UnsupportedPipeline as exc:
            raise ModelSnapshotError(f"model snapshot {version}: {exc}") from None
        model = cls.__new__(cls)
        model.learning_rate = learning_rate
        model.intercept_lr = intercept_lr
        model.l2 = l2
        model._purchase, model._late, model._never = purchase, late, never
        model.examples_learned = learned
        if model.version != version:
            raise ModelSnapshotError(
                f"model snapshot header says {version} but its payload is {model.version}"
            )
        return model


def snapshot_version(blob: bytes) -> str:
    """The version id a snapshot's header claims, UNVERIFIED (for messages and logs only)."""
    return _split(blob)[0]


def snapshot_claims(blob: bytes) -> tuple[str, int]:
    """``(version, signed_at_ms)`` as a snapshot's header claims them, UNVERIFIED: enough to
    recognise a snapshot already refused without reading it whole. ``blob`` may stop after
    the signature (``SNAPSHOT_HEADER_MAX`` bytes)."""
    version, signed_at_ms, _, _ = _split(blob)
    return version, signed_at_ms


@dataclass(frozen=True, slots=True)
class VerifiedSnapshot:
    """A snapshot whose signature verified: its header fields and its (still pickled) payload."""

    version: str
    signed_at_ms: int
    payload: bytes


def verify_snapshot(blob: bytes, key: Ed25519PublicKey) -> VerifiedSnapshot:
    """The parts of a snapshot whose signature verifies with the public ``key``.

    Raises ``ModelSnapshotError`` otherwise. Nothing is unpickled here.
    """
    if not isinstance(key, Ed25519PublicKey):
        raise ModelSnapshotError(
            f"verifying a model snapshot takes an Ed25519 public key, not a {type(key).__name__}"
        )
    version, signed_at_ms, signature, payload = _split(blob)
    signed = _HEADER + _encode_version(version) + _encode_signed_at(signed_at_ms)
    try:
        key.verify(signature, signed + payload)
    except InvalidSignature:
        raise ModelSnapshotError(
            f"model snapshot {version} does not verify: it was signed with another key, or "
            "altered or truncated; check that DEALSTREAM_MODEL_VERIFY_KEY is the public half "
            "of the learner's DEALSTREAM_MODEL_SIGNING_KEY"
        ) from None
    return VerifiedSnapshot(version, signed_at_ms, payload)


def _split(blob: bytes) -> tuple[str, int, bytes, bytes]:
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
            f"dealstream reads format {SNAPSHOT_FORMAT}); publish the model again"
        )
    start = len(_HEADER) + 1
    end = start + data[len(_HEADER)]
    stamp_end = end + _SIGNED_AT_SIZE
    if len(data) < stamp_end + SIGNATURE_SIZE:
        raise ModelSnapshotError("model snapshot is truncated (header)")
    try:
        version = data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ModelSnapshotError("model snapshot has a malformed version id") from None
    signed_at_ms = int.from_bytes(data[end:stamp_end], "big")
    signature = data[stamp_end : stamp_end + SIGNATURE_SIZE]
    return version, signed_at_ms, signature, data[stamp_end + SIGNATURE_SIZE :]


def _encode_signed_at(signed_at_ms: int) -> bytes:
    if type(signed_at_ms) is not int or not 0 <= signed_at_ms < 2**64:
        raise ModelSnapshotError(
            f"signed_at_ms must be an int within 0 and 2**64, got {signed_at_ms!r}"
        )
    return signed_at_ms.to_bytes(_SIGNED_AT_SIZE, "big")


def _encode_version(version: str) -> bytes:
    raw = version.encode("utf-8")
    if not raw or len(raw) > _MAX_VERSION_BYTES:
        raise ModelSnapshotError(f"model version id must be 1-{_MAX_VERSION_BYTES} bytes")
    return bytes([len(raw)]) + raw


_ALLOWED_GLOBALS = frozenset(
    {
        ("builtins", "float"),
        ("collections", "Counter"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("river._river_rust.vectordict", "VectorDict"),
        ("river.compose.pipeline", "Pipeline"),
        ("river.linear_model.log_reg", "LogisticRegression"),
        ("river.optim.initializers", "Zeros"),
        ("river.optim.losses", "Log"),
        ("river.optim.schedulers", "Constant"),
        ("river.optim.sgd", "SGD"),
        ("river.preprocessing.scale", "StandardScaler"),
    }
)
"""Exactly the (module, qualified name) pairs a snapshot of ``_logistic`` pipelines pickles
(River 0.26). A River upgrade that moves a class makes old snapshots unloadable, with a clear
error (the test suite pins this list to what the pipelines pickle)."""


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # An exact pair: never resolved through a module's attributes (a dotted ``name``).
        if "." in name or (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a model snapshot")
        return super().find_class(module, name)
