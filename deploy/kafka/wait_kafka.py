"""Wait until a Kafka broker answers a real metadata request (used by deploy/kafka/kafka.sh
and deploy/cluster.sh).

An open TCP port is not enough: the broker listens before it can serve metadata, and a port can
be held by something that is not Kafka at all. So we ask for the topic list, as clients will.
With ``--brokers N`` the metadata must also list N live brokers (a cluster is only usable for
topics of replication factor N once all N have registered).

    python wait_kafka.py 127.0.0.1:9092                  # one attempt
    python wait_kafka.py 127.0.0.1:9092 --timeout 60 --pid 1234
    python wait_kafka.py 127.0.0.1:19201,127.0.0.1:19202 --brokers 3 --timeout 90

Exit codes: 0 answered, 1 no answer before the deadline, 3 the watched process (--pid) died,
4 aiokafka is not installed in this Python.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time

EXIT_OK, EXIT_TIMEOUT, EXIT_DIED, EXIT_NO_AIOKAFKA = 0, 1, 3, 4

try:
    from aiokafka.admin import AIOKafkaAdminClient
except ImportError:
    print(
        f"kafka: {sys.executable} has no aiokafka: create the repo's .venv "
        "(pip install -e .) or set PYTHON to an interpreter that has it",
        file=sys.stderr,
    )
    sys.exit(EXIT_NO_AIOKAFKA)


async def probe(bootstrap: str, attempt_timeout: float, brokers: int = 0) -> bool:
    """One attempt: connect, list topics (and brokers), close. True when metadata came back
    (listing at least ``brokers`` brokers)."""
    ms = max(int(attempt_timeout * 1000), 500)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ms)
    try:
        # wait_for guards against a peer that accepts the connection but never replies.
        await asyncio.wait_for(admin.start(), attempt_timeout)
        await asyncio.wait_for(admin.list_topics(), attempt_timeout)
        if brokers:
            cluster = await asyncio.wait_for(admin.describe_cluster(), attempt_timeout)
            return len(cluster["brokers"]) >= brokers
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), attempt_timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still accepts signal 0.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap", help="host:port of the broker")
    parser.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="keep trying for this many seconds (0: one attempt)",
    )
    parser.add_argument(
        "--attempt-timeout", type=float, default=2.0, help="seconds allowed for one attempt"
    )
    parser.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="give up (exit 3) as soon as this process is gone (repeatable)",
    )
    parser.add_argument(
        "--brokers", type=int, default=0, help="wait until the metadata lists this many brokers"
    )
    args = parser.parse_args()

    deadline = time.monotonic() + args.timeout
    while True:
        if any(not alive(pid) for pid in args.pid):
            return EXIT_DIED
        if await probe(args.bootstrap, args.attempt_timeout, args.brokers):
            return EXIT_OK
        if time.monotonic() >= deadline:
            return EXIT_TIMEOUT
        await asyncio.sleep(0.5)


if __name__ == "__main__":
    # aiokafka logs every refused connection at ERROR; while waiting that is only noise.
    logging.disable(logging.CRITICAL)
    sys.exit(asyncio.run(main()))
