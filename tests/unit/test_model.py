"""The purchase model: signed snapshots that never unpickle unverified bytes, determinism, and
River's common checks in spirit (pure ``learn``/``predict``, pickling, feature order)."""

from __future__ import annotations

import copy
import io
import os
import pickle
import random
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.model.purchase_model
from engine.errors import EngineError, ModelSnapshotError
from engine.model.purchase_model import (
    SNAPSHOT_FORMAT,
    SNAPSHOT_MAGIC,
    PurchaseModel,
    snapshot_claims,
    snapshot_version,
    verify_snapshot,
)
from engine.model.signing import signing_key_pem, verify_key_pem
from tests.synthetic_training import training_examples

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
"""The learner's private key (fixed: snapshots are compared byte for byte)."""
PUBLIC = KEY.public_key()
OTHER_PUBLIC = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33))).public_key()
SIGNED_AT = 1_700_000_000_000

PROBES: list[tuple[dict[str, float], float]] = [
    ({}, 0.0),
    ({"cart_count_24h": 3.0, "view_count_24h": 12.0}, 10.0),
    ({"purchase_count_30d": 2.0, "session_events": 9.0, "spend_30d": 120.5}, 20.0),
    ({"recency_cart_s": 3600.0, "days_since_first_seen": 40.0}, 5.0),
]


def trained(n: int = 300, seed: int = 3) -> PurchaseModel:
    model = PurchaseModel()
    for drawn in training_examples(n, seed=seed):
        ex = drawn.example
        model.learn_one(ex["features"], ex["discount_pct"], ex["label"])  # type: ignore[arg-type]
    return model


def predictions(model: PurchaseModel) -> list[float]:
    return [model.predict_one(features, discount) for features, discount in PROBES]


def craft(version: str, payload: bytes, key: Ed25519PrivateKey) -> bytes:
    """A well-formed snapshot of arbitrary ``payload`` bytes, signed with ``key`` (by hand, as
    an attacker holding the key would)."""
    header = SNAPSHOT_MAGIC + bytes([SNAPSHOT_FORMAT])
    raw = version.encode()
    signed = header + bytes([len(raw)]) + raw + SIGNED_AT.to_bytes(8, "big")
    return signed + key.sign(signed + payload) + payload


# -- a payload that would run code if it were ever unpickled ------------------------------------

EXPLOITED: list[str] = []


def _exploit(tag: str) -> str:
    EXPLOITED.append(tag)
    return tag


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_exploit, ("ran",))


