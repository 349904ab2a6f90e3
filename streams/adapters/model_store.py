"""Model snapshots in Redis: the learner publishes them, the workers hot-reload them.

Keys (``P`` = the configured Redis key prefix):

- ``P model:<version>``   the signed snapshot bytes (``PurchaseModel.snapshot``)
- ``P model:latest``      the version id workers should serve
- ``P model:versions``    sorted set of the versions kept, scored by publish order
- ``P model:seq``         the publish counter behind those scores
- ``P learner:checkpoint`` JSON: the version, the Kafka offsets it includes, its metrics
- ``P learner:lease``    token of the one learner allowed to publish (expires unless renewed)

``publish`` writes the snapshot, ``latest``, the version index and the checkpoint in one Lua
call (atomic: a reader sees the old model or the new one, never a half), then trims to the
newest ``keep`` versions. Given the learner's lease token, the same call first checks that the
lease is still held (a fencing token): a learner that stalled past its lease cannot overwrite
the model of the learner that replaced it. Loading verifies the HMAC before anything is
unpickled; a snapshot that fails is refused with ``ModelSnapshotError``. For Redis Cluster,
put a hash tag in the prefix (``ds:{model}:``) so the keys share a slot.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis

from engine.errors import ModelSnapshotError
from engine.model.purchase_model import PurchaseModel
from streams.errors import StreamsError
from streams.settings import DEFAULT_KEEP, Secret

log = logging.getLogger("dealstream.model")

_PUBLISH = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[6]) ~= ARGV[4] then return -1 end
local seq = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], seq, ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[5], ARGV[3]) end
return seq
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


class LeaseLost(StreamsError):
    """Another learner holds the lease now; this one must stop without publishing."""


def _key_bytes(key: bytes | Secret) -> bytes:
    return key.reveal().encode("utf-8") if isinstance(key, Secret) else key


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ModelStore:
    """Versioned, signed model snapshots under one Redis key prefix."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "ds:", keep: int = DEFAULT_KEEP
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._client = client
        self._prefix = prefix
        self.keep = keep
        self._publish = client.register_script(_PUBLISH)
        self._renew = client.register_script(_RENEW)

    def snapshot_key(self, version: str) -> str:
        return f"{self._prefix}model:{version}"

    @property
    def latest_key(self) -> str:
        return f"{self._prefix}model:latest"

    @property
    def versions_key(self) -> str:
        return f"{self._prefix}model:versions"

    @property
    def seq_key(self) -> str:
        return f"{self._prefix}model:seq"

    @property
    def checkpoint_key(self) -> str:
        return f"{self._prefix}learner:checkpoint"

    @property
    def lease_key(self) -> str:
        return f"{self._prefix}learner:lease"

    async def acquire_lease(self, token: str, ttl_s: float) -> bool:
        """Take the learner lease for ``ttl_s`` unless another token holds it."""
        return bool(await self._client.set(self.lease_key, token, nx=True, px=_ms(ttl_s)))

    async def renew_lease(self, token: str, ttl_s: float) -> bool:
        """Extend the lease; ``False`` when ``token`` no longer holds it."""
        return bool(await self._renew(keys=[self.lease_key], args=[token, _ms(ttl_s)]))

    async def release_lease(self, token: str) -> None:
        await self._renew(keys=[self.lease_key], args=[token, 0])

    async def publish(
        self,
        model: PurchaseModel,
        key: bytes | Secret,
        *,
        checkpoint: Mapping[str, Any] | None = None,
        lease_token: str | None = None,
    ) -> str:
        """Store ``model`` signed with ``key`` and make it the latest; returns its version.

        ``checkpoint`` (JSON-able) is written in the same atomic step, with ``version`` set.
        With ``lease_token``, nothing is written (``LeaseLost``) unless that token holds the
        learner lease.
        """
        version = model.version
        blob = model.snapshot(_key_bytes(key))
        extra = b""
        if checkpoint is not None:
            extra = orjson.dumps({**checkpoint, "version": version})
        seq = await self._publish(
            keys=[
                self.snapshot_key(version),
                self.latest_key,
                self.versions_key,
                self.seq_key,
                self.checkpoint_key,
                self.lease_key,
            ],
            args=[blob, version, extra, lease_token or ""],
        )
        if int(seq) < 0:
            raise LeaseLost(
                f"lost the learner lease ({self.lease_key}) to another learner; model {version} "
                "was not published"
            )
        await self._trim()
        return version

    async def _trim(self) -> None:
        old = await self._client.zrange(self.versions_key, 0, -(self.keep + 1))
        if not old:
            return
        names = [_text(name) or "" for name in old]
        latest = await self.latest_version()
        doomed = [name for name in names if name != latest]
        if not doomed:
            return
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(*(self.snapshot_key(name) for name in doomed))
            pipe.zrem(self.versions_key, *doomed)
            await pipe.execute()

    async def latest_version(self) -> str | None:
        return _text(await self._client.get(self.latest_key))

    async def versions(self) -> list[str]:
        """The versions kept, oldest first."""
        return [_text(name) or "" for name in await self._client.zrange(self.versions_key, 0, -1)]

    async def load(self, version: str, key: bytes | Secret) -> PurchaseModel | None:
        """The verified model ``version``, ``None`` if it is not stored.

        Raises ``ModelSnapshotError`` when the stored bytes do not verify with ``key`` (or
        hold another version than their name says); they are never unpickled then.
        """
        blob = await self._client.get(self.snapshot_key(version))
        if blob is None:
            return None
        if isinstance(blob, str):  # a client created with decode_responses=True
            raise ModelSnapshotError(
                "the model store needs a Redis client without decode_responses (bytes replies)"
            )
        model = PurchaseModel.restore(bytes(blob), _key_bytes(key))
        if model.version != version:
            raise ModelSnapshotError(
                f"{self.snapshot_key(version)} holds model {model.version}, not {version}; "
                "refusing it"
            )
        return model

    async def load_latest(self, key: bytes | Secret) -> PurchaseModel | None:
        """The verified latest model, ``None`` when none was published yet.

        Raises ``ModelSnapshotError`` when it does not verify (never loaded then).
        """
        for _ in range(3):  # latest may move (and the old one be trimmed) between two reads
            version = await self.latest_version()
            if version is None:
                return None
            model = await self.load(version, key)
            if model is not None:
                return model
        raise ModelSnapshotError(
            f"{self.latest_key} names a snapshot that is not stored; publish a model again"
        )

    async def checkpoint(self) -> dict[str, Any] | None:
        """The learner checkpoint written with the latest publish, ``None`` if absent or bad."""
        raw = await self._client.get(self.checkpoint_key)
        if raw is None:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("%s is not JSON; ignoring it", self.checkpoint_key)
            return None
        return value if isinstance(value, dict) else None


class ModelReloader:
    """Lets a worker pick up the newest published model without stopping.

    ``poll`` costs one GET while nothing changed. A snapshot that does not verify is refused,
    logged once per version, and the worker keeps its current model. Redis connection errors
    are raised to the caller (the worker's timer logs them and tries again later).
    """

    def __init__(self, store: ModelStore, key: bytes | Secret) -> None:
        self._store = store
        self._key = _key_bytes(key)
        self.refused: dict[str, str] = {}
        """Versions refused, with the reason (exposed for status pages and tests)."""

    async def poll(self, current_version: str | None) -> PurchaseModel | None:
        """A newer verified model when ``model:latest`` is not ``current_version``, else None."""
        latest = await self._store.latest_version()
        if latest is None or latest == current_version or latest in self.refused:
            return None
        try:
            model = await self._store.load(latest, self._key)
        except ModelSnapshotError as exc:
            self.refused[latest] = str(exc)
            log.error("refusing model %s: %s", latest, exc)
            return None
        if model is not None:
            log.info("loaded model %s (was %s)", model.version, current_version)
        return model
