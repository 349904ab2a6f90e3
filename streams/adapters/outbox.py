"""The outbox: a batch's outputs kept in Redis, with its effect, until Kafka has committed it.

The worker's one call per batch (``commit_batch.lua``) writes the feature records, settles
the ledger and stores an entry holding what the batch publishes: the decision drafts (the
records each decision publishes, ``DecisionDraft``) and the outcomes and label events the
ledger decided. The offers, decisions and training examples are a pure function of those
(``DiscountEngine.settled_outputs``), so they can be published again, with the same ids,
whenever a crash may have lost them:

- a call whose reply was lost (a connection error or a timeout) is resolved by reading its
  entry: there, it landed and its reply is taken from the entry; absent, it never ran and it
  is sent again (``RedisLedger``);
- on every assignment, before any record is read, every entry that covers one of the worker's
  partitions is recovered (``streams/worker/recovery.py``): published again if Kafka has not
  committed its batch (a committed offset at or below the entry's watermark), its granted
  offers stored in their users' state (the worker that granted them may have stopped before
  its next batch carried them), and the worker's partitions released from its coverage
  (``release``): the entry is deleted when nothing is left of it.

Entries live until every partition they cover is committed past them: the event consumer
reports its commits (``committed``), and the next call deletes what they acknowledge. Keys:
``<prefix>ob`` (entry id -> outcomes and events as JSON, a newline, the drafts) and
``<prefix>obc`` (entry id -> coverage: ``{"<topic>:<partition>": watermark}``). An entry id
is ``<writer token>:<sequence>``, so the entries of one writer sort in batch order.

User ids: a draft's decision keeps its raw user id (the offer published again needs the id
the shop knows; the decision is pseudonymised as it is published), so an entry's drafts are
sealed as a whole (AES-GCM, ``Pseudonyms.seal``), never stored in the clear. The ledger's label
events in an entry hold pseudonyms.

Consumers see a re-published output twice when the first publication made it to Kafka
before the crash: offers dedup by ``offer_id``, decisions by ``decision_id``, the learner by
example (docs/delivery.md).
"""

from __future__ import annotations

import operator
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from engine.decisions import Decision, DecisionDraft, offer_beside
from engine.features.catalogue import StoredFeatures, features_from_stored, stored_features
from streams.adapters.batch_commit import OutboxWrite
from streams.adapters.pseudonyms import Pseudonyms
from streams.adapters.redis_client import RedisClient
from streams.adapters.replica_wait import ReplicaWait
from streams.errors import StreamsError

TopicPartitionKey = tuple[str, int]


def encode_drafts(
    drafts: Sequence[DecisionDraft | None],
    pseudonyms: Pseudonyms | None = None,
    packed: Sequence[StoredFeatures | None] | None = None,
) -> bytes:
    """One JSON array, one item per ledger op: null for a purchase, else the draft as a flat
    list (``_DECISION_FIELDS``, then P(purchase) without an offer, then the offer).

    Compact because every batch writes it to Redis (and its append-only file): the features are
    kept as pending records keep them (``stored_features``: their values packed in catalogue
    order), and the offer is its expiry and reasons: the rest is
    the decision's (``offer_beside``, as the engine builds it). The whole array is sealed
    (``Pseudonyms.seal``; as is under ``Pseudonyms.raw()``): it holds raw user ids."""
    items: list[Any] = []
    for index, draft in enumerate(drafts):
        if draft is None:
            items.append(None)
            continue
        decision, offer = draft.decision, draft.offer
        item = list(_decision_values(decision))
        stored = packed[index] if packed is not None else None
        item[_FEATURES_AT] = stored if stored is not None else stored_features(decision.features)
        item.append(draft.p_no_offer)
        item.append(None if offer is None else [offer.expires_at, [list(r) for r in offer.reasons]])
        items.append(item)
    return (pseudonyms if pseudonyms is not None else Pseudonyms.raw()).seal(orjson.dumps(items))