@pytest.fixture
def unpickle_spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Records every attempt to unpickle inside engine.model.purchase_model (there must be none for
    bad bytes)."""
    calls: list[bytes] = []
    original = engine.model.purchase_model._AllowListUnpickler

    class Spy(original):  # type: ignore[misc, valid-type]
        def load(self) -> object:
            calls.append(b"load")
            return super().load()

    monkeypatch.setattr(engine.model.purchase_model, "_AllowListUnpickler", Spy)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(b"loads"))
    EXPLOITED.clear()
    yield calls
    EXPLOITED.clear()


# -- snapshot round trip --------------------------------------------------------------------------


def test_round_trip_keeps_predictions_version_and_counters() -> None:
    model = trained()
    blob = model.snapshot(KEY, signed_at_ms=SIGNED_AT)
    restored = PurchaseModel.restore(blob, PUBLIC)
    assert restored.version == model.version == "lr-300"
    assert restored.examples_learned == 300
    assert predictions(restored) == predictions(model)
    for features, discount in PROBES:
        assert restored.contributions(features, discount) == model.contributions(features, discount)
    assert (restored.learning_rate, restored.l2) == (model.learning_rate, model.l2)


def test_restored_model_keeps_learning_exactly_like_the_original() -> None:
    model = trained(200)
    restored = PurchaseModel.restore(model.snapshot(KEY, signed_at_ms=SIGNED_AT), PUBLIC)
    for drawn in training_examples(200, seed=11):
        ex = drawn.example
        for m in (model, restored):
            m.learn_one(ex["features"], ex["discount_pct"], ex["label"])  # type: ignore[arg-type]
    assert predictions(restored) == predictions(model)
    assert restored.version == model.version == "lr-400"


def test_snapshot_of_a_fresh_model_round_trips() -> None:
    restored = PurchaseModel.restore(PurchaseModel().snapshot(KEY, signed_at_ms=SIGNED_AT), PUBLIC)
    assert restored.version == "lr-0"
    assert predictions(restored) == [0.5] * len(PROBES)


def test_snapshot_bytes_are_deterministic_for_the_same_training() -> None:
    assert trained(150).snapshot(KEY, signed_at_ms=SIGNED_AT) == trained(150).snapshot(
        KEY, signed_at_ms=SIGNED_AT
    )


def test_the_header_names_the_version_and_the_payload_is_signed() -> None:
    blob = trained(7).snapshot(KEY, signed_at_ms=SIGNED_AT)
    assert blob.startswith(SNAPSHOT_MAGIC + bytes([SNAPSHOT_FORMAT]))
    assert snapshot_version(blob) == "lr-7"
    verified = verify_snapshot(blob, PUBLIC)
    assert (verified.version, verified.signed_at_ms) == ("lr-7", SIGNED_AT)
    assert snapshot_claims(blob) == ("lr-7", SIGNED_AT)
    assert blob.endswith(verified.payload)


# -- refusals: nothing is unpickled ---------------------------------------------------------------


def test_a_wrong_key_is_refused_without_unpickling(unpickle_spy: list[bytes]) -> None:
    blob = trained(20).snapshot(KEY, signed_at_ms=SIGNED_AT)
    with pytest.raises(ModelSnapshotError, match="does not verify") as info:
        PurchaseModel.restore(blob, OTHER_PUBLIC)
    assert isinstance(info.value, EngineError)
    assert "DEALSTREAM_MODEL_VERIFY_KEY" in str(info.value)
    for pem in (signing_key_pem(KEY), verify_key_pem(OTHER_PUBLIC)):
        assert pem.decode().splitlines()[1] not in str(info.value)
    assert unpickle_spy == []


def test_a_malicious_payload_signed_with_another_key_never_runs(
    unpickle_spy: list[bytes],
) -> None:
    evil = pickle.dumps(Exploit(), protocol=5)
    # Sanity: this payload really runs code when unpickled.
    assert pickle.Unpickler(__import__("io").BytesIO(evil)).load() == "ran"
    assert EXPLOITED == ["ran"]
    EXPLOITED.clear()

    blob = craft("lr-1", evil, Ed25519PrivateKey.generate())
    with pytest.raises(ModelSnapshotError, match="does not verify"):
        PurchaseModel.restore(blob, PUBLIC)
    assert EXPLOITED == []
    assert unpickle_spy == []


def test_a_malicious_payload_signed_with_the_right_key_is_stopped_by_the_allow_list() -> None:
    """Defence in depth: even if the key leaked, only River classes and containers load."""
    EXPLOITED.clear()
    blob = craft("lr-1", pickle.dumps(Exploit(), protocol=5), KEY)
    with pytest.raises(ModelSnapshotError, match="cannot be loaded"):
        PurchaseModel.restore(blob, PUBLIC)
    assert EXPLOITED == []


def test_a_verified_payload_of_the_wrong_shape_is_refused() -> None:
    for payload in (pickle.dumps([1, 2, 3]), pickle.dumps({"format": 1})):
        with pytest.raises(ModelSnapshotError):
            PurchaseModel.restore(craft("lr-1", payload, KEY), PUBLIC)


def test_a_header_version_that_disagrees_with_the_payload_is_refused() -> None:
    payload = verify_snapshot(trained(5).snapshot(KEY, signed_at_ms=SIGNED_AT), PUBLIC).payload
    with pytest.raises(ModelSnapshotError, match="lr-999"):
        PurchaseModel.restore(craft("lr-999", payload, KEY), PUBLIC)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_is_refused_without_unpickling(data: st.DataObject) -> None:
    blob = bytearray(SMALL_BLOB)
    index = data.draw(st.integers(0, len(blob) - 1), label="index")
    blob[index] ^= data.draw(st.integers(1, 255), label="xor")
    calls: list[str] = []
    original = engine.model.purchase_model._AllowListUnpickler.load

    def spy(self: pickle.Unpickler) -> object:
        calls.append("load")
        return original(self)

    engine.model.purchase_model._AllowListUnpickler.load = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(ModelSnapshotError):
            PurchaseModel.restore(bytes(blob), PUBLIC)
    finally:
        engine.model.purchase_model._AllowListUnpickler.load = original  # type: ignore[method-assign]
    assert calls == []


SMALL_BLOB = trained(12).snapshot(KEY, signed_at_ms=SIGNED_AT)


def test_every_truncation_is_refused_without_unpickling(unpickle_spy: list[bytes]) -> None:
    for length in range(len(SMALL_BLOB)):
        with pytest.raises(ModelSnapshotError):
            PurchaseModel.restore(SMALL_BLOB[:length], PUBLIC)
    with pytest.raises(ModelSnapshotError):  # and an appended byte
        PurchaseModel.restore(SMALL_BLOB + b"\x00", PUBLIC)
    assert unpickle_spy == []


def test_foreign_bytes_and_formats_are_refused_with_clear_messages() -> None:
    with pytest.raises(ModelSnapshotError, match="not a dealstream model snapshot"):
        PurchaseModel.restore(b"\x80\x05garbage", PUBLIC)
    future = SNAPSHOT_MAGIC + bytes([SNAPSHOT_FORMAT + 1]) + SMALL_BLOB[len(SNAPSHOT_MAGIC) + 1 :]
    with pytest.raises(ModelSnapshotError, match=f"format {SNAPSHOT_FORMAT + 1} is not supported"):
        PurchaseModel.restore(future, PUBLIC)
    with pytest.raises(ModelSnapshotError, match="bytes"):
        PurchaseModel.restore("a string", PUBLIC)  # type: ignore[arg-type]


def test_a_key_of_the_wrong_kind_is_refused_both_ways() -> None:
    """The old shared secret (bytes) or the public key cannot sign; the private key is not
    what verifies."""
    with pytest.raises(ModelSnapshotError, match="private key"):
        PurchaseModel().snapshot(b"a shared secret", signed_at_ms=1)  # type: ignore[arg-type]
    with pytest.raises(ModelSnapshotError, match="private key"):
        PurchaseModel().snapshot(PUBLIC, signed_at_ms=1)  # type: ignore[arg-type]
    with pytest.raises(ModelSnapshotError, match="public key"):
        PurchaseModel.restore(SMALL_BLOB, KEY)  # type: ignore[arg-type]
    with pytest.raises(ModelSnapshotError, match="signed_at_ms"):
        PurchaseModel().snapshot(KEY, signed_at_ms=-1)


# -- the exact allow-list -------------------------------------------------------------------------


def _stack_global(module: str, name: str) -> bytes:
    """A protocol-4 pickle that calls ``module``/``name`` with no arguments, built by hand:
    PROTO 4, two SHORT_BINUNICODE, STACK_GLOBAL, EMPTY_TUPLE, REDUCE, STOP."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    return b"\x80\x04" + text(module) + text(name) + b"\x93)R."


