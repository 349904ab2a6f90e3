"""Ed25519 keys of model snapshots: the learner signs with the private key, workers verify
with the public one, so a process that can only verify (a worker) cannot sign.

Keys travel as PEM: PKCS#8 for the private key, SubjectPublicKeyInfo for the public key, what
``dealstream model keygen`` writes and what ``openssl genpkey -algorithm ed25519`` and
``openssl pkey -pubout`` produce.

>>> key = generate_signing_key()
>>> public = verify_key_from_pem(verify_key_pem(key.public_key()))
>>> public.verify(key.sign(b"model"), b"model")
>>> signing_key_from_pem(verify_key_pem(public))
Traceback (most recent call last):
...
engine.errors.ModelSnapshotError: not an Ed25519 private key in PEM (PKCS#8): ...
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.errors import ModelSnapshotError

SIGNATURE_SIZE = 64
"""Bytes of an Ed25519 signature."""


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signing_key_pem(key: Ed25519PrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (store it as a secret, mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def verify_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signing_key_from_pem(pem: bytes) -> Ed25519PrivateKey:
    """The private key in ``pem``; ``ModelSnapshotError`` (never the key's bytes) otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ModelSnapshotError(
            f"not an Ed25519 private key in PEM (PKCS#8): {_reason(exc)}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ModelSnapshotError(
            f"not an Ed25519 private key in PEM (PKCS#8): a {type(key).__name__}"
        )
    return key


def verify_key_from_pem(pem: bytes) -> Ed25519PublicKey:
    """The public key in ``pem``; ``ModelSnapshotError`` otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ModelSnapshotError(
            f"not an Ed25519 public key in PEM (SubjectPublicKeyInfo): {_reason(exc)}"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ModelSnapshotError(
            f"not an Ed25519 public key in PEM (SubjectPublicKeyInfo): a {type(key).__name__}"
        )
    return key


def _reason(exc: Exception) -> str:
    """The first line of the library's message: it never quotes the key material."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]
