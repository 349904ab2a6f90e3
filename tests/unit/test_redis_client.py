"""Commands packed by hiredis are the bytes redis-py's packer sends (adapters/redis_client.py)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from streams.adapters.redis_client import (
    CPackedConnection,
    CPackedSSLConnection,
    CPackedUnixConnection,
    c_packed,
    redis_from_settings,
)
from streams.settings import Settings

ARGUMENTS: dict[str, Any] = {
    "bytes": b"bytes",
    "empty bytes": b"",
    "text": "text",
    "non-ASCII text": "é and 中",
    "zero": 0,
    "negative int": -5,
    "big int": 2**70,
    "float": 0.1,
    "integral float": 3.0,
    "large float": 1e20,
    "small float": 1e-7,
    "infinity": float("inf"),
    "float of 17 digits": 123456789.123456789,
    "memoryview": memoryview(b"view"),
    "10 kB of bytes": b"x" * 10_000,  # over redis-py's buffer cutoff: sent as separate chunks
}


def python_packed(*args: Any) -> bytes:
    return b"".join(Connection().pack_command(*args))


def c_packed_bytes(*args: Any) -> bytes:
    return b"".join(CPackedConnection().pack_command(*args))


@pytest.mark.parametrize("argument", ARGUMENTS.values(), ids=ARGUMENTS.keys())
def test_each_kind_of_argument_packs_to_the_same_bytes(argument: Any) -> None:
    assert c_packed(("SET", "key", argument)) is not None  # hiredis packed it, no fallback
    assert c_packed_bytes("SET", "key", argument) == python_packed("SET", "key", argument)


def test_a_batch_sized_script_call_packs_to_the_same_bytes() -> None:
    keys = [f"ds:{{t}}:f:{n}" for n in range(300)]
    args: list[Any] = [n * 1_000 for n in range(300)] + [
        f"{n / 7}".encode() * 20 for n in range(400)
    ]
    command = ("EVALSHA", "0" * 40, len(keys), *keys, *args)
    assert c_packed_bytes(*command) == python_packed(*command)


def test_a_command_name_with_a_space_is_two_words() -> None:
    assert c_packed_bytes("CONFIG GET", "maxmemory") == python_packed("CONFIG GET", "maxmemory")
    assert c_packed_bytes(b"CONFIG GET", "x") == python_packed(b"CONFIG GET", "x")
    assert c_packed_bytes("CONFIG GET", "x").startswith(b"*3\r\n")


def test_what_hiredis_refuses_goes_to_redis_py_s_packer() -> None:
    assert c_packed(("SET", "key", bytearray(b"ab"))) is None
    assert c_packed_bytes("SET", "key", bytearray(b"ab")) == python_packed("SET", "key", b"ab")
    for refused in (True, None, object()):
        with pytest.raises(DataError, match="Invalid input of type"):
            CPackedConnection().pack_command("SET", "key", refused)


@pytest.mark.parametrize(
    ("url", "base", "packed"),
    [
        ("redis://127.0.0.1:6379/0", Connection, CPackedConnection),
        ("rediss://127.0.0.1:6379/0", SSLConnection, CPackedSSLConnection),
        ("unix:///tmp/redis.sock", UnixDomainSocketConnection, CPackedUnixConnection),
    ],
)
async def test_every_scheme_gets_its_own_connection_class_packed_in_c(
    url: str, base: type, packed: type
) -> None:
    client = redis_from_settings(Settings.from_env({"DEALSTREAM_REDIS_URL": url}))
    try:
        pool = client.connection_pool
        assert pool.connection_class is packed and issubclass(packed, base)
        connection = pool.make_connection()
        assert connection.pack_command("PING") == [b"*1\r\n$4\r\nPING\r\n"]
    finally:
        await client.aclose()
