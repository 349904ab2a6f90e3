"""``dealstream model``: the snapshot signing keys, the versions kept, and rollbacks.

- ``model keygen --out DIR``: a new Ed25519 pair, ``model-signing.pem`` (private, mode 0600:
  the learner's ``DEALSTREAM_MODEL_SIGNING_KEY_FILE``) and ``model-verify.pem`` (public: the
  workers' ``DEALSTREAM_MODEL_VERIFY_KEY_FILE``). Existing files are never overwritten.
- ``model list``: the versions Redis keeps, newest last, the latest marked.
- ``model rollback --to VERSION``: make a kept version the latest again. It signs the old
  model anew (workers never move to an older signature, so pointing ``model:latest`` back by
  hand does nothing), hence needs the signing key, and is refused while a learner runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from streams.cli import Subparsers
from streams.errors import ConfigError
from streams.settings import (
    MODEL_SIGNING_KEY_ENV,
    MODEL_VERIFY_KEY_ENV,
    Settings,
    require_signing_key,
)

SIGNING_FILE = "model-signing.pem"
VERIFY_FILE = "model-verify.pem"


def add_parser(subparsers: Subparsers) -> None:
    model = subparsers.add_parser(
        "model", help="model snapshots: signing keys (keygen), versions kept (list), rollback"
    )
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    keygen = actions.add_parser("keygen", help="write a new Ed25519 key pair for snapshots")
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write")
    keygen.set_defaults(handler=run_keygen_command)
    listing = actions.add_parser("list", help="the model versions kept in Redis")
    listing.set_defaults(handler=run_list_command)
    rollback = actions.add_parser(
        "rollback", help="make a kept version the latest again (needs the signing key)"
    )
    rollback.add_argument("--to", required=True, metavar="VERSION", help="a version `list` shows")
    rollback.set_defaults(handler=run_rollback_command)


def run_keygen_command(settings: Settings, args: argparse.Namespace) -> int:
    from engine.model.signing import generate_signing_key, signing_key_pem, verify_key_pem

    out: Path = args.out
    signing, verify = out / SIGNING_FILE, out / VERIFY_FILE
    for path in (signing, verify):
        if path.exists():
            raise ConfigError(f"{path} exists; keygen never overwrites a key (move it away first)")
    out.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key()
    # Created 0600 from the start: the private key is never readable by others, even briefly.
    fd = os.open(signing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(signing_key_pem(key))
    verify.write_bytes(verify_key_pem(key.public_key()))
    print(f"model keygen: wrote {signing} (private, 0600) and {verify} (public)")
    print(f"  learner (and rollback): {MODEL_SIGNING_KEY_ENV}_FILE={signing}")
    print(f"  workers:                {MODEL_VERIFY_KEY_ENV}_FILE={verify}")
    return 0


def run_list_command(settings: Settings, args: argparse.Namespace) -> int:
    from streams.adapters.kafka_io import check_redis
    from streams.adapters.model_store import ModelStore
    from streams.adapters.redis_client import redis_from_settings

    async def run() -> None:
        client = redis_from_settings(settings)
        try:
            await check_redis(client, settings.redis_url.reveal())
            store = ModelStore(client, prefix=settings.redis_prefix)
            latest = await store.latest_version()
            versions = await store.versions()
            if not versions:
                print(f"model list: no model under {store.versions_key}")
            for version in versions:
                claims = await store.claims(version)
                signed = f"signed_at_ms={claims[1]}" if claims is not None else "unreadable"
                mark = "  <- latest" if version == latest else ""
                print(f"{version}  {signed}{mark}")
        finally:
            await client.aclose()

    asyncio.run(run())
    return 0


def run_rollback_command(settings: Settings, args: argparse.Namespace) -> int:
    from engine.model.signing import signing_key_from_pem
    from streams.adapters.kafka_io import check_redis
    from streams.adapters.model_store import ModelStore
    from streams.adapters.redis_client import redis_from_settings

    key = signing_key_from_pem(require_signing_key().reveal().encode("utf-8"))

    async def run() -> int:
        client = redis_from_settings(settings)
        try:
            await check_redis(client, settings.redis_url.reveal())
            store = ModelStore(client, prefix=settings.redis_prefix, signing_key=key)
            loaded = await store.rollback(args.to)
            return loaded.signed_at_ms
        finally:
            await client.aclose()

    signed_at = asyncio.run(run())
    print(
        f"model rollback: {args.to} is the latest (signed anew at {signed_at}); workers load it "
        "within seconds"
    )
    return 0
