"""The worker keeps the logging the CLI configured: no debug records at WARNING."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import faust
import pytest

from streams.worker.process import KEEP_HANDLERS_CONFIG, QuietWorker


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


def _set_up(worker_class: type[faust.Worker], handler: logging.Handler) -> None:
    app = faust.App("logging-test", broker="kafka://127.0.0.1:1", web_enabled=False)
    app.conf.loghandlers = [handler]
    worker = worker_class(
        app,
        loglevel="WARNING",
        quiet=True,
        logging_config=dict(KEEP_HANDLERS_CONFIG),
        redirect_stdouts=False,
    )
    worker._setup_logging()


def test_quiet_worker_leaves_the_root_level_alone(warning_root: logging.Handler) -> None:
    _set_up(QuietWorker, warning_root)

    root = logging.getLogger()
    assert root.level == logging.WARNING
    assert root.handlers == [warning_root]
    assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)


def test_fausts_own_worker_would_turn_debug_on(warning_root: logging.Handler) -> None:
    """Why QuietWorker exists: Faust's spinner lowers the root level to DEBUG at WARNING."""
    _set_up(faust.Worker, warning_root)

    assert logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
