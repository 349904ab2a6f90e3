"""``dealstream worker``: the stream worker (features, scoring, offers) until a signal."""

from __future__ import annotations

import argparse
import logging

from streams.cli import Subparsers
from streams.settings import (
    MODEL_SIGNING_KEY_ENV,
    Settings,
    model_signing_key_in_env,
    model_verify_key_from_env,
)


def add_parser(subparsers: Subparsers) -> None:
    worker = subparsers.add_parser(
        "worker", help="run the stream worker (features, scoring, offers)"
    )
    worker.set_defaults(handler=run_worker_command)


def run_worker_command(settings: Settings, args: argparse.Namespace) -> int:
    from streams.worker.process import run_worker  # Faust and the engine: only when it runs

    if model_signing_key_in_env():
        # Never read here; a worker that holds it could sign models for every worker.
        logging.getLogger("dealstream.worker").warning(
            "%s is set in the worker's environment: a worker only needs the public key "
            "(DEALSTREAM_MODEL_VERIFY_KEY); remove the private key from it",
            MODEL_SIGNING_KEY_ENV,
        )
    return run_worker(settings, model_verify_key_from_env())
