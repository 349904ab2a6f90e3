"""HTTP exposure settings (bind address, bearer token) and the learner's token check, served
by aiohttp on a loopback port (no Kafka or Redis)."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from streams.errors import ConfigError
from streams.learner.http_endpoints import LearnerHealth, LearnerMetrics, learner_routes
from streams.settings import Secret, Settings

TOKEN = "a-test-token-0123456789"


def test_endpoints_listen_on_loopback_unless_told_otherwise() -> None:
    assert Settings.from_env({}).http_bind == "127.0.0.1"
    for address in ("0.0.0.0", "::", "10.1.2.3", "localhost"):
        assert Settings.from_env({"DEALSTREAM_HTTP_BIND": address}).http_bind == address
    for bad in ("everywhere", "0.0.0.0:6066", "http://x"):
        with pytest.raises(ConfigError, match="DEALSTREAM_HTTP_BIND"):
            Settings.from_env({"DEALSTREAM_HTTP_BIND": bad})


def test_the_token_is_a_secret_of_sixteen_characters_at_least() -> None:
    assert Settings.from_env({}).http_token is None
    settings = Settings.from_env({"DEALSTREAM_HTTP_TOKEN": TOKEN})
    assert settings.http_token is not None and settings.http_token.reveal() == TOKEN
    assert TOKEN not in repr(settings)
    for bad in ("short", " " + TOKEN, TOKEN + "\n"):
        with pytest.raises(ConfigError, match="DEALSTREAM_HTTP_TOKEN") as info:
            Settings.from_env({"DEALSTREAM_HTTP_TOKEN": bad})
        assert bad.strip() not in str(info.value)


@pytest.mark.parametrize("token", [None, Secret(TOKEN)], ids=["open", "token"])
async def test_the_learners_status_json_needs_the_token_when_there_is_one(
    token: Secret | None,
) -> None:
    app = learner_routes(LearnerMetrics(), LearnerHealth(), lambda: {"learned": 3}, token)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        base = str(server.make_url(""))
        for path in ("/metrics", "/health", "/ready"):  # open: probes and scrapers
            async with http.get(base + path) as response:
                assert response.status in (200, 503), path
        async with http.get(base + "/status.json") as response:
            assert response.status == (200 if token is None else 401)
            if token is not None:
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert TOKEN not in await response.text()
        for wrong in (f"Bearer {TOKEN}x", TOKEN, f"bearer {TOKEN}"):
            async with http.get(base + "/status.json", headers={"Authorization": wrong}) as r:
                assert r.status == (200 if token is None else 401)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(base + "/status.json", headers=headers) as response:
            assert response.status == 200 and (await response.json()) == {"learned": 3}
