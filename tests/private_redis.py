"""A private ``redis-server`` for tests that stop, kill or reconfigure Redis.

The shared Redis of ``make services`` is never touched: each server has its own port and
directory (Debian's ``redis-server``, the one ``deploy/services.sh`` installs).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import unused_port

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT_S = 20.0


class PrivateRedis:
    """A redis-server of one test. Without ``conf`` it keeps its data in memory only (SAVE
    writes ``dump.rdb`` in ``workdir``, which a restart loads); with ``conf`` (the shipped
    ``deploy/redis/redis.conf``) it runs as that file says."""

    def __init__(self, workdir: Path, conf: Path | None = None, port: int | None = None) -> None:
        assert REDIS_SERVER is not None
        self.workdir = workdir
        self.conf = conf
        self.port = port if port is not None else unused_port()
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        assert REDIS_SERVER is not None
        argv = [REDIS_SERVER, *([str(self.conf)] if self.conf else [])]
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        if self.conf is None:
            argv += ["--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise AssertionError(f"the private redis-server did not answer on {self.port}")
        finally:
            client.close()

    def save(self) -> None:
        client = redis.Redis(port=self.port)
        try:
            client.save()
        finally:
            client.close()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, and wait for the server to exit (nothing if it is not running)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None
