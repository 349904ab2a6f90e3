"""Kafka plumbing shared by the CLI, the worker and the tools: admin, preflight, producing,
and the one place that turns ``KafkaSecurity`` into client options (``kafka_client_options``:
aiokafka's keyword arguments and librdkafka's configuration properties)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
    for_code,
)
from redis.exceptions import RedisClusterException

from streams.adapters.redis_client import RedisClient
from streams.errors import ConfigError, ServiceUnavailable
from streams.settings import KafkaSecurity, TlsFiles, TopicReplication, redact_url

PRODUCER_MAX_REQUEST_BYTES = 1_000_000
"""The largest record our producers send (their ``max_request_size``, Faust's default; the
broker's default ``message.max.bytes`` is 1,048,588): dead letters are cut to fit it. The
worker's librdkafka producer has it as ``message.max.bytes`` and counts a record as its key,
value and headers plus at most about 40 bytes, less than aiokafka's estimate that dead
letters are cut by (``record_bytes``): what fits one fits the other."""


@dataclass(frozen=True, slots=True)
class KafkaClientOptions:
    """The security options every Kafka client of ours is given: ``kwargs`` spreads them into
    an aiokafka client's constructor (consumer, producer, admin), ``librdkafka`` gives them as
    librdkafka configuration properties (the worker's output producer)."""

    security_protocol: str = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    tls_files: TlsFiles | None = None
    """The files ``ssl_context`` was loaded from (librdkafka reads them itself); None
    without TLS."""

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaConsumer``/``AIOKafkaProducer``/
        ``AIOKafkaAdminClient`` (only the ones that differ from aiokafka's defaults)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.ssl_context is not None:
            options["ssl_context"] = self.ssl_context
        if self.sasl_mechanism is not None:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_plain_username
            options["sasl_plain_password"] = self.sasl_plain_password
        return options

    def librdkafka(self) -> dict[str, str]:
        """The same options as librdkafka configuration properties (only those that differ
        from its defaults, but the host name check, said either way). The files were read once
        already (``kafka_client_options`` built ``ssl_context`` from them), so a file that
        cannot be read is a ``ConfigError`` before librdkafka sees it."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        config = {"security.protocol": self.security_protocol.lower()}
        if self.sasl_mechanism is not None:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_plain_username or ""
            config["sasl.password"] = self.sasl_plain_password or ""
        files = self.tls_files
        if files is not None:
            # "probe": the system's CA bundle, as ssl.create_default_context() trusts it.
            config["ssl.ca.location"] = str(files.cafile) if files.cafile else "probe"
            if files.certfile is not None:
                config["ssl.certificate.location"] = str(files.certfile)
                # Python's load_cert_chain reads the key from the certificate file when no
                # key file is given; librdkafka wants it named.
                config["ssl.key.location"] = str(files.keyfile or files.certfile)
            if files.key_password is not None:
                config["ssl.key.password"] = files.key_password.reveal()
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if files.check_hostname else "none"
            )
        return config


def kafka_client_options(security: KafkaSecurity | None) -> KafkaClientOptions:
    """The options of ``security`` (None: plaintext) for aiokafka and librdkafka; unreadable
    certificate files are a ``ConfigError`` that names the setting."""
    if security is None or security.protocol == "PLAINTEXT":
        return KafkaClientOptions()
    context = tls_context(security.tls, "KAFKA") if security.uses_tls else None
    return KafkaClientOptions(
        security_protocol=security.protocol,
        ssl_context=context,
        tls_files=security.tls if security.uses_tls else None,
        sasl_mechanism=security.sasl_mechanism if security.uses_sasl else None,
        sasl_plain_username=security.username if security.uses_sasl else None,
        sasl_plain_password=(
            security.password.reveal() if security.uses_sasl and security.password else None
        ),
    )


def tls_context(files: TlsFiles, scope: str) -> ssl.SSLContext:
    """A client TLS context: the server's certificate verified against ``files.cafile`` (or
    the system's CAs), its name checked unless ``check_hostname`` is off, and the client
    certificate shown when one is set."""
    try:
        context = ssl.create_default_context(
            cafile=str(files.cafile) if files.cafile is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"DEALSTREAM_{scope}_SSL_CAFILE={str(files.cafile)!r} is not a readable PEM CA "
            f"bundle ({exc})"
        ) from None
    context.check_hostname = files.check_hostname
    if files.certfile is not None:
        try:
            context.load_cert_chain(
                str(files.certfile),
                str(files.keyfile) if files.keyfile is not None else None,
                files.key_password.reveal() if files.key_password is not None else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"DEALSTREAM_{scope}_SSL_CERTFILE / _KEYFILE: cannot load the client "
                f"certificate {str(files.certfile)!r} ({exc})"
            ) from None
    return context


@contextlib.contextmanager
def quiet_logger(logger_name: str) -> Iterator[None]:
    """Silence a library's own error logs while we turn its failure into one clear line."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(previous)


async def check_kafka(
    bootstrap: str, *, security: KafkaSecurity | None = None, timeout_s: float = 10.0
) -> None:
    """Raise ``ServiceUnavailable`` with advice unless a broker answers a metadata request;
    a refused login or TLS handshake is said as such, in one line."""
    with quiet_logger("aiokafka"):
        await _check_kafka(bootstrap, security, timeout_s)


async def _check_kafka(bootstrap: str, security: KafkaSecurity | None, timeout_s: float) -> None:
    options = kafka_client_options(security)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=5000, **options.kwargs()
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.list_topics(), timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        # aiokafka reports every failed bootstrap as "Unable to bootstrap": ask one broker
        # ourselves to tell a wrong password or certificate from a broker that is down.
        why = await _why_refused(bootstrap, options, timeout_s)
        raise ServiceUnavailable(
            why
            or f"cannot reach Kafka at {bootstrap} ({type(exc).__name__}): start it with "
            "`make services` or set DEALSTREAM_KAFKA_BOOTSTRAP (and "
            "DEALSTREAM_KAFKA_SECURITY_PROTOCOL when its listener wants TLS or SASL)"
        ) from None
    finally:
        await admin.close()


async def _why_refused(bootstrap: str, options: KafkaClientOptions, timeout_s: float) -> str | None:
    """Why the first broker of ``bootstrap`` refuses us, when it is the login or TLS."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    if not port.isdigit():
        return None
    settings = "DEALSTREAM_KAFKA_SECURITY_PROTOCOL and DEALSTREAM_KAFKA_SSL_*"
    try:
        conn = await asyncio.wait_for(
            create_conn(
                host or "localhost", int(port), request_timeout_ms=5000, **options.kwargs()
            ),
            timeout_s,
        )
    except (SaslAuthenticationFailed, AuthenticationFailedError):
        return (
            f"Kafka at {bootstrap} refused the login of user {options.sasl_plain_username!r} "
            f"({options.sasl_mechanism}): check DEALSTREAM_KAFKA_SASL_USERNAME and "
            "DEALSTREAM_KAFKA_SASL_PASSWORD"
        )
    except UnsupportedSaslMechanismError:
        return (
            f"Kafka at {bootstrap} does not offer SASL {options.sasl_mechanism}: set "
            "DEALSTREAM_KAFKA_SASL_MECHANISM to one the listener enables"
        )
    except ssl.SSLCertVerificationError as exc:
        return (
            f"Kafka at {bootstrap}: its TLS certificate is not trusted ({exc.verify_message}): "
            "check DEALSTREAM_KAFKA_SSL_CAFILE (and DEALSTREAM_KAFKA_SSL_CHECK_HOSTNAME)"
        )
    except ssl.SSLError as exc:
        return f"Kafka at {bootstrap}: the TLS handshake failed ({exc.reason}): check {settings}"
    except (TimeoutError, KafkaError, OSError):
        return None  # down, or a listener of another protocol: the caller's advice stands
    conn.close()
    return None


async def check_redis(client: RedisClient, url: str, *, timeout_s: float = 5.0) -> None:
    """Raise ``ServiceUnavailable`` with advice unless Redis answers PING; a refused login or
    TLS handshake is said as such. A Redis Cluster client reads the slot map first; its own
    error (no node answered, no cluster mode) carries the cause, judged as above."""
    try:
        try:
            await asyncio.wait_for(client.ping(), timeout_s)
        except RedisClusterException as exc:
            if exc.__cause__ is not None and not isinstance(exc.__cause__, RedisClusterException):
                raise exc.__cause__ from None
            raise ServiceUnavailable(
                f"Redis Cluster at {redact_url(url)}: {exc} (is DEALSTREAM_REDIS_CLUSTER right "
                "for this server?)"
            ) from None
    except aioredis.AuthenticationError:
        raise ServiceUnavailable(
            f"Redis at {redact_url(url)} refused the login (wrong username or password): check "
            "DEALSTREAM_REDIS_USERNAME and DEALSTREAM_REDIS_PASSWORD"
        ) from None
    except aioredis.ResponseError as exc:
        if not str(exc).startswith(("NOAUTH", "NOPERM")):
            raise
        raise ServiceUnavailable(
            f"Redis at {redact_url(url)} refused us ({str(exc).splitlines()[0]}): set "
            "DEALSTREAM_REDIS_USERNAME / DEALSTREAM_REDIS_PASSWORD to an ACL user allowed to "
            "connect (deploy/redis/acl/)"
        ) from None
    except (TimeoutError, OSError, aioredis.RedisError) as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ssl.SSLError) or isinstance(exc, ssl.SSLError):
            raise ServiceUnavailable(
                f"Redis at {redact_url(url)}: the TLS handshake failed "
                f"({getattr(cause, 'reason', None) or exc}): check DEALSTREAM_REDIS_SSL_*"
            ) from None
        raise ServiceUnavailable(
            f"cannot reach Redis at {redact_url(url)} ({type(exc).__name__}): start it with "
            "`make services` or set DEALSTREAM_REDIS_URL"
        ) from None


async def ensure_topics(
    bootstrap: str,
    names: Sequence[str],
    *,
    partitions: int,
    replication: TopicReplication | None = None,
    security: KafkaSecurity | None = None,
) -> list[str]:
    """Create the topics that do not exist yet, replicated as ``replication`` says (with its
    ``min.insync.replicas``; default: one replica, for a local broker); returns the names it
    created. Existing topics are left as they are."""
    replication = replication or TopicReplication()
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=15000,
        **kafka_client_options(security).kwargs(),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                response = await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            num_partitions=partitions,
                            replication_factor=replication.factor,
                            topic_configs=replication.topic_configs(),
                        )
                        for name in missing
                    ]
                )
                _raise_topic_errors(response.topic_errors, replication)
        return missing
    finally:
        await admin.close()


def _raise_topic_errors(errors: Sequence[Sequence[Any]], replication: TopicReplication) -> None:
    """The admin client returns per-topic errors instead of raising them: a replication
    factor above the broker count would otherwise leave the topics missing, unsaid."""
    for name, code, *rest in errors:
        if code in (0, TopicAlreadyExistsError.errno):
            continue
        why = rest[0] if rest and rest[0] else for_code(code).__name__
        raise ConfigError(
            f"cannot create topic {name}: {why} (replication factor {replication.factor}, "
            f"min.insync.replicas {replication.min_insync}); set "
            "DEALSTREAM_REPLICATION_FACTOR to at most the number of brokers and "
            "DEALSTREAM_MIN_INSYNC_REPLICAS to at most the factor"
        )