def decode_drafts(blob: bytes, pseudonyms: Pseudonyms | None = None) -> list[DecisionDraft | None]:
    """``encode_drafts`` reversed; ``SealedIdError`` when the drafts were sealed under a key
    ``pseudonyms`` does not hold."""
    opened = (pseudonyms if pseudonyms is not None else Pseudonyms.raw()).unseal(blob)
    drafts: list[DecisionDraft | None] = []
    for item in orjson.loads(opened):
        if item is None:
            drafts.append(None)
            continue
        fields = dict(zip(_DECISION_FIELDS, item, strict=False))
        if not isinstance(fields.get("user_id"), str):
            raise StreamsError(
                "an outbox entry's draft has no user id in the clear inside its sealed drafts: "
                "written by an earlier layout (user ids sealed one by one); stop workers cleanly "
                "before an upgrade"
            )
        fields["features"] = features_from_stored(fields["features"])
        fields["rules"] = tuple(fields["rules"])
        decision = Decision(**fields, denied_by=None)
        p_no_offer, offer_item = item[len(_DECISION_FIELDS)], item[len(_DECISION_FIELDS) + 1]
        offer = None
        if offer_item is not None:
            expires_at, reasons = offer_item
            offer = offer_beside(decision, expires_at, reasons)
        drafts.append(DecisionDraft(decision, offer, p_no_offer))
    return drafts


_DECISION_FIELDS = tuple(name for name in Decision.__dataclass_fields__ if name != "denied_by")
"""A draft's decision, field by field (``denied_by`` is always None in a draft)."""
_FEATURES_AT = _DECISION_FIELDS.index("features")
_decision_values = operator.attrgetter(*_DECISION_FIELDS)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One batch's entry as stored: the drafts and the ledger's raw reply."""

    entry_id: str
    coverage: Mapping[str, int]
    drafts: Sequence[DecisionDraft | None]
    outcomes: Sequence[int]
    events: Sequence[str]
    """Flat (kind, record, converted_at or '', at), as ``commit_batch.lua`` returns them."""


def parse_entry(
    entry_id: str,
    coverage: Mapping[str, int],
    raw: bytes | str,
    pseudonyms: Pseudonyms | None = None,
) -> OutboxEntry:
    if isinstance(raw, str):  # the drafts are sealed bytes, which a decoding client mangles
        raise StreamsError("the outbox needs a Redis client without decode_responses")
    reply_json, _, drafts = raw.partition(b"\n")
    reply = orjson.loads(reply_json)
    if not isinstance(reply, dict):
        raise StreamsError(f"outbox entry {entry_id} is not an outcomes/events object")
    # cjson writes an empty Lua table as an object: {} is an empty list here
    outcomes = reply.get("outcomes") or []
    events = reply.get("events") or []
    return OutboxEntry(
        entry_id=entry_id,
        coverage=coverage,
        drafts=decode_drafts(drafts, pseudonyms),
        outcomes=[int(code) for code in outcomes],
        events=[str(value) for value in events],
    )


def entry_order(entry_id: str) -> tuple[str, int]:
    """Sort key: a writer's entries in batch order."""
    token, _, sequence = entry_id.rpartition(":")
    return token, int(sequence)


_RELEASE = """
-- KEYS[1] entries, KEYS[2] coverage; ARGV: n entry ids, then n JSON arrays of fields to release
local n = #ARGV / 2
for k = 1, n do
  local id = ARGV[k]
  local raw = redis.call('HGET', KEYS[2], id)
  if raw then
    local coverage = cjson.decode(raw)
    for _, field in ipairs(cjson.decode(ARGV[n + k])) do coverage[field] = nil end
    if next(coverage) == nil then
      redis.call('HDEL', KEYS[1], id)
      redis.call('HDEL', KEYS[2], id)
    else
      redis.call('HSET', KEYS[2], id, cjson.encode(coverage))
    end
  end
end
return n
"""
"""``Outbox.release``: one atomic step, so that two owners releasing at once lose nothing."""


def _field(partition: TopicPartitionKey) -> str:
    return f"{partition[0]}:{partition[1]}"


