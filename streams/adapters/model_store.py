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
the model of the learner that replaced it.

Snapshots are signed with the learner's Ed25519 private key and verified with the public key
(``engine.model.purchase_model``): a store built without the private key (a worker's) loads
but refuses to publish or roll back. Loading verifies the signature before anything is
unpickled; a snapshot that fails is refused with ``ModelSnapshotError``. A worker never moves
to a snapshot signed before the one it serves, so making an older retained version latest by
hand does nothing: ``rollback`` (``dealstream model rollback --to VERSION``) signs the old
model again, as new. For Redis Cluster, put a hash tag in the prefix (``ds:{model}:``) so the
keys share a slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.errors import ModelSnapshotError
from engine.model.purchase_model import (
    SNAPSHOT_HEADER_MAX,
    PurchaseModel,
    snapshot_claims,
    verify_snapshot,
)
from streams.adapters.redis_client import RedisClient
from streams.errors import StreamsError
from streams.settings import DEFAULT_KEEP

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

_ROLLBACK = """
if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
if not redis.call('ZSCORE', KEYS[3], ARGV[2]) then return -2 end
local seq = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], seq, ARGV[2])
return seq
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


class LeaseLost(StreamsError):
    """Another learner holds the lease now; this one must stop without publishing."""


class CannotSign(StreamsError):
    """This process holds only the public key (a worker): it verifies snapshots, never signs."""


class RollbackRefused(StreamsError):
    """The rollback was not done (the learner runs, or the version is not retained)."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A verified model and when the learner signed it (snapshots are ordered by it)."""

    model: PurchaseModel
    signed_at_ms: int


def _wall_clock_ms() -> int:
    return int(time.time() * 1000)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ModelStore:
    """Versioned, signed model snapshots under one Redis key prefix.

    ``signing_key`` (the learner's and the rollback command's only) signs what ``publish`` and
    ``rollback`` write; ``verify_key`` (derived from ``signing_key`` when not given) checks
    what ``load`` reads. Without either, the store still serves leases and checkpoints.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "ds:",
        keep: int = DEFAULT_KEEP,
        verify_key: Ed25519PublicKey | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        wall_clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self._client = client
        self._prefix = prefix
        self.keep = keep
        self._signing_key = signing_key
        self._verify_key = (
            verify_key
            if verify_key is not None or signing_key is None
            else signing_key.public_key()
        )
        self._wall_clock_ms = wall_clock_ms
        self._last_signed_at = 0
        """The newest ``signed_at_ms`` this store signed or loaded: the next one is later."""
        self._publish = client.register_script(_PUBLISH)
        self._rollback = client.register_script(_ROLLBACK)
        self._renew = client.register_script(_RENEW)

    @property
    def can_sign(self) -> bool:
        return self._signing_key is not None

    def _signer(self) -> Ed25519PrivateKey:
        if self._signing_key is None:
            raise CannotSign(
                "this process holds no model signing key (only the learner and `dealstream "
                "model rollback` do); it can verify snapshots but not publish them"
            )
        return self._signing_key

    def _sign(self, model: PurchaseModel) -> bytes:
        key = self._signer()
        signed_at = max(self._wall_clock_ms(), self._last_signed_at + 1)
        self._last_signed_at = signed_at
        return model.snapshot(key, signed_at_ms=signed_at)

    def _verifier(self) -> Ed25519PublicKey:
        if self._verify_key is None:
            raise ModelSnapshotError(
                "no model verify key: set DEALSTREAM_MODEL_VERIFY_KEY (or _FILE) to the "
                "learner's public key"
            )
        return self._verify_key

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
        *,
        checkpoint: Mapping[str, Any] | None = None,
        lease_token: str | None = None,
    ) -> str:
        """Store ``model``, signed, and make it the latest; returns its version.

        ``checkpoint`` (JSON-able) is written in the same atomic step, with ``version`` set.
        With ``lease_token``, nothing is written (``LeaseLost``) unless that token holds the
        learner lease. ``CannotSign`` without the signing key.
        """
        version = model.version
        blob = self._sign(model)
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

    async def rollback(self, version: str) -> LoadedModel:
        """Make the retained ``version`` the latest again, signed anew so that workers (which
        never go back to an older signature) move to it; returns it.

        Refused (``RollbackRefused``) while a learner holds the lease, since its next publish
        would replace the rollback: stop it first; restarted, it learns on from this model.
        ``ModelSnapshotError`` when the stored bytes do not verify (nothing is changed).
        """
        self._signer()  # CannotSign before anything is read
        latest = await self.load_latest()
        if latest is not None:
            self._last_signed_at = max(self._last_signed_at, latest.signed_at_ms)
        loaded = await self.load(version)
        if loaded is None:
            raise RollbackRefused(
                f"model {version} is not retained; `dealstream model list` shows those that are"
            )
        blob = self._sign(loaded.model)
        seq = await self._rollback(
            keys=[
                self.snapshot_key(version),
                self.latest_key,
                self.versions_key,
                self.lease_key,
                self.seq_key,
            ],
            args=[blob, version],
        )
        if int(seq) == -1:
            raise RollbackRefused(
                f"a learner holds {self.lease_key}: stop the learner, then roll back (it would "
                "publish over the rollback; restarted, it learns on from the rolled-back model)"
            )
        if int(seq) == -2:
            raise RollbackRefused(f"model {version} was trimmed meanwhile; nothing changed")
        return LoadedModel(loaded.model, self._last_signed_at)

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

    async def load(self, version: str) -> LoadedModel | None:
        """The verified model ``version``, ``None`` if it is not stored.

        Raises ``ModelSnapshotError`` when the stored bytes do not verify with the public key
        (or hold another version than their name says); they are never unpickled then.
        """
        blob = await self._client.get(self.snapshot_key(version))
        if blob is None:
            return None
        if isinstance(blob, str):  # a client created with decode_responses=True
            raise ModelSnapshotError(
                "the model store needs a Redis client without decode_responses (bytes replies)"
            )
        snapshot = verify_snapshot(bytes(blob), self._verifier())
        model = PurchaseModel.restore_verified(snapshot)
        if model.version != version:
            raise ModelSnapshotError(
                f"{self.snapshot_key(version)} holds model {model.version}, not {version}; "
                "refusing it"
            )
        self._last_signed_at = max(self._last_signed_at, snapshot.signed_at_ms)
        return LoadedModel(model, snapshot.signed_at_ms)

    async def claims(self, version: str) -> tuple[str, int] | None:
        """``(version, signed_at_ms)`` the stored snapshot's header claims, UNVERIFIED (one
        short read: recognises a snapshot refused before); ``None`` if absent or unreadable."""
        head = await self._client.getrange(self.snapshot_key(version), 0, SNAPSHOT_HEADER_MAX - 1)
        if not head or isinstance(head, str):
            return None
        try:
            return snapshot_claims(bytes(head))
        except ModelSnapshotError:
            return None

    async def load_latest(self) -> LoadedModel | None:
        """The verified latest model, ``None`` when none was published yet.

        Raises ``ModelSnapshotError`` when it does not verify (never loaded then).
        """
        for _ in range(3):  # latest may move (and the old one be trimmed) between two reads
            version = await self.latest_version()
            if version is None:
                return None
            loaded = await self.load(version)
            if loaded is not None:
                return loaded
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

    ``poll`` costs one GET while nothing changed (and a short GETRANGE while a refused
    snapshot is the latest). A snapshot that does not verify, or was signed before the one
    served (someone pointed ``model:latest`` back by hand: a real rollback signs anew), is
    refused, logged once per (version, signature time), and the worker keeps its model.
    Redis connection errors are raised to the caller (the worker's timer logs them and tries
    again later).
    """

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self.serving_signed_at: int | None = None
        """When the served snapshot was signed; None while serving the worker's own model."""
        self.refused: dict[tuple[str, int], str] = {}
        """(version, claimed signature time) refused, with the reason (for tests and logs)."""

    async def poll(self, current_version: str | None) -> PurchaseModel | None:
        """A newer verified model when ``model:latest`` is not ``current_version``, else None."""
        latest = await self._store.latest_version()
        if latest is None or (latest == current_version and self.serving_signed_at is not None):
            return None
        claims = await self._store.claims(latest)
        if claims is None or claims in self.refused:
            return None
        try:
            loaded = await self._store.load(latest)
        except ModelSnapshotError as exc:
            self._refuse(claims, str(exc))
            return None
        if loaded is None:
            return None
        served = self.serving_signed_at
        if served is not None and loaded.signed_at_ms <= served:
            self._refuse(
                claims,
                f"signed at {loaded.signed_at_ms}, not after the model served (signed at "
                f"{served}); roll back with `dealstream model rollback --to {latest}`",
            )
            return None
        self.serving_signed_at = loaded.signed_at_ms
        log.info("loaded model %s (was %s)", loaded.model.version, current_version)
        return loaded.model

    def _refuse(self, claims: tuple[str, int], reason: str) -> None:
        self.refused[claims] = reason
        log.error("refusing model %s: %s", claims[0], reason)
