"""Settings: frozen, typed objects read from ``DEALSTREAM_*`` environment variables.

This is the only module that reads the environment: ``Settings`` (shared by every command),
``LearnerSettings``, the model keys and ``DemoSettings``. Only the command line
(``streams/cli/``) calls their ``from_env`` readers; everything else receives the objects it
needs as arguments.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from engine.errors import ModelSnapshotError
from engine.model.feedback import Feedback, FeedbackMethod
from engine.model.signing import (
    generate_signing_key,
    signing_key_from_pem,
    signing_key_pem,
    verify_key_from_pem,
    verify_key_pem,
)
from streams.errors import ConfigError

if TYPE_CHECKING:
    from engine.pipeline import EngineConfig

ENV_PREFIX = "DEALSTREAM_"
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's ceiling on its mmap threshold on 64-bit systems (``HEAP_MAX_SIZE / 2``): ``mallopt``
refuses a larger one (``streams/operations/allocator.py``)."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A value that never shows up in reprs or logs."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def redact_url(url: str) -> str:
    """The URL with any password (userinfo or ``?password=``) replaced, safe to log."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":****@")
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "****" if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of the contract, with the configured prefix."""

    prefix: str = ""

    @property
    def browse(self) -> str:
        return f"{self.prefix}events.browse"

    @property
    def search(self) -> str:
        return f"{self.prefix}events.search"

    @property
    def purchase(self) -> str:
        return f"{self.prefix}events.purchase"

    @property
    def events(self) -> tuple[str, str, str]:
        return (self.browse, self.search, self.purchase)

    @property
    def offers(self) -> str:
        return f"{self.prefix}offers"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}decisions"

    @property
    def training(self) -> str:
        return f"{self.prefix}training"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}events.dlq"

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.events, self.offers, self.decisions, self.training, self.dlq)

    def event_type_of(self, topic: str) -> str | None:
        """The event type a topic carries (``browse`` for ``<prefix>events.browse``). Asked
        for every consumed record: read from the name, not from the three names built anew."""
        prefix = self.prefix
        if not topic.startswith(prefix):
            return None
        return _EVENT_TYPE_BY_NAME.get(topic[len(prefix) :])


_EVENT_TYPE_BY_NAME = {
    "events.browse": "browse",
    "events.search": "search",
    "events.purchase": "purchase",
}
"""An event topic's name after the prefix -> the event type it carries (``Topics``' names)."""


@dataclass(frozen=True, slots=True)
class TopicReplication:
    """How the topics we create are replicated (``DEALSTREAM_REPLICATION_FACTOR``, default 1
    for one local broker; ``DEALSTREAM_MIN_INSYNC_REPLICAS``, default 2 from a factor of 3 up,
    else 1). With the producers' ``acks=all``, a write is acknowledged once ``min_insync``
    replicas have it, so a record acknowledged survives the loss of ``min_insync - 1`` brokers;
    when fewer replicas are in sync, nothing is acknowledged: the idempotent producer keeps
    retrying and the worker waits (it commits no offsets) until enough replicas are back, or
    until a delivery timeout of the producer gives the record up, which stops the worker
    (docs/delivery.md)."""

    factor: int = 1
    min_insync: int = 1

    @classmethod
    def of(cls, factor: int, min_insync: int | None = None) -> TopicReplication:
        """Validated; ``min_insync`` defaults to 2 for a factor of 3 or more (tolerate one
        broker down, lose nothing acknowledged), else 1."""
        if factor < 1:
            raise ConfigError(f"{ENV_PREFIX}REPLICATION_FACTOR must be at least 1, got {factor}")
        chosen = min_insync if min_insync is not None else (2 if factor >= 3 else 1)
        if not 1 <= chosen <= factor:
            raise ConfigError(
                f"{ENV_PREFIX}MIN_INSYNC_REPLICAS must be within 1 and the replication factor "
                f"({factor}), got {chosen}"
            )
        return cls(factor, chosen)

    def topic_configs(self) -> dict[str, str]:
        return {"min.insync.replicas": str(self.min_insync)}


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """What a TLS client trusts and shows: the CA bundle (None: the system's), an optional
    client certificate and key (PEM) and whether the server's name must match its
    certificate. Read by ``streams.adapters.kafka_io`` and ``streams.adapters.redis_client``."""

    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    key_password: Secret | None = None
    check_hostname: bool = True

    @property
    def configured(self) -> bool:
        return any((self.cafile, self.certfile, self.keyfile, self.key_password))


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How every Kafka client of ours connects (``DEALSTREAM_KAFKA_SECURITY_PROTOCOL`` and
    the ``DEALSTREAM_KAFKA_SASL_*`` / ``DEALSTREAM_KAFKA_SSL_*`` settings,
    docs/security-transport.md); the default is a plaintext connection without login."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: Secret | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")


@dataclass(frozen=True, slots=True)
class RedisSecurity:
    """The Redis ACL user and TLS files (``DEALSTREAM_REDIS_USERNAME``,
    ``DEALSTREAM_REDIS_PASSWORD``, ``DEALSTREAM_REDIS_SSL_*``); TLS itself is the URL's
    ``rediss://`` scheme. A username or password set here wins over one in the URL."""

    username: str | None = None
    password: Secret | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: Secret = Secret("redis://127.0.0.1:6379/0")
    topic_prefix: str = ""
    redis_prefix: str = "ds:"
    redis_timeout_s: float = 5.0
    """How long any Redis client of ours waits to connect and for each reply
    (``DEALSTREAM_REDIS_TIMEOUT_S``): a hung Redis fails the call instead of holding the process.
    The slowest script of 2,000-event batches took 27 ms in Redis (docs/delivery.md)."""
    redis_retry_deadline_s: float = 120.0
    """How long the worker retries a batch that fails on Redis for a reason that can heal
    (unreachable, timeouts, loading, failover, OOM) before it stops
    (``DEALSTREAM_REDIS_RETRY_DEADLINE_S``; 0: forever)."""
    stop_timeout_s: float = 25.0
    """How long the worker's graceful stop (SIGTERM, SIGINT) may take before it exits anyway
    with status 75 (``DEALSTREAM_STOP_TIMEOUT_S``; 0: no limit): without Kafka, leaving the
    group and the last commit can wait for minutes. Below Kubernetes' default grace period
    (30 s), so the worker says why it stopped before the kubelet's SIGKILL would."""
    redis_cluster: bool = False
    """``DEALSTREAM_REDIS_CLUSTER``: ``DEALSTREAM_REDIS_URL`` names one node of a Redis Cluster.
    Every key then carries the hash tag of ``redis_prefix`` (one slot: ``redis_cluster_tag``)."""
    redis_wait_replicas: int = 0
    """Replicas that must acknowledge each batch's Redis call before its Kafka offsets can be
    committed (``DEALSTREAM_REDIS_WAIT_REPLICAS``; default 1 with ``redis_cluster``, else 0:
    no WAIT). docs/cluster.md."""
    redis_wait_timeout_s: float = 1.0
    """How long one ``WAIT`` waits for them (``DEALSTREAM_REDIS_WAIT_TIMEOUT_S``; below
    ``redis_timeout_s`` when replicas are waited for); fewer within it is a failure the worker
    retries like a lost reply."""
    campaigns_path: Path | None = None
    http_port: int = 6066
    http_bind: str = "127.0.0.1"
    """Address the HTTP endpoints listen on (``DEALSTREAM_HTTP_BIND``): loopback for local
    runs; containers set ``0.0.0.0`` (docs/security.md)."""
    http_token: Secret | None = None
    """Bearer token the status JSON requires (``DEALSTREAM_HTTP_TOKEN``, 16+ characters)."""
    group_id: str = "dealstream"
    partitions: int = 4
    replication: TopicReplication = field(default_factory=TopicReplication)
    """Replication of the topics we create (``DEALSTREAM_REPLICATION_FACTOR``,
    ``DEALSTREAM_MIN_INSYNC_REPLICAS``)."""
    batch_max: int = 500
    batch_within_s: float = 0.05
    state_cache_users: int = 200_000
    """Users whose feature records a worker keeps in memory (``DEALSTREAM_STATE_CACHE_USERS``;
    the least recently written go first and are read from Redis again when needed); it bounds
    the worker's other per-user memo too (the ledger's decision times)."""
    session_timeout_s: float = 10.0
    """The event consumer's group session: how long a worker that died without leaving the
    group (kill -9) keeps its partitions (``DEALSTREAM_SESSION_TIMEOUT_S``; the broker's
    minimum is 6 s by default)."""
    allowed_lateness_s: float = 3600.0
    attribution_window_s: float = 24 * 3600.0
    max_clock_skew_s: float = 300.0
    max_message_bytes: int = 1_000_000
    log_level: str = "INFO"
    log_format: str = "json"
    """``json`` (one object per line, see streams/operations/logs.py) or ``text``."""
    log_salt: Secret | None = None
    """Key of the ``user_ref`` hash in logs; None: a random one per process."""
    learn_inline: bool = False
    """Let the worker learn from its own labels (single-process setups without a learner)."""
    feedback: Feedback = field(default_factory=Feedback)
    """Delayed-feedback method (``DEALSTREAM_FEEDBACK``) and its wait
    (``DEALSTREAM_FEEDBACK_WAIT_S``): worker and learner must agree."""
    state_dir: Path = Path(".dealstream")
    """Local state of the command line (``DEALSTREAM_STATE``): replay checkpoints, demo logs."""
    crash_at: str | None = None
    """Fault tests only: stop the worker dead at a step of a batch (``DEALSTREAM_CRASH_AT``,
    ``streams/worker/crash_points.py``)."""
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    """TLS and SASL of every Kafka client (``DEALSTREAM_KAFKA_SECURITY_PROTOCOL`` ...)."""
    redis_security: RedisSecurity = field(default_factory=RedisSecurity)
    """ACL user and TLS files of every Redis client (``DEALSTREAM_REDIS_USERNAME`` ...)."""
    # -- privacy (docs/privacy.md) --
    pseudonym_key: Secret | None = None
    """Key of the user ids' pseudonyms in Redis and on ``decisions``
    (``DEALSTREAM_PSEUDONYM_KEY``, at least 16 bytes; never logged)."""
    pseudonym_key_id: str = "k1"
    """Prefix of every pseudonym (``DEALSTREAM_PSEUDONYM_KEY_ID``): a new key, a new id."""
    raw_user_ids: bool = False
    """``DEALSTREAM_PSEUDONYMS=off``: store raw user ids (local demos; the worker logs it)."""
    forget_ttl_s: float = 7 * 24 * 3600.0
    """How long ``dealstream forget``'s tombstone stops a profile being rebuilt
    (``DEALSTREAM_FORGET_TTL_S``; default Kafka's default retention, 7 days)."""
    gc_threshold: int = 50_000
    """Net allocations between two young-generation collections of Python's garbage collector
    (``DEALSTREAM_GC_THRESHOLD``; Python's own is 700; 0 leaves the collector as Python sets
    it): ``streams/operations/garbage_collector.py``."""
    malloc_mmap_threshold: int = 128 * 1024
    """Bytes from which the C library serves an allocation with a mapping of its own, fixed
    (``DEALSTREAM_MALLOC_MMAP_THRESHOLD``; at most 32 MiB; 0 leaves glibc to raise it as large
    blocks are freed, which let the worker's heap grow with the events it processed):
    ``streams/operations/allocator.py``."""

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def engine_config(self) -> EngineConfig:
        """What the engine takes of these settings."""
        from engine.pipeline import EngineConfig  # the engine loads River: only when needed

        return EngineConfig(
            allowed_lateness_ms=int(self.allowed_lateness_s * 1000),
            attribution_window_ms=int(self.attribution_window_s * 1000),
            learn_inline=self.learn_inline,
            feedback=self.feedback,
            # live: today's budgets, whatever the events' times (a replay of history included)
            budget_clock="wall",
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        def number(name: str, default: float, kind: type[int] | type[float]) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(
                    f"{ENV_PREFIX}{name}={raw!r} is not a valid {kind.__name__}"
                ) from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{ENV_PREFIX}{name} must be a finite number, got {raw}")
            if value < 0:
                raise ConfigError(f"{ENV_PREFIX}{name} must not be negative, got {raw}")
            return value

        defaults = cls()
        campaigns = get("CAMPAIGNS")
        redis_url = get("REDIS_URL") or defaults.redis_url.reveal()
        redis_prefix = get("REDIS_PREFIX") or defaults.redis_prefix
        redis_timeout_s = _above_zero(
            "REDIS_TIMEOUT_S", number("REDIS_TIMEOUT_S", defaults.redis_timeout_s, float)
        )
        redis_security = _redis_security(get, redis_url)
        redis_cluster = _flag(get("REDIS_CLUSTER"), "REDIS_CLUSTER")
        if redis_cluster:
            _check_redis_cluster(redis_url, redis_prefix, redis_security)
        wait_timeout_s = _above_zero(
            "REDIS_WAIT_TIMEOUT_S",
            number("REDIS_WAIT_TIMEOUT_S", defaults.redis_wait_timeout_s, float),
        )
        wait_replicas = int(number("REDIS_WAIT_REPLICAS", 1 if redis_cluster else 0, int))
        if wait_replicas > 0 and wait_timeout_s >= redis_timeout_s:
            raise ConfigError(
                f"{ENV_PREFIX}REDIS_WAIT_TIMEOUT_S ({wait_timeout_s:g}) must be below "
                f"{ENV_PREFIX}REDIS_TIMEOUT_S ({redis_timeout_s:g}): the client would give up "
                "on the WAIT before Redis answers it"
            )
        return cls(
            kafka_bootstrap=get("KAFKA_BOOTSTRAP") or defaults.kafka_bootstrap,
            redis_url=Secret(redis_url),
            topic_prefix=get("TOPIC_PREFIX") or "",
            redis_prefix=redis_prefix,
            redis_timeout_s=redis_timeout_s,
            redis_retry_deadline_s=number(
                "REDIS_RETRY_DEADLINE_S", defaults.redis_retry_deadline_s, float
            ),
            stop_timeout_s=_at_least_zero(
                "STOP_TIMEOUT_S", number("STOP_TIMEOUT_S", defaults.stop_timeout_s, float)
            ),
            redis_cluster=redis_cluster,
            redis_wait_replicas=wait_replicas,
            redis_wait_timeout_s=wait_timeout_s,
            campaigns_path=Path(campaigns) if campaigns else None,
            http_port=_port(int(number("HTTP_PORT", defaults.http_port, int))),
            http_bind=_bind_address(get("HTTP_BIND") or defaults.http_bind),
            http_token=_http_token(get("HTTP_TOKEN")),
            group_id=get("GROUP_ID") or defaults.group_id,
            partitions=max(1, int(number("PARTITIONS", defaults.partitions, int))),
            replication=TopicReplication.of(
                int(number("REPLICATION_FACTOR", defaults.replication.factor, int)),
                int(number("MIN_INSYNC_REPLICAS", 0, int)) if get("MIN_INSYNC_REPLICAS") else None,
            ),
            batch_max=max(1, int(number("BATCH_MAX", defaults.batch_max, int))),
            batch_within_s=number("BATCH_WITHIN_S", defaults.batch_within_s, float),
            state_cache_users=max(
                1, int(number("STATE_CACHE_USERS", defaults.state_cache_users, int))
            ),
            session_timeout_s=number("SESSION_TIMEOUT_S", defaults.session_timeout_s, float),
            allowed_lateness_s=number("ALLOWED_LATENESS_S", defaults.allowed_lateness_s, float),
            attribution_window_s=number(
                "ATTRIBUTION_WINDOW_S", defaults.attribution_window_s, float
            ),
            max_clock_skew_s=number("MAX_CLOCK_SKEW_S", defaults.max_clock_skew_s, float),
            max_message_bytes=int(number("MAX_MESSAGE_BYTES", defaults.max_message_bytes, int)),
            log_level=_log_level(get("LOG_LEVEL") or defaults.log_level),
            log_format=_log_format(get("LOG_FORMAT") or defaults.log_format),
            log_salt=Secret(salt) if (salt := get("LOG_SALT")) else None,
            learn_inline=_flag(get("LEARN_INLINE"), "LEARN_INLINE"),
            feedback=_feedback(
                get("FEEDBACK"),
                number("FEEDBACK_WAIT_S", 0.0, float) if get("FEEDBACK_WAIT_S") else None,
                number("ATTRIBUTION_WINDOW_S", defaults.attribution_window_s, float),
            ),
            # Read as it always was: set but empty means the working directory.
            state_dir=Path(env.get(ENV_PREFIX + "STATE", str(defaults.state_dir))),
            crash_at=get("CRASH_AT"),
            kafka_security=_kafka_security(get),
            redis_security=redis_security,
            pseudonym_key=_pseudonym_key(get("PSEUDONYM_KEY"), get("PSEUDONYMS")),
            pseudonym_key_id=get("PSEUDONYM_KEY_ID") or defaults.pseudonym_key_id,
            raw_user_ids=_raw_user_ids(get("PSEUDONYMS")),
            forget_ttl_s=_above_zero(
                "FORGET_TTL_S", number("FORGET_TTL_S", defaults.forget_ttl_s, float)
            ),
            gc_threshold=int(number("GC_THRESHOLD", defaults.gc_threshold, int)),
            malloc_mmap_threshold=_mmap_threshold(
                int(number("MALLOC_MMAP_THRESHOLD", defaults.malloc_mmap_threshold, int))
            ),
        )


def _mmap_threshold(threshold: int) -> int:
    if threshold > MAX_MMAP_THRESHOLD:
        raise ConfigError(
            f"{ENV_PREFIX}MALLOC_MMAP_THRESHOLD must be at most {MAX_MMAP_THRESHOLD} bytes "
            f"(glibc's ceiling), got {threshold}"
        )
    return threshold


def _tls_files(get: Callable[[str], str | None], scope: str) -> TlsFiles:
    """``DEALSTREAM_<scope>_SSL_CAFILE``, ``_CERTFILE``, ``_KEYFILE``, ``_KEY_PASSWORD``,
    ``_CHECK_HOSTNAME`` (default true)."""

    def path(name: str) -> Path | None:
        raw = get(f"{scope}_SSL_{name}")
        if raw is None:
            return None
        if not Path(raw).is_file():
            raise ConfigError(f"{ENV_PREFIX}{scope}_SSL_{name}={raw!r}: no such file")
        return Path(raw)

    files = TlsFiles(
        cafile=path("CAFILE"),
        certfile=path("CERTFILE"),
        keyfile=path("KEYFILE"),
        key_password=Secret(raw) if (raw := get(f"{scope}_SSL_KEY_PASSWORD")) else None,
        check_hostname=_flag(
            get(f"{scope}_SSL_CHECK_HOSTNAME") or "true", f"{scope}_SSL_CHECK_HOSTNAME"
        ),
    )
    if files.keyfile is not None and files.certfile is None:
        raise ConfigError(
            f"{ENV_PREFIX}{scope}_SSL_KEYFILE is set without {ENV_PREFIX}{scope}_SSL_CERTFILE: "
            "set both (a client certificate and its key)"
        )
    return files


def _kafka_security(get: Callable[[str], str | None]) -> KafkaSecurity:
    protocol = (get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").strip().upper()
    if protocol not in KAFKA_SECURITY_PROTOCOLS:
        raise ConfigError(
            f"{ENV_PREFIX}KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of "
            f"{', '.join(KAFKA_SECURITY_PROTOCOLS)}"
        )
    tls = _tls_files(get, "KAFKA")
    security = KafkaSecurity(
        protocol=protocol,
        sasl_mechanism=(get("KAFKA_SASL_MECHANISM") or "").strip().upper() or None,
        username=get("KAFKA_SASL_USERNAME"),
        password=Secret(raw) if (raw := get("KAFKA_SASL_PASSWORD")) else None,
        tls=tls,
    )
    if tls.configured and not security.uses_tls:
        raise ConfigError(
            f"{ENV_PREFIX}KAFKA_SSL_* is set but {ENV_PREFIX}KAFKA_SECURITY_PROTOCOL is "
            f"{protocol}: set it to SSL or SASL_SSL (or unset the SSL files)"
        )
    if not security.uses_sasl:
        if security.sasl_mechanism or security.username or security.password:
            raise ConfigError(
                f"{ENV_PREFIX}KAFKA_SASL_* is set but {ENV_PREFIX}KAFKA_SECURITY_PROTOCOL is "
                f"{protocol}: set it to SASL_SSL or SASL_PLAINTEXT (or unset the SASL settings)"
            )
        return security
    if security.sasl_mechanism not in KAFKA_SASL_MECHANISMS:
        raise ConfigError(
            f"{ENV_PREFIX}KAFKA_SASL_MECHANISM={security.sasl_mechanism!r} must be one of "
            f"{', '.join(KAFKA_SASL_MECHANISMS)} with {protocol}"
        )
    if security.username is None or security.password is None:
        raise ConfigError(
            f"{protocol} needs {ENV_PREFIX}KAFKA_SASL_USERNAME and {ENV_PREFIX}KAFKA_SASL_PASSWORD"
        )
    return security


def _redis_security(get: Callable[[str], str | None], url: str) -> RedisSecurity:
    tls = _tls_files(get, "REDIS")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{ENV_PREFIX}REDIS_URL must start with redis://, rediss:// (TLS) or unix://, "
            f"got {scheme or 'no scheme'}"
        )
    if tls.configured and scheme != "rediss":
        raise ConfigError(
            f"{ENV_PREFIX}REDIS_SSL_* is set but {ENV_PREFIX}REDIS_URL is {scheme}://: use "
            "rediss:// for TLS (or unset the SSL files)"
        )
    return RedisSecurity(
        username=get("REDIS_USERNAME"),
        password=Secret(raw) if (raw := get("REDIS_PASSWORD")) else None,
        tls=tls,
    )


def redis_cluster_tag(prefix: str) -> str | None:
    """The hash tag a key beginning with ``prefix`` hashes on in a Redis Cluster, when the
    prefix decides it: Redis hashes only the text between the first ``{`` of a key and the
    first ``}`` after it, when that is not empty; None when the prefix has no such tag (each
    key would then hash on its own tag, e.g. the user's).

    >>> redis_cluster_tag("dealstream:{ds}:")
    'ds'
    >>> redis_cluster_tag("ds:") is None, redis_cluster_tag("ds:{}:{x}") is None
    (True, True)
    """
    opening = prefix.find("{")
    closing = prefix.find("}", opening + 1) if opening >= 0 else -1
    if closing <= opening + 1:
        return None
    return prefix[opening + 1 : closing]


def _check_redis_cluster(url: str, prefix: str, security: RedisSecurity) -> None:
    """What ``DEALSTREAM_REDIS_CLUSTER`` needs: one hash tag in the prefix (every key of the
    deployment in one slot, so that each script call stays on one node), a TCP URL of
    database 0, and no key password (redis-py's ``RedisCluster`` takes none)."""
    if redis_cluster_tag(prefix) is None:
        raise ConfigError(
            f"{ENV_PREFIX}REDIS_CLUSTER is on but {ENV_PREFIX}REDIS_PREFIX={prefix!r} has no "
            "hash tag: every key must hash to one slot; set e.g. "
            f"{ENV_PREFIX}REDIS_PREFIX='dealstream:{{ds}}:' (docs/cluster.md)"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() == "unix":
        raise ConfigError(
            f"{ENV_PREFIX}REDIS_CLUSTER is on but {ENV_PREFIX}REDIS_URL is a unix:// socket: "
            "name one node of the cluster as redis:// or rediss://host:port"
        )
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(
            f"{ENV_PREFIX}REDIS_CLUSTER is on but {ENV_PREFIX}REDIS_URL names database "
            f"{parts.path.strip('/')}: a Redis Cluster has database 0 only"
        )
    if security.tls.key_password is not None:
        raise ConfigError(
            f"{ENV_PREFIX}REDIS_SSL_KEY_PASSWORD is not supported with {ENV_PREFIX}REDIS_CLUSTER "
            "(redis-py's cluster client takes no key password): use an unencrypted key file "
            "readable by this process only"
        )


MIN_PSEUDONYM_KEY_BYTES = 16


def _raw_user_ids(mode: str | None) -> bool:
    """``DEALSTREAM_PSEUDONYMS``: ``on`` (the default) or ``off``, the explicit raw-id choice."""
    if mode is None or mode.strip().lower() == "on":
        return False
    if mode.strip().lower() == "off":
        return True
    raise ConfigError(f"{ENV_PREFIX}PSEUDONYMS={mode!r} must be on or off")


def _pseudonym_key(key: str | None, mode: str | None) -> Secret | None:
    if key is None:
        return None
    if _raw_user_ids(mode):
        raise ConfigError(
            f"{ENV_PREFIX}PSEUDONYMS=off and {ENV_PREFIX}PSEUDONYM_KEY are both set: unset one"
        )
    if len(key.encode()) < MIN_PSEUDONYM_KEY_BYTES:
        raise ConfigError(
            f"{ENV_PREFIX}PSEUDONYM_KEY must be at least {MIN_PSEUDONYM_KEY_BYTES} bytes; "
            "generate one with `openssl rand -hex 32`"
        )
    return Secret(key)


def _feedback(method: str | None, wait_s: float | None, window_s: float) -> Feedback:
    """The method, and its wait: as set, else the default wait or half a shorter window."""
    default = Feedback()
    try:
        chosen = FeedbackMethod(method.strip().lower()) if method else default.method
    except ValueError:
        known = ", ".join(m.value for m in FeedbackMethod)
        raise ConfigError(f"{ENV_PREFIX}FEEDBACK={method!r} is not one of {known}") from None
    if wait_s is None:
        wait_s = min(default.elapsed_ms / 1000, window_s / 2)
    feedback = Feedback(chosen, int(wait_s * 1000))
    if feedback.ledger_elapsed_ms and not 0 < wait_s < window_s:
        raise ConfigError(
            f"{ENV_PREFIX}FEEDBACK_WAIT_S must be above 0 and below the attribution window "
            f"({window_s:g} s) for {chosen.value}, got {wait_s:g}"
        )
    return feedback


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")
"""``json``: one object per line (``streams/operations/logs.py``); ``text``: for people."""


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL={raw!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def _log_format(raw: str) -> str:
    fmt = raw.lower()
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"{ENV_PREFIX}LOG_FORMAT={raw!r} is not one of {', '.join(LOG_FORMATS)}")
    return fmt


def _flag(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} must be true or false")


def _above_zero(name: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(f"{ENV_PREFIX}{name} must be above 0, got {value:g}")
    return value


def _at_least_zero(name: str, value: float) -> float:
    if value < 0:
        raise ConfigError(f"{ENV_PREFIX}{name} must be 0 or more, got {value:g}")
    return value


def _bind_address(raw: str) -> str:
    address = raw.strip()
    if address == "localhost":
        return address
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(
            f"{ENV_PREFIX}HTTP_BIND={raw!r} is not an IP address (127.0.0.1 for this machine "
            "only, 0.0.0.0 for every interface)"
        ) from None
    return address


MIN_HTTP_TOKEN_CHARS = 16


def _http_token(raw: str | None) -> Secret | None:
    if raw is None:
        return None
    if len(raw) < MIN_HTTP_TOKEN_CHARS or not raw.isprintable() or raw != raw.strip():
        raise ConfigError(
            f"{ENV_PREFIX}HTTP_TOKEN must be at least {MIN_HTTP_TOKEN_CHARS} printable "
            "characters without surrounding spaces (e.g. `openssl rand -hex 32`)"
        )
    return Secret(raw)


def _port(value: int) -> int:
    if not 0 < value < 65536:
        raise ConfigError(f"{ENV_PREFIX}HTTP_PORT must be within 1-65535, got {value}")
    return value


# -- the model keys ------------------------------------------------------------------------------

MODEL_SIGNING_KEY_ENV = f"{ENV_PREFIX}MODEL_SIGNING_KEY"
"""The learner's Ed25519 private key, PEM (or ``..._FILE``: a path to it). Only the learner
and ``dealstream model rollback`` hold it."""
MODEL_VERIFY_KEY_ENV = f"{ENV_PREFIX}MODEL_VERIFY_KEY"
"""Its public key, PEM (or ``..._FILE``), which workers verify snapshots with."""
_KEYGEN_HINT = "generate a pair with `dealstream model keygen --out DIR` (docs/security.md)"


def _pem_from_env(env: Mapping[str, str], name: str) -> str | None:
    """``name``'s value, or the text of the file ``name_FILE`` names; never both."""
    value = env.get(name) or None
    path = env.get(f"{name}_FILE") or None
    if value is not None and path is not None:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if path is None:
        return value
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{name}_FILE={path}: cannot read it ({type(exc).__name__}: {exc.strerror or exc})"
            if isinstance(exc, OSError)
            else f"{name}_FILE={path}: not a PEM text file"
        ) from None


def model_verify_key_from_env(environ: Mapping[str, str] | None = None) -> Ed25519PublicKey | None:
    """The public key workers verify snapshots with (``DEALSTREAM_MODEL_VERIFY_KEY`` or
    ``_FILE``), or ``None`` when unset (the worker then never loads the learner's models).

    ``ConfigError`` when it is set but not an Ed25519 public key in PEM.
    """
    env = os.environ if environ is None else environ
    pem = _pem_from_env(env, MODEL_VERIFY_KEY_ENV)
    if pem is None:
        return None
    try:
        return verify_key_from_pem(pem.encode("utf-8"))
    except ModelSnapshotError as exc:
        raise ConfigError(f"{MODEL_VERIFY_KEY_ENV}: {exc}; {_KEYGEN_HINT}") from None


def model_signing_key_in_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the private key is set here (a worker warns: it must not hold it)."""
    env = os.environ if environ is None else environ
    return bool(env.get(MODEL_SIGNING_KEY_ENV) or env.get(f"{MODEL_SIGNING_KEY_ENV}_FILE"))


def require_signing_key(environ: Mapping[str, str] | None = None) -> Secret:
    """The learner's private key as PEM text (checked to be an Ed25519 private key).

    ``ConfigError`` that says what to do when it is missing or not such a key. There is no
    default: a key everyone knows would let anyone with Redis access plant a model (and
    code) in workers.
    """
    env = os.environ if environ is None else environ
    pem = _pem_from_env(env, MODEL_SIGNING_KEY_ENV)
    if pem is None:
        raise ConfigError(
            f"{MODEL_SIGNING_KEY_ENV} (or {MODEL_SIGNING_KEY_ENV}_FILE) is not set: the learner "
            f"signs the models it publishes with it; {_KEYGEN_HINT}"
        )
    key = Secret(pem)
    try:
        signing_key_from_pem(pem.encode("utf-8"))
    except ModelSnapshotError as exc:
        raise ConfigError(f"{MODEL_SIGNING_KEY_ENV}: {exc}; {_KEYGEN_HINT}") from None
    return key


# -- the learner ---------------------------------------------------------------------------------

DEFAULT_KEEP = 5
"""Model versions kept in Redis: the learner's ``keep_versions``, ``ModelStore``'s default."""
DEFAULT_LEARNER_HTTP_PORT = 6067
DEFAULT_DEDUP_WINDOW = 100_000
"""About 17 MB per partition when every offset holds a distinct example (167 bytes each)."""


@dataclass(frozen=True, slots=True)
class LearnerSettings:
    """The learner's own settings (the shared ones come from ``Settings``)."""

    signing_key: Secret = field(repr=False)
    """The Ed25519 private key (PEM) the learner signs its snapshots with."""
    snapshot_every: int = 1000
    snapshot_interval_s: float = 10.0
    keep_versions: int = DEFAULT_KEEP
    metrics_window: int = 1000
    lease_ttl_s: float = 30.0
    batch_max: int = 1000
    poll_timeout_s: float = 0.2
    http_port: int = DEFAULT_LEARNER_HTTP_PORT
    """``/metrics``, ``/health``, ``/ready`` of the learner; 0 turns them off."""
    dedup_window: int = DEFAULT_DEDUP_WINDOW
    """Offsets per partition within which a copy of an example is recognised and skipped
    (``streams.learner.dedup``)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LearnerSettings:
        """``DEALSTREAM_MODEL_SIGNING_KEY`` or ``_FILE`` (required),
        ``DEALSTREAM_LEARNER_SNAPSHOT_EVERY`` (1000), ``DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S``
        (10), ``DEALSTREAM_LEARNER_HTTP_PORT`` (6067), ``DEALSTREAM_LEARNER_DEDUP_WINDOW``
        (100000)."""
        env = os.environ if environ is None else environ
        key = require_signing_key(env)
        every = _positive(env, "LEARNER_SNAPSHOT_EVERY", 1000, int)
        interval = _positive(env, "LEARNER_SNAPSHOT_INTERVAL_S", 10.0, float)
        return cls(
            signing_key=key,
            snapshot_every=int(every),
            snapshot_interval_s=interval,
            http_port=_port_or_off(env, "LEARNER_HTTP_PORT", DEFAULT_LEARNER_HTTP_PORT),
            dedup_window=int(_positive(env, "LEARNER_DEDUP_WINDOW", DEFAULT_DEDUP_WINDOW, int)),
        )


def _positive(
    env: Mapping[str, str], name: str, default: float, kind: type[int] | type[float]
) -> float:
    raw = env.get(ENV_PREFIX + name) or None
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name}={raw!r} is not a valid {kind.__name__}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{ENV_PREFIX}{name} must be a positive finite number, got {raw}")
    return value


def _port_or_off(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(ENV_PREFIX + name) or None
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(f"{ENV_PREFIX}{name} must be a port (1-65535) or 0 for none, got {raw!r}")
    return int(raw)


# -- the demo ------------------------------------------------------------------------------------

DEMO_NAMESPACE = {
    "DEALSTREAM_TOPIC_PREFIX": "demo.",
    "DEALSTREAM_REDIS_PREFIX": "demo:",
    "DEALSTREAM_GROUP_ID": "dealstream-demo",
}
"""The demo's own topics, keys and group, so it never touches a real deployment's data and
can start every run from a fresh model."""


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """What ``dealstream demo`` runs with: this environment moved into the demo's namespace."""

    settings: Settings
    """The demo's own settings (``DEMO_NAMESPACE`` applied)."""
    process_environment: dict[str, str] = field(repr=False)
    """The environment of the learner the demo starts (the signing key included)."""
    uses_demo_model_keys: bool
    """No model keys were set: the demo made a fresh pair for this run (its namespace is
    emptied at each start, so nothing signed with an older pair is left)."""
    uses_raw_user_ids: bool = False
    """No ``DEALSTREAM_PSEUDONYM_KEY`` was set: the demo stores raw user ids
    (``DEALSTREAM_PSEUDONYMS=off``, said when it starts and in the worker's log)."""

    @property
    def worker_environment(self) -> dict[str, str]:
        """The worker's environment: the learner's without the signing key."""
        drop = (MODEL_SIGNING_KEY_ENV, f"{MODEL_SIGNING_KEY_ENV}_FILE")
        return {k: v for k, v in self.process_environment.items() if k not in drop}

    @classmethod
    def from_env(
        cls, demo_campaigns: Path, environ: Mapping[str, str] | None = None
    ) -> DemoSettings:
        """The demo's settings and its processes' environment, where ``DEALSTREAM_CAMPAIGNS``
        defaults to ``demo_campaigns``."""
        env = {**(os.environ if environ is None else environ), **DEMO_NAMESPACE}
        uses_raw_user_ids = not env.get(f"{ENV_PREFIX}PSEUDONYM_KEY")
        if uses_raw_user_ids:
            env[f"{ENV_PREFIX}PSEUDONYMS"] = "off"
        settings = Settings.from_env(env)
        processes = {
            **env,
            # Short attribution window and frequent snapshots, so learning shows within a minute.
            "DEALSTREAM_ATTRIBUTION_WINDOW_S": env.get("DEALSTREAM_ATTRIBUTION_WINDOW_S", "60"),
            "DEALSTREAM_LEARNER_SNAPSHOT_EVERY": env.get(
                "DEALSTREAM_LEARNER_SNAPSHOT_EVERY", "200"
            ),
            "DEALSTREAM_LEARNER_SNAPSHOT_INTERVAL_S": "5",
            # The learner's /metrics next to the worker's port.
            "DEALSTREAM_LEARNER_HTTP_PORT": env.get(
                "DEALSTREAM_LEARNER_HTTP_PORT", str(settings.http_port + 1)
            ),
        }
        processes.setdefault("DEALSTREAM_CAMPAIGNS", str(demo_campaigns))
        uses_demo_model_keys = not (
            model_signing_key_in_env(processes) or _pem_from_env(processes, MODEL_VERIFY_KEY_ENV)
        )
        if uses_demo_model_keys:
            key = generate_signing_key()
            processes[MODEL_SIGNING_KEY_ENV] = signing_key_pem(key).decode("ascii")
            processes[MODEL_VERIFY_KEY_ENV] = verify_key_pem(key.public_key()).decode("ascii")
        elif _pem_from_env(processes, MODEL_VERIFY_KEY_ENV) is None:
            # Only the private key given: the demo's worker gets its public half.
            pem = require_signing_key(processes).reveal().encode("utf-8")
            public = signing_key_from_pem(pem).public_key()
            processes[MODEL_VERIFY_KEY_ENV] = verify_key_pem(public).decode("ascii")
        return cls(settings, processes, uses_demo_model_keys, uses_raw_user_ids)
