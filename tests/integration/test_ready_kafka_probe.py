"""``/ready``'s Kafka check with the real lag probe: against a port where no broker listens,
the probe fails (and says why), and readiness turns false once the last answer is older than
``KAFKA_STALE_S``. (Stopping the shared broker is not an option; the staleness rule itself is
unit-tested in tests/unit/test_metrics_status.py.)"""

from __future__ import annotations

import socket

import pytest

from streams.operations.lag import LagProbe
from streams.worker.http_endpoints import KAFKA_STALE_S
from tests.unit.test_metrics_status import make_status

pytestmark = pytest.mark.integration


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_broker_that_does_not_answer_makes_the_worker_not_ready() -> None:
    status, _, _, clock, _ = make_status()
    probe = LagProbe(f"127.0.0.1:{dead_port()}", request_timeout_ms=2000)
    status.probe = probe
    status.on_assigned([])
    try:
        await status.refresh()
        assert status.lag_error is not None, "the probe must fail against a dead port"
        assert (await status.readiness())["ready"] is True  # within the bound since start
        clock.now += KAFKA_STALE_S + 1
        await status.refresh()
        body = await status.readiness()
    finally:
        await probe.close()
    assert body["ready"] is False
    (reason,) = body["reasons"]
    assert reason.startswith(f"kafka: Kafka not answering for {KAFKA_STALE_S + 1:.0f} s (")
    assert status.lag_error in reason
