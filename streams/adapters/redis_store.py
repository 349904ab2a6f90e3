"""The Redis feature store: partition-owned records, computed in memory, written once per batch.

A worker owns the partitions Kafka assigned it, and with them every user whose events they
carry (the event topics are co-partitioned by user id). So it keeps those users' records in
memory (bounded, least recently used out) as the very bytes it writes to Redis (the compact
record of ``engine/features/record.py``, about 150-250 bytes, where the decoded dicts took
about 2 KiB), applies each micro-batch to those bytes with the engine's own ``apply_updates``
(``engine/features/store.py``: the one implementation of the rules, compiled; a user's state
becomes Python dicts only if the engine computes features for it), and writes every changed
user's record and the batch's partition watermarks to Redis in one atomic script call
(``commit_batch.lua``). In the worker that call is the ledger's (``defer_writes``: the store
stages its write, ``RedisLedger`` carries it with the ledger's effect and the batch's outbox
entry); alone, the store makes the call itself.
It reads Redis only for a user it does not hold (after a start, a rebalance or an eviction).
Redis stays the serving store: ``dealstream features`` and other services read the same records.

Keys (``P`` = the configured key prefix, ``V`` = the feature catalogue version):

- ``P u:{user}``    the user's hash: the record in field ``|s V``, beside the ledger's guards
                    and pending decisions (``commit_batch.lua``), so that a batch writes one
                    key per user. Its time to live (``ttl_seconds``) is set when the record is
                    first written or read by this store and whenever the user's latest event
                    moves to another day, not on every write (one call less per user and
                    batch): the key outlives the user's last write by the longest window and
                    a day (``TTL_MARGIN_S``)
- ``P f:{user}``    ``dealstream forget``'s tombstone: its value is when it expires (epoch ms)
- ``P wm``          hash of per-partition offset watermarks ``<topic>:<partition>``
- ``P own``         hash of per-partition owner tokens ``<topic>:<partition>``
- ``P se``          the state epoch, a counter ``forget`` increments

Exactly once: a record and the watermarks of the events it includes land in the same script
call, so after a crash the redelivered events are recognised by the watermark.
Two writers can never interleave: a store claims each partition it writes (``P own``) when it
first sees it after an assignment, and the script refuses a batch of a partition another store
has claimed since (``PartitionFenced``: a worker that lost its partitions without noticing must
stop, not overwrite the new owner's records). ``forget`` deletes a user's record and bumps the
epoch; the script then refuses every store's next batch as stale (``StateEpochMoved``), and the
store drops what it holds, reads it again and the batch runs again.

``user`` is the user's pseudonym (``pseudonyms.py``; the raw id under
``DEALSTREAM_PSEUDONYMS=off``): the store holds raw ids in memory only. A tombstone stops a
forgotten user's profile being rebuilt while it lives: the store reads it when it reads the
user's record (an ``MGET`` beside the record script's call, only for users it does not hold;
``forget`` bumps the epoch, so every store reads its users again) and the user's events count
as ``FORGOTTEN``.

In a Redis Cluster every key carries the prefix's hash tag (``DEALSTREAM_REDIS_PREFIX`` must
have one: ``redis_cluster_tag``), which wins over the ``{user}`` tag after it (Redis hashes the
first tag of a key): all of a deployment's keys share one slot, so a call touching many
users' keys stays on one node. docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import time
from collections.abc import Callable, Iterable, Sequence

from engine.features.record import UserRecord, decode_record, latest_time
from engine.features.state import CATALOGUE_VERSION, DAY_MS, LONGEST_WINDOW_MS, State
from engine.features.store import (
    BatchOutcome,
    StatesBefore,
    StateUpdate,
    UpdateStatus,
    apply_updates,
)
from streams.adapters.batch_commit import (
    STALE_RETRIES,
    BatchCommit,
    FeatureWrite,
    StateEpochMoved,
)
from streams.adapters.pseudonyms import Pseudonyms
from streams.adapters.redis_client import RedisClient
from streams.adapters.replica_wait import ReplicaWait
from streams.errors import StreamsError

TTL_MARGIN_S = 24 * 3600
"""Records outlive the longest window by a day, so a quiet user's history expires on its own."""
TTL_REFRESH_S = 24 * 3600
"""How much older than the last write a user key's time to live may have been set: it is set
again when the user's latest event moves to another day (event time follows the wall clock
live, and runs faster in a replay), so the key lives this much longer than the margin asks."""
GENERATION_S = LONGEST_WINDOW_MS // 1000 // 3
"""How long a generation of held records lasts (``RedisFeatureStore._records``): a held
record is used at most three generations, the longest window, after its last write; later the
key's time to live may have run out in Redis, so it is read again."""
RECORD_FIELD = f"|s{CATALOGUE_VERSION}"
"""The record's field in a user's hash (a field the ledger's never equal: theirs start with
a campaign name or a decision id)."""
DEFAULT_MAX_CACHED_USERS = 200_000
"""Users whose records a worker keeps in memory (the least recently used go first)."""
PartitionKey = tuple[str, int]


