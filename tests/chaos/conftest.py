"""A cluster of its own for the chaos suite (tests/cluster/conftest.py's ``own_cluster``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.conftest import Cluster, own_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with own_cluster(tmp_path_factory, "chaos") as started:
        yield started