def test_a_signed_dotted_name_through_a_river_module_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``river.datasets.base`` imports ``os``: protocol 4 resolves ``os.getcwd`` through it.
    Signed with the right key (a leaked key), it must still not run."""
    calls: list[str] = []
    monkeypatch.setattr(os, "getcwd", lambda: calls.append("getcwd") or "/")
    evil = _stack_global("river.datasets.base", "os.getcwd")
    # Sanity: plain pickle resolves the dotted name and calls it.
    assert pickle.loads(evil) == "/" and calls == ["getcwd"]
    calls.clear()
    refused = r"river\.datasets\.base\.os\.getcwd is not allowed"
    with pytest.raises(ModelSnapshotError, match=refused):
        PurchaseModel.restore(craft("lr-1", evil, KEY), PUBLIC)
    assert calls == []


def test_a_river_class_outside_the_exact_list_is_refused() -> None:
    """Any class of a ``river`` module used to load; now only the pairs a model is made of."""
    for module, name in (
        ("river.linear_model.lin_reg", "LinearRegression"),
        ("river.compose.func", "FuncTransformer"),
        ("builtins", "eval"),
    ):
        with pytest.raises(ModelSnapshotError, match=f"{module}.{name} is not allowed"):
            PurchaseModel.restore(craft("lr-1", _stack_global(module, name), KEY), PUBLIC)


def test_the_allow_list_is_exactly_what_a_trained_model_pickles() -> None:
    """Every pair allowed is used (no slack for an attacker), and every pair used is allowed."""
    seen: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            seen.add((module, name))
            return super().find_class(module, name)

    Recorder(
        io.BytesIO(verify_snapshot(trained(300).snapshot(KEY, signed_at_ms=1), PUBLIC).payload)
    ).load()
    assert seen == engine.model.purchase_model._ALLOWED_GLOBALS


# -- determinism and River's common checks, in spirit ---------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 120))
def test_two_models_fed_the_same_examples_predict_identically(seed: int, n: int) -> None:
    a, b = trained(n, seed), trained(n, seed)
    assert predictions(a) == predictions(b)
    assert a.version == b.version == f"lr-{n}"


def test_learn_and_predict_do_not_mutate_their_inputs() -> None:
    model = PurchaseModel()
    for drawn in training_examples(50, seed=5):
        ex = drawn.example
        features = ex["features"]
        before = copy.deepcopy(ex)
        model.predict_one(features, ex["discount_pct"])  # type: ignore[arg-type]
        model.learn_one(features, ex["discount_pct"], ex["label"])  # type: ignore[arg-type]
        model.contributions(features, ex["discount_pct"])  # type: ignore[arg-type]
        assert ex == before


def test_the_model_pickles_and_keeps_learning_identically() -> None:
    model = trained(100)
    clone = pickle.loads(pickle.dumps(model))
    assert predictions(clone) == predictions(model)
    for m in (model, clone):
        m.learn_one({"cart_count_24h": 2.0}, 10.0, 1)
    assert predictions(clone) == predictions(model)
    assert clone.version == model.version


def test_the_order_of_features_has_no_effect() -> None:
    ordered, shuffled = PurchaseModel(), PurchaseModel()
    rng = random.Random(1)
    for drawn in training_examples(100, seed=9):
        ex = drawn.example
        features: dict[str, float] = ex["features"]  # type: ignore[assignment]
        names = list(features)
        rng.shuffle(names)
        reordered = {name: features[name] for name in names}
        assert ordered.predict_one(features, 5.0) == shuffled.predict_one(reordered, 5.0)
        ordered.learn_one(features, 5.0, ex["label"])  # type: ignore[arg-type]
        shuffled.learn_one(reordered, 5.0, ex["label"])  # type: ignore[arg-type]


def test_missing_and_unknown_features_are_fine() -> None:
    model = trained(50)
    assert 0.0 <= model.predict_one({}, 0.0) <= 1.0
    assert 0.0 <= model.predict_one({"not_a_model_feature": 7.0}, 15.0) <= 1.0
    model.learn_one({"cart_count_24h": 1.0}, 0.0, 0)
    assert model.version == "lr-51"
