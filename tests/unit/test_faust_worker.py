"""The worker's Faust worker: the CLI's logging kept (no debug records at WARNING), and a
deadline on a graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator

import faust
import pytest

from streams.errors import EXIT_STOP_TIMEOUT
from streams.worker import process
from streams.worker.process import KEEP_HANDLERS_CONFIG, FaustWorker


@pytest.fixture
def warning_root() -> Iterator[logging.Handler]:
    """The root logger as the CLI leaves it at DEALSTREAM_LOG_LEVEL=WARNING; restored after."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    handler = logging.NullHandler()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _worker(worker_class: type[faust.Worker], handler: logging.Handler) -> faust.Worker:
    app = faust.App("logging-test", broker="kafka://127.0.0.1:1", web_enabled=False)
    app.conf.loghandlers = [handler]
    return worker_class(
        app,
        loglevel="WARNING",
        quiet=True,
        logging_config=dict(KEEP_HANDLERS_CONFIG),
        redirect_stdouts=False,
    )


def _set_up(worker_class: type[faust.Worker], handler: logging.Handler) -> None:
    _worker(worker_class, handler)._setup_logging()


def test_quiet_worker_leaves_the_root_level_alone(warning_root: logging.Handler) -> None:
    _set_up(FaustWorker, warning_root)

    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert root.handlers == [warning_root]
    assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)


def test_fausts_own_worker_would_turn_debug_on(warning_root: logging.Handler) -> None:
    """Why FaustWorker exists: Faust's spinner lowers the root level to DEBUG at WARNING."""
    _set_up(faust.Worker, warning_root)

    assert logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)


def test_a_stop_that_outlasts_its_deadline_ends_the_process(
    warning_root: logging.Handler, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exited: list[int] = []
    done = threading.Event()

    def fake_exit(status: int) -> None:
        exited.append(status)
        done.set()

    monkeypatch.setattr(process.os, "_exit", fake_exit)
    # Faust's own stop never finishes here: it is not started at all.
    monkeypatch.setattr(faust.Worker, "_schedule_shutdown", lambda self, signal: None)
    worker = _worker(FaustWorker, warning_root)
    assert isinstance(worker, FaustWorker)
    worker.stop_timeout_s = 0.2
    with caplog.at_level(logging.ERROR, logger="dealstream.worker"):
        worker._schedule_shutdown(signal.SIGTERM)
        assert done.wait(timeout=10), "the stop deadline never fired"
    assert exited == [EXIT_STOP_TIMEOUT]
    assert "graceful stop did not finish within 0.2 s" in caplog.text


def test_no_deadline_when_the_timeout_is_0(
    warning_root: logging.Handler, monkeypatch: pytest.MonkeyPatch
) -> None:
    armed: list[float] = []
    monkeypatch.setattr(faust.Worker, "_schedule_shutdown", lambda self, signal: None)
    monkeypatch.setattr(
        process.threading, "Timer", lambda interval, *args, **kwargs: armed.append(interval)
    )
    worker = _worker(FaustWorker, warning_root)
    assert isinstance(worker, FaustWorker)
    worker.stop_timeout_s = 0.0
    worker._schedule_shutdown(signal.SIGTERM)
    assert armed == []