def hash_tag(user_id: str) -> str:
    """The user id as a Redis Cluster hash tag body: braces escaped so the tag is never empty
    or cut short, which would scatter one user's keys over several slots."""
    return user_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def from_hash_tag(tag: str) -> str:
    """The user id ``hash_tag`` was given."""
    if "%" not in tag:
        return tag
    return tag.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")


_READ_RECORDS = """#!lua flags=no-writes
local replies = {}
for k = 1, #KEYS do
  replies[k] = redis.call('HGET', KEYS[k], ARGV[1])
end
return replies
"""
"""Field ``ARGV[1]`` (the record) of each user key, in one call."""


def user_key(prefix: str, pseudonym: str) -> str:
    """The key of everything Redis keeps of one user: feature record, guards and pending
    decisions (``commit_batch.lua`` builds the same name from the same parts)."""
    return f"{prefix}u:{{{hash_tag(pseudonym)}}}"


def _day_moved(before: bytes | None, after: bytes) -> bool:
    """Whether the user's latest event is on another day than before the batch (or either
    record has none)."""
    old = latest_time(before) if before is not None else None
    new = latest_time(after)
    return old is None or new is None or old // DAY_MS != new // DAY_MS


def state_epoch_key(prefix: str) -> str:
    """The state epoch: ``dealstream forget`` bumps it, so that every worker drops what it
    holds in memory of any user (feature records, remembered decision times) and reads again."""
    return f"{prefix}se"


def _field(partition: PartitionKey) -> str:
    return f"{partition[0]}:{partition[1]}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _tombstone_until(value: bytes | str) -> float:
    """When a tombstone expires (epoch ms); one that does not say (not written by ``forget``)
    holds until this store next drops what it holds."""
    try:
        return float(_text(value))
    except ValueError:
        return float("inf")


def _blob(value: bytes | str) -> bytes:
    if not isinstance(value, bytes):
        raise StreamsError("feature records are binary: the Redis client must not decode replies")
    return value


