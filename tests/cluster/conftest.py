"""A local cluster of its own for tests/cluster: ``deploy/cluster.sh`` on a temporary dir and a
free block of ports, started once per module and stopped at its end, failures included."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

CLUSTER_SH = REPO / "deploy" / "cluster.sh"
BROKERS = (1, 2, 3)
REDIS_NODES = (1, 2, 3, 4, 5, 6)
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class Cluster:
    """The cluster a test runs against; ports follow deploy/cluster.sh's layout."""

    dir: Path
    base: int
    script_env: dict[str, str]

    def broker_port(self, broker: int) -> int:
        return self.base + broker

    def redis_port(self, node: int) -> int:
        return self.base + 20 + node

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{self.broker_port(i)}" for i in BROKERS)

    def broker_pid(self, broker: int) -> int:
        return int((self.dir / f"kafka-{broker}" / "kafka.pid").read_text())

    def settings_env(self) -> dict[str, str]:
        """The NAME=VALUE lines of the cluster's env file."""
        lines = (self.dir / "env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    def run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """``deploy/cluster.sh ARGS... DIR``; the result, whatever its exit code."""
        return subprocess.run(
            ["bash", str(CLUSTER_SH), args[0], str(self.dir), *args[1:]],
            env=self.script_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> None:
        """Start what is not running (a node a test killed), wait until all of it is up."""
        started = self.run("start")
        assert started.returncode == 0, started.stdout + started.stderr


def block_is_free(base: int) -> bool:
    """Nothing listens on any port of the block (Redis's bus ports included)."""
    offsets = [*range(1, 4), *range(11, 14), *range(21, 27), *range(10021, 10027)]
    for offset in offsets:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", base + offset))
            except OSError:
                return False
    return True


def free_port_base() -> int:
    # Below 22000 the bus ports (base + 10021..) stay under the ephemeral range (32768+), where
    # the kernel hands out ports to outgoing connections.
    for _ in range(50):
        base = random.randrange(20000, 22000, 50)
        if block_is_free(base):
            return base
    raise RuntimeError("no free block of ports for the cluster within 20000-22000")


def _kill_leftovers(cluster: Cluster) -> None:
    """After ``stop``: SIGKILL what a broker's or Redis node's pid file still names (a stop
    that failed), when that pid is still one of them (a stale pid file may name anyone's)."""
    pidfiles = [
        *cluster.dir.glob("kafka-*/kafka.pid"),
        *cluster.dir.glob("redis-*/redis.pid"),
    ]
    for pidfile in pidfiles:
        try:
            pid = int(pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (ValueError, OSError):
            continue
        if str(cluster.dir) in cmdline or any(
            f"127.0.0.1:{cluster.redis_port(j)} " in cmdline for j in REDIS_NODES
        ):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def own_cluster(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Cluster]:
    """A cluster in a new temporary dir on a free block of ports, stopped when the block
    ends, failures included."""
    base = free_port_base()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DEALSTREAM_CLUSTER_")}
    script_env = {
        **inherited,
        "DEALSTREAM_CLUSTER_PORT_BASE": str(base),
        "PYTHON": sys.executable,
    }
    cluster = Cluster(tmp_path_factory.mktemp(name) / "cluster", base, script_env)
    try:
        cluster.start()
        yield cluster
    finally:
        stopped = cluster.run("stop", timeout=180)
        _kill_leftovers(cluster)
        print(f"\ncluster.sh stop: {stopped.stdout}{stopped.stderr}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with own_cluster(tmp_path_factory, "cluster") as started:
        yield started
