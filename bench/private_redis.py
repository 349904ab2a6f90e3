"""A throw-away ``redis-server`` for benchmarks that must not share the services' Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis


@contextmanager
def private_redis(arguments: Sequence[str], *, parent: Path | None = None) -> Iterator[str | None]:
    """``redis-server <arguments>`` on a free port with its files in a temporary directory
    (under ``parent``, removed after); yields its URL, or ``None`` without a ``redis-server``."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-redis-", dir=parent) as workdir:
        argv = [binary, *arguments, "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--dir", workdir, "--daemonize", "no"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port, socket_timeout=1)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
