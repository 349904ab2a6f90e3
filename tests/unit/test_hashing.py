"""The compiled hashes (``native/src/hashing.rs``) against ``hashlib``: decision ids, draws
and holdout groups must not change with the implementation (golden runs pin them too)."""

from __future__ import annotations

import hashlib

from dealstream_native import stable_id, unit_hash
from hypothesis import given
from hypothesis import strategies as st

parts = st.lists(st.text(max_size=40), max_size=4)


@given(st.text(max_size=4), parts)
def test_stable_id_is_the_prefix_and_the_hex_of_a_12_byte_blake2b(
    prefix: str, texts: list[str]
) -> None:
    digest = hashlib.blake2b("\x1f".join(texts).encode(), digest_size=12).hexdigest()
    assert stable_id(prefix, *texts) == prefix + digest


@given(parts)
def test_unit_hash_is_an_8_byte_blake2b_over_two_to_the_64(texts: list[str]) -> None:
    digest = hashlib.blake2b("\x1f".join(texts).encode(), digest_size=8).digest()
    draw = unit_hash(*texts)
    assert draw == int.from_bytes(digest, "big") / 2**64
    assert 0.0 <= draw <= 1.0


def test_the_parts_are_joined_by_the_unit_separator() -> None:
    assert stable_id("d-", "a", "b") == stable_id("d-", "a\x1fb") != stable_id("d-", "ab")
    assert unit_hash("holdout", "c", "u1") != unit_hash("holdout", "c", "u2")