class Outbox:
    """This worker's outbox entries: the ids its calls write, and which Kafka committed."""

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        pseudonyms: Pseudonyms | None = None,
        replication: ReplicaWait | None = None,
    ) -> None:
        self._client = client
        self._replication = replication
        """With replicas to wait for, ``read_one`` reads from the primary and waits for them."""
        self.pseudonyms = pseudonyms if pseudonyms is not None else Pseudonyms.raw()
        self.entries_key = f"{prefix}ob"
        self.coverage_key = f"{prefix}obc"
        self._token = secrets.token_hex(8)
        self._sequence = 0
        self._own: dict[str, dict[str, int]] = {}
        """Entries this worker wrote that Kafka has not committed yet, by id: their coverage."""
        self._committed: dict[str, int] = {}
        """The offset committed last per partition field (the next one to read)."""
        self._acked: list[str] = []
        """Entries Kafka committed: deleted by the next call."""
        self._release = client.register_script(_RELEASE)

    def write(
        self,
        drafts: Sequence[DecisionDraft | None],
        marks: Sequence[tuple[str, int]],
        packed: Sequence[StoredFeatures | None] | None = None,
    ) -> OutboxWrite | None:
        """The next call's outbox section; None for a batch that covers no partition (it
        could never be matched to a commit). ``packed``: as ``encode_drafts`` takes it."""
        if not marks:
            return None
        self._sequence += 1
        entry_id = f"{self._token}:{self._sequence}"
        coverage = dict(marks)
        self._own[entry_id] = coverage
        acked, self._acked = self._acked, []
        return OutboxWrite(
            entry_id=entry_id,
            coverage=orjson.dumps(coverage),
            drafts=encode_drafts(drafts, self.pseudonyms, packed),
            acked=acked,
        )

    def failed(self, write: OutboxWrite) -> None:
        """The call did not run: its entry does not exist and its acknowledgements wait."""
        self._own.pop(write.entry_id, None)
        self._acked.extend(write.acked)

    def committed(self, offsets: Mapping[TopicPartitionKey, int]) -> None:
        """Kafka committed these offsets (the next to read, per partition): entries fully
        behind them are deleted with the next call."""
        committed = self._committed
        for partition, offset in offsets.items():
            field = _field(partition)
            committed[field] = max(offset, committed.get(field, offset))
        done = [
            entry_id
            for entry_id, coverage in self._own.items()
            if all(committed.get(field, -1) > mark for field, mark in coverage.items())
        ]
        for entry_id in done:
            del self._own[entry_id]
        self._acked.extend(done)

    def outstanding(self) -> int:
        """Entries this worker wrote that Kafka has not committed yet."""
        return len(self._own)

    # -- assignment: the entries' next owner finds what is left (streams/worker/recovery.py) --

    def on_assigned(self, partitions: Iterable[TopicPartitionKey]) -> None:
        del partitions

    def on_revoked(self, partitions: Iterable[TopicPartitionKey]) -> None:
        """Forget the entries written so far: whoever is assigned their partitions next (this
        worker too) deletes them, or publishes them again if Kafka did not commit them."""
        del partitions
        self._own.clear()
        self._committed.clear()

    # -- reads for recovery ---------------------------------------------------------------------

    async def coverage(self) -> dict[str, dict[str, int]]:
        """Every entry in Redis (every worker's), by id: the partitions and watermarks it covers."""
        raw = await self._client.hgetall(self.coverage_key)
        return {
            (k.decode() if isinstance(k, bytes) else k): {
                str(field): int(mark) for field, mark in orjson.loads(v).items()
            }
            for k, v in raw.items()
        }

    async def read(self, coverage: Mapping[str, Mapping[str, int]]) -> list[OutboxEntry]:
        """The entries named (with their coverage), in each writer's batch order; an entry
        deleted meanwhile is left out."""
        ids = sorted(coverage, key=entry_order)
        if not ids:
            return []
        raws = await self._client.hmget(self.entries_key, ids)
        return [
            parse_entry(entry_id, coverage[entry_id], raw, self.pseudonyms)
            for entry_id, raw in zip(ids, raws, strict=True)
            if raw is not None
        ]

    async def read_one(self, entry_id: str) -> OutboxEntry | None:
        """The entry, if its call landed (``RedisLedger`` asks after a lost reply); with a
        ``ReplicaWait``, only once replicated (``ReplicationShortfall`` otherwise)."""
        if self._replication is not None:
            raw = await self._replication.landed(self.entries_key, entry_id)
        else:
            raw = await self._client.hget(self.entries_key, entry_id)
        return None if raw is None else parse_entry(entry_id, {}, raw, self.pseudonyms)

    async def release(self, entries: Mapping[str, Collection[str]]) -> None:
        """Take the named partition fields out of each entry's coverage, and delete an entry
        once nothing is left of it: each partition's owner releases its own share, so an entry
        whose partitions went to several workers stays until every one of them has looked."""
        ids = sorted(entries, key=entry_order)
        if ids:
            fields = [orjson.dumps(sorted(entries[entry_id])).decode() for entry_id in ids]
            await self._release(keys=[self.entries_key, self.coverage_key], args=[*ids, *fields])
