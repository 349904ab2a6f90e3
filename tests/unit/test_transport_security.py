"""Kafka TLS/SASL and Redis TLS/ACL settings: how they are read, refused and turned into client
options (streams/settings.py, streams/adapters/kafka_io.py, streams/adapters/redis_client.py).
The secured services themselves are exercised by tests/e2e/test_secure_transport.py."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import faust
import pytest

from streams.adapters.kafka_io import kafka_client_options
from streams.adapters.redis_client import redis_from_settings
from streams.errors import ConfigError
from streams.settings import KafkaSecurity, Settings
from streams.worker.faust_app import faust_credentials

SASL = {
    "DEALSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "DEALSTREAM_KAFKA_SASL_MECHANISM": "scram-sha-512",
    "DEALSTREAM_KAFKA_SASL_USERNAME": "svc",
    "DEALSTREAM_KAFKA_SASL_PASSWORD": "s3cret-kafka",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a client certificate signed by it, made with openssl."""
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca"),
        *("-keyout", "ca.key", "-out", "ca.pem"),
    )
    run(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client"),
        *("-keyout", "client.key", "-out", "client.csr"),
    )
    run(
        *("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", "1", "-out", "client.pem"),
    )
    return d


def test_plaintext_is_the_default_and_adds_no_client_options() -> None:
    settings = Settings.from_env({})
    assert settings.kafka_security == KafkaSecurity()
    assert kafka_client_options(settings.kafka_security).kwargs() == {}
    assert kafka_client_options(settings.kafka_security).librdkafka() == {}
    assert faust_credentials(settings.kafka_security) is None


def test_sasl_ssl_builds_one_context_and_the_login_for_every_client(pki: Path) -> None:
    settings = Settings.from_env({**SASL, "DEALSTREAM_KAFKA_SSL_CAFILE": str(pki / "ca.pem")})
    security = settings.kafka_security
    assert (security.protocol, security.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    kwargs = kafka_client_options(security).kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("svc", "s3cret-kafka")
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # Faust's producer gets the same login and TLS context.
    credentials = faust_credentials(security)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.username == "svc" and credentials.ssl_context is not None
    # librdkafka (the worker's output producer) gets the same, as its properties.
    assert kafka_client_options(security).librdkafka() == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "s3cret-kafka",
        "ssl.ca.location": str(pki / "ca.pem"),
        "ssl.endpoint.identification.algorithm": "https",
    }


