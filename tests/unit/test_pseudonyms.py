"""Pseudonymous user ids (streams/adapters/pseudonyms.py), the outbox's sealed ids, the settings
that choose them, and the FORGOTTEN skip of ``apply_updates``."""

from __future__ import annotations

import hmac
import re
from base64 import urlsafe_b64encode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.decisions import DecisionDraft
from engine.features.store import Position, StateUpdate, UpdateStatus, apply_updates
from engine.pipeline import Incoming
from streams.adapters.outbox import decode_drafts, encode_drafts
from streams.adapters.pseudonyms import (
    Pseudonyms,
    SealedIdError,
    pseudonyms_from_settings,
)
from streams.errors import ConfigError
from streams.settings import Settings
from tests.unit.test_engine_golden import golden_input
from tests.unit.test_outbox import live_engine

KEY = b"unit-test-pseudonym-key-0123456789"
OTHER = b"another-pseudonym-key-9876543210"


def test_a_pseudonym_is_the_key_id_and_22_base64url_characters() -> None:
    pseudonym = Pseudonyms(KEY).of("user-42")
    assert re.fullmatch(r"k1\.[A-Za-z0-9_-]{22}", pseudonym), pseudonym
    assert re.fullmatch(r"k7\.[A-Za-z0-9_-]{22}", Pseudonyms(KEY, "k7").of("user-42"))


@given(st.text(min_size=1, max_size=128))
def test_pseudonyms_are_stable_keyed_and_never_the_id(user_id: str) -> None:
    first, again = Pseudonyms(KEY), Pseudonyms(KEY)
    assert first.of(user_id) == again.of(user_id) == first.of(user_id)
    assert first.of(user_id) != Pseudonyms(OTHER).of(user_id)
    assert user_id not in first.of(user_id)[3:] or len(user_id) < 4


def test_different_users_get_different_pseudonyms() -> None:
    pseudonyms = Pseudonyms(KEY)
    made = {pseudonyms.of(f"u{n}") for n in range(10_000)}
    assert len(made) == 10_000


@given(st.text(max_size=64), st.binary(min_size=1, max_size=80))
def test_a_pseudonym_is_the_documented_hmac(user_id: str, key: bytes) -> None:
    """The compiled HMAC gives what the module documents (and what Redis holds from before):
    the key id, a dot and the first 16 bytes of HMAC-SHA256(key, id) in base64url."""
    digest = hmac.digest(key, user_id.encode(), "sha256")[:16]
    expected = "k3." + urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert Pseudonyms(key, "k3").of(user_id) == expected


def test_raw_pseudonyms_keep_the_id() -> None:
    raw = Pseudonyms.raw()
    assert not raw.keyed
    assert raw.of("u1") == "u1"
    assert raw.seal(b'["u1"]') == b'["u1"]'
    assert raw.unseal(b'["u1"]') == b'["u1"]'


def test_a_bad_key_id_is_refused() -> None:
    with pytest.raises(ConfigError, match="key id"):
        Pseudonyms(KEY, "k 1.")


def test_sealed_entries_open_with_the_key_only() -> None:
    pseudonyms = Pseudonyms(KEY)
    blob = b'[["user-42@example.com", 1.5]]'
    sealed = pseudonyms.seal(blob)
    assert b"user-42" not in sealed and sealed.startswith(b"~k1~")
    assert sealed != pseudonyms.seal(blob)  # a fresh nonce each time
    assert pseudonyms.unseal(sealed) == blob
    assert pseudonyms.unseal(blob) == blob  # written without a key: taken as it is
    with pytest.raises(SealedIdError, match="does not open"):
        Pseudonyms(OTHER).unseal(sealed)  # same key id, other key
    with pytest.raises(SealedIdError, match=r"'k1'.*'k2'"):
        Pseudonyms(KEY, "k2").unseal(sealed)
    with pytest.raises(SealedIdError, match="no key"):
        Pseudonyms.raw().unseal(sealed)
    with pytest.raises(SealedIdError, match="does not open"):
        pseudonyms.unseal(sealed[:-4] + b"AAAA")  # tampered
    with pytest.raises(SealedIdError, match="does not open"):
        pseudonyms.unseal(b"~k1~")
    with pytest.raises(SealedIdError, match="must start with"):
        pseudonyms.unseal(b"~k1")
    relabelled = b"~k2~" + sealed[len(b"~k1~") :]  # the key id is authenticated
    with pytest.raises(SealedIdError, match="does not open"):
        Pseudonyms(KEY, "k2").unseal(relabelled)


