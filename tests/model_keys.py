"""The Ed25519 pair the tests sign model snapshots with (fixed, so that runs compare)."""

from __future__ import annotations

import redis.asyncio as aioredis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.model.purchase_model import PurchaseModel
from engine.model.signing import signing_key_pem, verify_key_pem
from streams.adapters.model_store import ModelStore

SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
VERIFY_KEY = SIGNING_KEY.public_key()
SIGNING_PEM = signing_key_pem(SIGNING_KEY).decode("ascii")
VERIFY_PEM = verify_key_pem(VERIFY_KEY).decode("ascii")


def learner_key_env() -> dict[str, str]:
    """The learner's key variable."""
    return {"DEALSTREAM_MODEL_SIGNING_KEY": SIGNING_PEM}


def worker_key_env() -> dict[str, str]:
    """The workers' key variable (the public key only)."""
    return {"DEALSTREAM_MODEL_VERIFY_KEY": VERIFY_PEM}


async def publish_trained(client: aioredis.Redis, prefix: str, examples: int = 3) -> str:
    """Publish a model trained on ``examples`` examples, as the learner would; its version.
    Closes ``client`` (``services.redis()``, or a plain one for a test's own Redis)."""
    model = PurchaseModel()
    for i in range(examples):
        model.learn_one({"cart_count_24h": float(i)}, 10.0, i % 2)
    try:
        return await ModelStore(client, prefix=prefix, signing_key=SIGNING_KEY).publish(model)
    finally:
        await client.aclose()