class RedisFeatureStore:
    """Feature records of the partitions this process owns; see the module docstring."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "ds:",
        max_cached_users: int = DEFAULT_MAX_CACHED_USERS,
        clock: Callable[[], float] = time.monotonic,
        defer_writes: bool = False,
        pseudonyms: Pseudonyms | None = None,
        wall_clock_ms: Callable[[], float] = lambda: time.time() * 1000,
        replication: ReplicaWait | None = None,
    ) -> None:
        if max_cached_users < 1:
            raise ValueError("max_cached_users must be at least 1")
        self._client = client
        self._prefix = prefix
        self._commit = BatchCommit(client, prefix=prefix, replication=replication)
        """The store's own calls (``store_now``; every batch without ``defer_writes``), which
        wait for ``replication``'s replicas as the ledger's do."""
        self._read_script = client.register_script(_READ_RECORDS)
        self.defer_writes = defer_writes
        """True: ``apply_batch`` stages its write and the ledger's call carries it
        (``RedisLedger(features=...)``), so that features, ledger and outputs land together."""
        self._staged: FeatureWrite | None = None
        self.ttl_seconds = LONGEST_WINDOW_MS // 1000 + TTL_MARGIN_S + TTL_REFRESH_S
        self.max_cached_users = max_cached_users
        self._clock = clock
        self._token = secrets.token_hex(8)
        self._records: dict[str, bytes] = {}
        """Held records read or written in the current generation, encoded as Redis keeps them
        (decoded only while a batch applies), in the order of their last write (the compiled
        step moves a record it changes to the end): the least recently written first."""
        self._aged: dict[str, bytes] = {}
        """Held records last written in the generation before; a batch moves its users' back
        to ``_records``, and the turn of the next generation drops the rest. A store holding
        more than ``max_cached_users`` drops these first, then the oldest of ``_records``.
        (No time per user: that cost 65 B a user and a dict write per record written.)"""
        self._generation_began = clock()
        self._record_bytes = 0
        """The size of the held records, kept as they change: a gauge scraped while the
        store holds 100,000 users must not scan them (a few ms of the event loop each time)."""
        self._watermarks: dict[PartitionKey, int] = {}
        self._claimed: set[PartitionKey] = set()
        self._marks_loaded = True
        """False after a failure: the claimed partitions' watermarks must be read again."""
        self._epoch: str | None = None
        self.pseudonyms = pseudonyms if pseudonyms is not None else Pseudonyms.raw()
        """How user ids appear in keys (the composition root passes the settings' choice)."""
        self._wall_clock_ms = wall_clock_ms
        self._forgotten: dict[str, float] = {}
        """Users whose tombstone this store read, and when it expires (epoch ms)."""

    # -- keys ---------------------------------------------------------------------------------

    def user_key(self, user_id: str) -> str:
        """The user's hash, whose field ``RECORD_FIELD`` holds the record."""
        return user_key(self._prefix, self.pseudonyms.of(user_id))

    def tombstone_key(self, user_id: str) -> str:
        return f"{self._prefix}f:{{{hash_tag(self.pseudonyms.of(user_id))}}}"

    @property
    def watermark_key(self) -> str:
        return f"{self._prefix}wm"

    @property
    def owner_key(self) -> str:
        return f"{self._prefix}own"

    @property
    def epoch_key(self) -> str:
        return state_epoch_key(self._prefix)

    def user_keys(self, user_id: str) -> list[str]:
        """Every key this store keeps for a user (for ``dealstream forget``)."""
        return [self.user_key(user_id)]

    def held_users(self) -> int:
        """How many users' records this store holds in memory."""
        return len(self._records) + len(self._aged)

    def held_record_bytes(self) -> int:
        """The size of the records this store holds, as encoded."""
        return self._record_bytes

    # -- ownership ----------------------------------------------------------------------------

    def on_assigned(self, partitions: Iterable[PartitionKey]) -> None:
        """Nothing to do: partitions are claimed when a batch first carries them."""
        del partitions

    def on_revoked(self, partitions: Iterable[PartitionKey]) -> None:
        """Give up the partitions: forget their watermarks and drop every held record (their
        next owner writes them from now on; what this store held would go stale)."""
        for partition in partitions:
            self._claimed.discard(partition)
            self._watermarks.pop(partition, None)
        self._drop_records()

    def _drop_records(self) -> None:
        self._records.clear()
        self._aged.clear()
        self._record_bytes = 0
        self._forgotten.clear()

    def _turn_generation(self) -> None:
        """After a generation, drop the aged records and age the current ones; after two (an
        idle store), drop both: no record is used three generations after its last write."""
        now = self._clock()
        elapsed = now - self._generation_began
        if elapsed < GENERATION_S:
            return
        self._generation_began = now
        if elapsed >= 2 * GENERATION_S:
            self._aged, self._records, self._record_bytes = {}, {}, 0
        else:
            self._record_bytes -= sum(map(len, self._aged.values()))
            self._aged, self._records = self._records, {}

    def _drop_after_failure(self) -> None:
        """After a failed write nothing held can be trusted to match Redis: records and
        watermarks are read again. The claims stay: a failed call does not mean another worker
        took the partitions over (and claiming them again could take them from one that did)."""
        self._drop_records()
        self._watermarks.clear()
        self._marks_loaded = False
        self._epoch = None

    async def claim(self, partitions: Iterable[PartitionKey]) -> None:
        """Become the writer of the ``partitions`` not claimed yet (an assignment: a store that
        lost them can no longer write them) and read their watermarks."""
        new = set(partitions) - self._claimed
        if new:
            await self._claim(new)

    async def _claim(self, partitions: set[PartitionKey]) -> None:
        """Become the writer of ``partitions`` and read their watermarks."""
        ordered = sorted(partitions)
        fields = [_field(p) for p in ordered]
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hset(self.owner_key, mapping=dict.fromkeys(fields, self._token))
            pipe.hmget(self.watermark_key, fields)
            _, marks = await pipe.execute()
        self._set_marks(ordered, marks)
        self._claimed.update(ordered)

    async def _reload_marks(self) -> None:
        """The watermarks of the partitions this store claimed, read again after a failure."""
        ordered = sorted(self._claimed)
        if ordered:
            marks = await self._client.hmget(self.watermark_key, [_field(p) for p in ordered])
            self._set_marks(ordered, marks)
        self._marks_loaded = True

    def _set_marks(self, ordered: list[PartitionKey], marks: Sequence[bytes | str | None]) -> None:
        for partition, mark in zip(ordered, marks, strict=True):
            if mark is not None:
                self._watermarks[partition] = int(float(_text(mark)))
            else:
                self._watermarks.pop(partition, None)

    # -- the batch ----------------------------------------------------------------------------

    async def apply_batch(
        self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int
    ) -> BatchOutcome:
        """Apply the batch to the held records; write them (``defer_writes=False``) or stage
        the write for the ledger's call (``take_staged``)."""
        self._discard_staged()
        if not updates:
            return BatchOutcome(statuses=[], before=StatesBefore({}))
        return await self._apply_and_write(
            updates, allowed_lateness_ms, stage=self.defer_writes, fence_claimed=False
        )

    async def _apply_and_write(
        self,
        updates: Sequence[StateUpdate],
        allowed_lateness_ms: int,
        *,
        stage: bool,
        fence_claimed: bool,
    ) -> BatchOutcome:
        """Apply ``updates`` in memory, then stage the write (``stage``) or make it, its call
        fenced by the batch's partitions or by every claimed one (``fence_claimed``); a call
        refused as stale reads what it needs again and runs again."""
        for _ in range(STALE_RETRIES):
            try:
                outcome, write = await self._apply_once(updates, allowed_lateness_ms)
                if stage:
                    self._staged = write
                    return outcome
                if write is not None:
                    if fence_claimed:
                        marks = self._watermarks
                        fence = [(_field(p), marks[p]) for p in sorted(self._claimed) if p in marks]
                        write = dataclasses.replace(write, marks=fence)
                    await self._commit(features=write)
                    self.written(write)
                return outcome
            except StateEpochMoved:
                self.refused_as_stale()
            except BaseException:
                self._drop_after_failure()
                raise
        raise StreamsError(
            f"feature state epoch kept moving during {STALE_RETRIES} attempts to write a batch "
            "(is `dealstream forget` running in a loop?)"
        )

    def _discard_staged(self) -> None:
        """A staged write no ledger call carried (its batch failed first): what is held is
        ahead of Redis, so it is read again."""
        if self._staged is not None:
            self._staged = None
            self._drop_after_failure()

    async def _apply_once(
        self, updates: Sequence[StateUpdate], allowed_lateness_ms: int
    ) -> tuple[BatchOutcome, FeatureWrite | None]:
        """The batch applied in memory, and the write that stores it (None: nothing to write)."""
        client = self._client
        if self._epoch is None:
            self._epoch = _text(await client.get(self.epoch_key) or b"0")
        if not self._marks_loaded:
            await self._reload_marks()
        partitions = {(u.position.source, u.position.partition) for u in updates if u.position}
        if not partitions <= self._claimed:
            await self._claim(partitions - self._claimed)
        loaded = await self._load_missing(updates)
        held = self._records
        outcome, users, bytes_added = apply_updates(
            held,
            self._watermarks,
            updates,
            allowed_lateness_ms=allowed_lateness_ms,
            forgotten=self._forgotten,
        )
        self._record_bytes += bytes_added
        if not users and not partitions:
            return outcome, None
        blobs = [held[user] for user in users]
        return outcome, FeatureWrite(
            token=self._token,
            epoch=self._epoch,
            ttl_ms=self.ttl_seconds * 1000,
            field=RECORD_FIELD,
            marks=[(_field(p), self._watermarks[p]) for p in sorted(partitions)],
            users=users,
            keys=[self.user_key(user) for user in users],
            records=blobs,
            refresh=bytes(
                49 if user in loaded or _day_moved(outcome.before.record(user), blob) else 48
                for user, blob in zip(users, blobs, strict=True)
            ),
        )

    async def store_now(self, updates: Sequence[StateUpdate], *, allowed_lateness_ms: int) -> int:
        """Apply ``updates`` (granted offers: no source position) and write them at once, in a
        call fenced by every partition this store claims: a revoke or a stop stores the offers
        its last batch granted before the partitions' next owner reads the users' records, and
        an assignment stores those its outbox entries recovered (``streams/worker/recovery.py``).
        Returns how many were applied (the others were stored before: their ids are known).
        Raises ``PartitionFenced`` when another store claimed one of them since."""
        self._discard_staged()
        if not updates:
            return 0
        outcome = await self._apply_and_write(
            updates, allowed_lateness_ms, stage=False, fence_claimed=True
        )
        return outcome.statuses.count(UpdateStatus.APPLIED)

    # -- the staged write (``defer_writes``: the ledger's call carries it) ---------------------

    def take_staged(self) -> FeatureWrite | None:
        """The last batch's write, for the ledger's call; the store then waits to hear how it
        went (``written``, ``refused_as_stale`` or ``failed``)."""
        write, self._staged = self._staged, None
        return write

    def written(self, write: FeatureWrite | None) -> None:
        """The write reached Redis: a store holding too many records drops the least recently
        written (the written ones are at the end already)."""
        if write is not None:
            self._evict()

    def refused_as_stale(self) -> None:
        """Records were rewritten behind this store (``forget``): read them again. What the
        batch applied in memory is dropped with them; the watermarks only moved here."""
        self._drop_records()
        self._watermarks.clear()
        self._marks_loaded = False
        self._epoch = None

    def failed(self) -> None:
        """The write's call failed: nothing held can be trusted to match Redis."""
        self._drop_after_failure()

    async def _load_missing(self, updates: Sequence[StateUpdate]) -> set[str]:
        """Read the records of the batch's users this store does not hold (the turn of a
        generation drops those held too long), and their tombstones (two calls sent together);
        returns the users read (whose keys' time to live this store has not set)."""
        self._turn_generation()
        records, aged, forgotten = self._records, self._aged, self._forgotten
        missing: dict[str, None] = {}
        wall_ms = self._wall_clock_ms() if forgotten else 0.0
        for update in updates:
            user = update.user_id
            if user in records:
                continue
            if aged and (aged_record := aged.pop(user, None)) is not None:
                records[user] = aged_record
                continue
            if forgotten and user in forgotten:
                if forgotten[user] > wall_ms:
                    continue
                del forgotten[user]
            missing[user] = None
        if not missing:
            return set()
        users = list(missing)
        blobs, tombstones = await self._read(users)
        for user, blob, tombstone in zip(users, blobs, tombstones, strict=True):
            if tombstone is not None:
                forgotten[user] = _tombstone_until(tombstone)
            elif blob is not None:
                record = records[user] = _blob(blob)
                self._record_bytes += len(record)
        return set(users)

    async def _read(
        self, users: Sequence[str]
    ) -> tuple[list[bytes | str | None], list[bytes | str | None]]:
        """The users' records and tombstones as Redis has them (None: none): the records by
        one script call (a pipeline of one ``HGET`` per user cost the client more than the
        batch's own write), the tombstones by an ``MGET`` sent meanwhile (a script's keys must
        be writable by its ACL user, and a worker may only read tombstones)."""
        records = self._read_script(
            keys=[self.user_key(user) for user in users], args=[RECORD_FIELD]
        )
        tombstones = self._client.mget([self.tombstone_key(user) for user in users])
        blobs, marks = await asyncio.gather(records, tombstones)
        return list(blobs), list(marks)

    def _evict(self) -> None:
        forgotten = self._forgotten
        if len(forgotten) > self.max_cached_users:
            # Rare (one per `forget`): after the batch, the oldest go and are read again.
            for user in list(forgotten)[: len(forgotten) - self.max_cached_users]:
                del forgotten[user]
        excess = len(self._records) + len(self._aged) - self.max_cached_users
        if excess <= 0:
            return
        # The least recently written go, and a tenth of the bound more: a full store then
        # picks its victims once every many batches, not in every batch.
        count = excess + self.max_cached_users // 10
        for held in (self._aged, self._records):
            victims = list(itertools.islice(held, count))
            for user in victims:
                self._record_bytes -= len(held.pop(user))
            count -= len(victims)
            if count <= 0:
                break

    # -- reads for tools and tests ------------------------------------------------------------

    async def read_records(self, user_ids: Iterable[str]) -> dict[str, UserRecord]:
        """The records Redis holds (an empty record for a user it has none of)."""
        ids = list(user_ids)
        if not ids:
            return {}
        # One HGET per user: tools may read with an ACL user that runs no scripts.
        async with self._client.pipeline(transaction=False) as pipe:
            for user in ids:
                pipe.hget(self.user_key(user), RECORD_FIELD)
            blobs = await pipe.execute()
        return {
            user: decode_record(_blob(blob)) if blob is not None else UserRecord()
            for user, blob in zip(ids, blobs, strict=True)
        }

    async def read_states(self, user_ids: Iterable[str]) -> dict[str, State]:
        records = await self.read_records(user_ids)
        return {user: record.state for user, record in records.items()}

    async def watermarks(self) -> dict[PartitionKey, int]:
        raw = await self._client.hgetall(self.watermark_key)
        marks: dict[PartitionKey, int] = {}
        for field, offset in raw.items():
            source, _, partition = _text(field).rpartition(":")
            marks[(source, int(partition))] = int(float(_text(offset)))
        return marks

    async def forget(self, user_id: str, *, tombstone_ttl_s: float | None = None) -> int:
        """Delete the user's hash (the record, and the ledger's guards and pending decisions
        beside it: ``RedisLedger.forget`` first removes the user from the label indexes) and, with
        ``tombstone_ttl_s``, write a tombstone that stops the record being rebuilt for that
        long; every store drops what it holds before its next write."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(*self.user_keys(user_id))
            if tombstone_ttl_s is not None:
                ttl_ms = max(1, int(tombstone_ttl_s * 1000))
                until = int(self._wall_clock_ms()) + ttl_ms
                pipe.set(self.tombstone_key(user_id), str(until), px=ttl_ms)
            pipe.incr(self.epoch_key)
            replies = await pipe.execute()
        self._record_bytes -= len(self._records.pop(user_id, b""))
        self._record_bytes -= len(self._aged.pop(user_id, b""))
        return int(replies[0])

    async def forgotten_until(self, user_id: str) -> int | None:
        """When the user's tombstone expires (epoch ms), or None without one."""
        raw = await self._client.get(self.tombstone_key(user_id))
        return None if raw is None else int(float(_text(raw)))