async def test_the_outbox_stores_user_ids_sealed_and_gets_them_back() -> None:
    engine, ledger = live_engine()
    await engine.process([Incoming(e, p) for e, p in golden_input()[:2000]])
    drafts: list[DecisionDraft | None] = [d for call in ledger.calls for d in call.drafts]
    users = {d.decision.user_id for d in drafts if d is not None}
    assert users
    pseudonyms = Pseudonyms(KEY)
    blob = encode_drafts(drafts, pseudonyms)
    for user in users:
        assert user.encode() not in blob
    assert decode_drafts(blob, pseudonyms) == drafts
    with pytest.raises(SealedIdError):
        decode_drafts(blob, Pseudonyms(OTHER, "k2"))
    # without a key (DEALSTREAM_PSEUDONYMS=off) the entry is as before
    assert decode_drafts(encode_drafts(drafts)) == drafts


def test_settings_choose_pseudonyms_and_refuse_to_guess() -> None:
    with pytest.raises(ConfigError, match="DEALSTREAM_PSEUDONYM_KEY is not set"):
        pseudonyms_from_settings(Settings.from_env({}))
    keyed = Settings.from_env(
        {"DEALSTREAM_PSEUDONYM_KEY": KEY.decode(), "DEALSTREAM_PSEUDONYM_KEY_ID": "k2"}
    )
    assert "unit-test" not in repr(keyed)
    made = pseudonyms_from_settings(keyed)
    assert made.keyed and made.of("u1") == Pseudonyms(KEY, "k2").of("u1")
    raw = Settings.from_env({"DEALSTREAM_PSEUDONYMS": "off"})
    assert not pseudonyms_from_settings(raw).keyed
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        Settings.from_env({"DEALSTREAM_PSEUDONYM_KEY": "short"})
    with pytest.raises(ConfigError, match="both set"):
        Settings.from_env(
            {"DEALSTREAM_PSEUDONYM_KEY": KEY.decode(), "DEALSTREAM_PSEUDONYMS": "off"}
        )
    with pytest.raises(ConfigError, match="on or off"):
        Settings.from_env({"DEALSTREAM_PSEUDONYMS": "maybe"})
    assert Settings.from_env({}).forget_ttl_s == 7 * 24 * 3600
    assert Settings.from_env({"DEALSTREAM_FORGET_TTL_S": "60"}).forget_ttl_s == 60
    with pytest.raises(ConfigError, match="FORGET_TTL_S"):
        Settings.from_env({"DEALSTREAM_FORGET_TTL_S": "0"})


def _update(user: str, event_id: str, offset: int) -> StateUpdate:
    return StateUpdate(user, event_id, 1_000_000 + offset, [], Position("events.browse", 0, offset))


def test_a_forgotten_users_events_are_skipped_and_move_the_watermark() -> None:
    records: dict[str, bytes] = {}
    marks = {("events.browse", 0): 4}
    batch = [_update("gone", "e1", 4), _update("gone", "e2", 5), _update("kept", "e3", 6)]
    outcome, touched, _ = apply_updates(
        records, marks, batch, allowed_lateness_ms=3_600_000, forgotten={"gone"}
    )
    assert outcome.statuses == [
        UpdateStatus.REDELIVERED,  # at the watermark: redelivered, whoever the user
        UpdateStatus.FORGOTTEN,
        UpdateStatus.APPLIED,
    ]
    assert touched == ["kept"] and "gone" not in records
    assert marks[("events.browse", 0)] == 6
