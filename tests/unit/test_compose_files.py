"""docker-compose.yml and docker-compose.cluster.yml hold together: what one service names,
another defines, and the settings the dealstream services get are settings dealstream accepts.

No Docker engine runs here, so the files are read, not run: this catches a broker missing from
the quorum, a bootstrap list naming a service that is not there, a replication factor the
brokers cannot meet, a worker environment `Settings.from_env` refuses; it cannot catch what
only a real `docker compose up` shows."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import LearnerSettings, Settings
from tests.conftest import REPO
from tests.model_keys import SIGNING_PEM, VERIFY_PEM

SINGLE = REPO / "docker-compose.yml"
CLUSTER = REPO / "docker-compose.cluster.yml"
PLACEHOLDERS = {
    "DEALSTREAM_PSEUDONYM_KEY": "compose-test-pseudonym-key-0123456789abcdef",
    "DEALSTREAM_HTTP_TOKEN": "",
    "DEALSTREAM_MODEL_VERIFY_KEY": VERIFY_PEM,
    "DEALSTREAM_MODEL_SIGNING_KEY": SIGNING_PEM,
}


def services(path: Path) -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    found: dict[str, dict[str, Any]] = document["services"]
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with ``${VAR...}`` interpolations filled in as a user would."""

    def fill(value: object) -> str:
        text = str(value)
        return re.sub(r"\$\{([A-Z_]+)[^}]*\}", lambda m: PLACEHOLDERS.get(m.group(1), "x"), text)

    return {name: fill(value) for name, value in (service.get("environment") or {}).items()}


def host_ports(found: dict[str, dict[str, Any]]) -> list[str]:
    return [str(port) for service in found.values() for port in service.get("ports", [])]


@pytest.mark.parametrize("path", [SINGLE, CLUSTER], ids=lambda p: p.name)
def test_dealstream_services_get_settings_dealstream_accepts(path: Path) -> None:
    found = services(path)
    worker = Settings.from_env(environment(found["worker"]))
    assert worker.http_bind == "0.0.0.0"
    learner_env = environment(found["learner"])
    assert Settings.from_env(learner_env).kafka_bootstrap == worker.kafka_bootstrap
    assert LearnerSettings.from_env(learner_env).http_port == int(
        learner_env["DEALSTREAM_LEARNER_HTTP_PORT"]
    )
    for port in host_ports(found):
        assert port.startswith("127.0.0.1:"), f"{path.name}: {port} is open beyond loopback"
    assert len(set(host_ports(found))) == len(host_ports(found))


def test_the_cluster_brokers_form_one_quorum_and_the_workers_name_them() -> None:
    found = services(CLUSTER)
    brokers = {name: s for name, s in found.items() if name.startswith("kafka-")}
    assert len(brokers) == 3
    voters = {environment(s)["KAFKA_CONTROLLER_QUORUM_VOTERS"] for s in brokers.values()}
    assert len(voters) == 1, "every node must list the same voters"
    (quorum,) = voters
    listed = dict(voter.split("@") for voter in quorum.split(","))
    for name, service in brokers.items():
        env = environment(service)
        assert service["hostname"] == name
        assert listed[env["KAFKA_NODE_ID"]] == f"{name}:9093"
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == len(brokers)
        assert 1 < int(env["KAFKA_MIN_INSYNC_REPLICAS"]) < len(brokers)
        assert f"PLAINTEXT://{name}:19092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert len({environment(s)["CLUSTER_ID"] for s in brokers.values()}) == 1
    worker = Settings.from_env(environment(found["worker"]))
    assert sorted(worker.kafka_bootstrap.split(",")) == sorted(f"{b}:19092" for b in brokers)
    assert worker.replication.factor == len(brokers)
    assert found["worker"]["deploy"]["replicas"] == 3
    for broker in brokers:
        assert found["worker"]["depends_on"][broker]["condition"] == "service_healthy"


def test_the_redis_cluster_has_three_primaries_with_a_replica_each_and_one_slot_for_us() -> None:
    found = services(CLUSTER)
    nodes = sorted(name for name in found if re.fullmatch(r"redis-\d", name))
    assert len(nodes) == 6
    for node in nodes:
        command = found[node]["command"]
        assert command[command.index("--cluster-enabled") + 1] == "yes"
    init = found["redis-cluster-init"]
    assert set(init["depends_on"]) == set(nodes)
    script = " ".join(init["command"])
    assert "--cluster-replicas 1" in script
    assert f"for n in {' '.join(str(n) for n in range(1, 7))}" in script
    worker = Settings.from_env(environment(found["worker"]))
    assert worker.redis_cluster
    assert worker.redis_url.reveal().startswith("redis://redis-1:")
    assert re.search(r"\{[^}]+\}", worker.redis_prefix), "one hash tag: one slot"
    assert found["worker"]["depends_on"]["redis-cluster-init"] == {
        "condition": "service_completed_successfully"
    }
