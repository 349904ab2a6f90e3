"""A cluster of its own for the chaos suite, as tests/cluster's: ``deploy/cluster.sh`` on a
temporary dir and a free block of ports, stopped at the end, failures included."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests.cluster.conftest import Cluster, _kill_leftovers, free_port_base


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = free_port_base()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("DEALSTREAM_CLUSTER_")}
    script_env = {**inherited, "DEALSTREAM_CLUSTER_PORT_BASE": str(base), "PYTHON": sys.executable}
    cluster = Cluster(tmp_path_factory.mktemp("chaos") / "cluster", base, script_env)
    try:
        cluster.start()
        yield cluster
    finally:
        stopped = cluster.run("stop", timeout=180)
        _kill_leftovers(cluster)
        print(f"\ncluster.sh stop: {stopped.stdout}{stopped.stderr}")
