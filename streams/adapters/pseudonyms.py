"""Pseudonymous user ids: what Redis and the ``decisions`` topic hold instead of the raw id.

The engine works on raw user ids in memory (holdout groups and partitions are derived from
them, and backtests must decide as live runs do); the adapters pseudonymise where a user id is
persisted: Redis keys and values (``redis_store.py``, ``redis_ledger.py``, ``outbox.py``) and
the ``decisions`` topic (``streams/worker/batch_worker.py``). ``offers`` keep the raw id the
shop needs.

A pseudonym is ``<key id>.`` + the first 16 bytes of HMAC-SHA256(key, user id), base64url
without padding (22 characters; 128 bits, so two of n users share one with probability about
n**2 / 2**129): stable for one key, unlinkable to the id without the key, and the key id makes
a rotation visible (a new key gives every user a new pseudonym: docs/privacy.md).
The outbox must republish offers with the raw id after a crash, so it stores a batch's drafts
sealed with AES-256-GCM under a key derived from the pseudonym key (HKDF-SHA256), never in the
clear: one encryption per batch (sealing each decision's user id took about 4 µs apiece).

``Pseudonyms.raw()`` keeps raw ids (no key): only by the explicit choice
``DEALSTREAM_PSEUDONYMS=off`` (a local demo), which the worker logs.
"""

from __future__ import annotations

import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from dealstream_native import PseudonymKey

from streams.errors import ConfigError, StreamsError
from streams.settings import Settings

KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_NONCE_BYTES = 12
_SEAL_INFO = b"dealstream outbox drafts v1"


class SealedIdError(StreamsError):
    """A sealed outbox entry could not be opened: another key, or a damaged value."""


class Pseudonyms:
    """Turns raw user ids into pseudonyms, and seals the outbox entries that hold raw ids."""

    def __init__(self, key: bytes | None, key_id: str = "k1") -> None:
        if key is not None and not KEY_ID.fullmatch(key_id):
            raise ConfigError(
                f"pseudonym key id {key_id!r} must be 1-16 letters, digits, '_' or '-'"
            )
        self.key_id = key_id if key is not None else ""
        self._hmac = PseudonymKey(key, key_id) if key is not None else None
        """Compiled (``native/src/hashing.rs``): about 0.2 µs a user. In a worker holding
        81,000 users that costs less per event than looking them up in a memo did, so nothing
        is remembered (docs/privacy.md)."""
        self._aead: AESGCM | None = None
        if key is not None:
            derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO)
            self._aead = AESGCM(derived.derive(key))

    @classmethod
    def raw(cls) -> Pseudonyms:
        """Raw ids everywhere (``DEALSTREAM_PSEUDONYMS=off``): the behaviour before pseudonyms."""
        return cls(None)

    @property
    def keyed(self) -> bool:
        return self._hmac is not None

    def of(self, user_id: str) -> str:
        """The user's pseudonym (the raw id itself without a key)."""
        keyed = self._hmac
        return user_id if keyed is None else keyed.of(user_id)

    def seal(self, blob: bytes) -> bytes:
        """``blob`` as the outbox stores it: ``~<key id>~``, the nonce and the AES-GCM
        ciphertext (the key id authenticated with it), or ``blob`` itself without a key."""
        aead = self._aead
        if aead is None:
            return blob
        key_id = self.key_id.encode()
        nonce = os.urandom(_NONCE_BYTES)
        return b"~" + key_id + b"~" + nonce + aead.encrypt(nonce, blob, key_id)

    def unseal(self, stored: bytes) -> bytes:
        """``seal``'s input back (a blob stored without a key is taken as it is);
        ``SealedIdError`` if this key cannot open it."""
        if not stored.startswith(b"~"):
            return stored
        key_id, found, sealed = stored[1:].partition(b"~")
        if not found:
            raise SealedIdError("a sealed outbox entry must start with ~<key id>~")
        name = key_id.decode("ascii", "replace")
        if self._aead is None or name != self.key_id:
            raise SealedIdError(
                f"an outbox entry sealed under pseudonym key {name!r} cannot be opened with "
                f"{self.key_id or 'no key'!r}: set the key it was written with "
                "(docs/privacy.md, key rotation)"
            )
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], key_id)
        except (InvalidTag, ValueError) as exc:
            raise SealedIdError(
                f"an outbox entry sealed under pseudonym key {name!r} does not open: damaged, "
                "or written with another key of the same id"
            ) from exc


def pseudonyms_from_settings(settings: Settings) -> Pseudonyms:
    """What the settings ask for; a ``ConfigError`` that says what to do when they ask for
    nothing (privacy by default: no process stores raw ids unless told to)."""
    if settings.pseudonym_key is not None:
        return Pseudonyms(settings.pseudonym_key.reveal().encode(), settings.pseudonym_key_id)
    if settings.raw_user_ids:
        return Pseudonyms.raw()
    raise ConfigError(
        "DEALSTREAM_PSEUDONYM_KEY is not set: set it to the same secret for every worker and "
        "for `dealstream features`/`forget` (e.g. `export DEALSTREAM_PSEUDONYM_KEY="
        "$(openssl rand -hex 32)`), or set DEALSTREAM_PSEUDONYMS=off to store raw user ids "
        "(local demos only; docs/privacy.md)"
    )
