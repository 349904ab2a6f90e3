"""``dealstream``: the command line, one module per subcommand (``streams.cli.main`` builds it).

Each subcommand module registers its parser with ``add_parser`` and keeps heavy imports (the
engine, River, Kafka and Redis clients) inside its handler, so that ``dealstream --help``
starts fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

from streams.settings import Settings

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers`` returns: each subcommand module adds its parser to it."""

Handler: TypeAlias = Callable[[Settings, argparse.Namespace], int]
"""A subcommand: the settings and the parsed arguments in, the exit code out."""