def test_ssl_with_a_client_certificate_and_no_hostname_check(pki: Path) -> None:
    settings = Settings.from_env(
        {
            "DEALSTREAM_KAFKA_SECURITY_PROTOCOL": "ssl",
            "DEALSTREAM_KAFKA_SSL_CAFILE": str(pki / "ca.pem"),
            "DEALSTREAM_KAFKA_SSL_CERTFILE": str(pki / "client.pem"),
            "DEALSTREAM_KAFKA_SSL_KEYFILE": str(pki / "client.key"),
            "DEALSTREAM_KAFKA_SSL_CHECK_HOSTNAME": "false",
        }
    )
    kwargs = kafka_client_options(settings.kafka_security).kwargs()
    assert kwargs["security_protocol"] == "SSL" and "sasl_mechanism" not in kwargs
    assert kwargs["ssl_context"].check_hostname is False
    assert isinstance(faust_credentials(settings.kafka_security), faust.SSLCredentials)
    assert kafka_client_options(settings.kafka_security).librdkafka() == {
        "security.protocol": "ssl",
        "ssl.ca.location": str(pki / "ca.pem"),
        "ssl.certificate.location": str(pki / "client.pem"),
        "ssl.key.location": str(pki / "client.key"),
        "ssl.endpoint.identification.algorithm": "none",
    }


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"DEALSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "is not one of PLAINTEXT, SSL"),
        ({**SASL, "DEALSTREAM_KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM='GSSAPI'"),
        ({**SASL, "DEALSTREAM_KAFKA_SASL_MECHANISM": ""}, "KAFKA_SASL_MECHANISM=None"),
        ({**SASL, "DEALSTREAM_KAFKA_SASL_PASSWORD": ""}, "needs DEALSTREAM_KAFKA_SASL_USERNAME"),
        ({"DEALSTREAM_KAFKA_SASL_USERNAME": "svc"}, "set it to SASL_SSL or SASL_PLAINTEXT"),
        ({"DEALSTREAM_KAFKA_SSL_CAFILE": "{ca}"}, "set it to SSL or SASL_SSL"),
        ({**SASL, "DEALSTREAM_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "no such file"),
        (
            {
                "DEALSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
                "DEALSTREAM_KAFKA_SSL_KEYFILE": "{ca}",
            },
            "without DEALSTREAM_KAFKA_SSL_CERTFILE",
        ),
        ({"DEALSTREAM_KAFKA_SSL_CHECK_HOSTNAME": "maybe"}, "must be true or false"),
        ({"DEALSTREAM_REDIS_SSL_CAFILE": "{ca}"}, "use rediss:// for TLS"),
        ({"DEALSTREAM_REDIS_URL": "http://127.0.0.1:6379"}, "must start with redis://"),
    ],
)
def test_unusable_security_settings_are_refused_with_advice(
    pki: Path, env: dict[str, str], says: str
) -> None:
    env = {k: v.replace("{ca}", str(pki / "ca.pem")) for k, v in env.items()}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert says in str(caught.value)


def test_a_file_that_is_not_a_certificate_is_a_config_error(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    settings = Settings.from_env({**SASL, "DEALSTREAM_KAFKA_SSL_CAFILE": str(bogus)})
    with pytest.raises(ConfigError, match=r"DEALSTREAM_KAFKA_SSL_CAFILE=.* is not a readable PEM"):
        kafka_client_options(settings.kafka_security)


def test_passwords_never_show_in_reprs(pki: Path) -> None:
    settings = Settings.from_env(
        {
            **SASL,
            "DEALSTREAM_KAFKA_SSL_CAFILE": str(pki / "ca.pem"),
            "DEALSTREAM_REDIS_URL": "rediss://localhost:6380/0",
            "DEALSTREAM_REDIS_USERNAME": "dealstream-worker",
            "DEALSTREAM_REDIS_PASSWORD": "s3cret-redis",
        }
    )
    shown = repr(settings) + repr(kafka_client_options(settings.kafka_security))
    assert "s3cret-kafka" not in shown and "s3cret-redis" not in shown
    assert "dealstream-worker" in shown  # user names are not secrets: they help debugging


def test_redis_user_password_and_tls_files_reach_the_connection(pki: Path) -> None:
    settings = Settings.from_env(
        {
            "DEALSTREAM_REDIS_URL": "rediss://olduser:oldpass@localhost:6380/0",
            "DEALSTREAM_REDIS_USERNAME": "dealstream-worker",
            "DEALSTREAM_REDIS_PASSWORD": "s3cret-redis",
            "DEALSTREAM_REDIS_SSL_CAFILE": str(pki / "ca.pem"),
            "DEALSTREAM_REDIS_SSL_CERTFILE": str(pki / "client.pem"),
            "DEALSTREAM_REDIS_SSL_KEYFILE": str(pki / "client.key"),
        }
    )
    kwargs = redis_from_settings(settings).connection_pool.connection_kwargs
    assert kwargs["username"] == "dealstream-worker"  # the settings win over the URL
    assert kwargs["password"] == "s3cret-redis"
    assert kwargs["ssl_ca_certs"] == str(pki / "ca.pem")
    assert kwargs["ssl_certfile"] == str(pki / "client.pem")
    assert kwargs["ssl_keyfile"] == str(pki / "client.key")
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True


def test_the_url_keeps_what_the_settings_do_not_set() -> None:
    settings = Settings.from_env(
        {
            "DEALSTREAM_REDIS_URL": "redis://url-user:p%40ss@127.0.0.1:6379/0",
            "DEALSTREAM_REDIS_USERNAME": "dealstream-worker",
        }
    )
    kwargs = redis_from_settings(settings).connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("dealstream-worker", "p@ss")


def test_a_plain_redis_url_gets_no_tls_options() -> None:
    kwargs = redis_from_settings(Settings.from_env({})).connection_pool.connection_kwargs
    assert not any(name.startswith("ssl_") for name in kwargs)
    assert "username" not in kwargs and kwargs.get("password") is None
