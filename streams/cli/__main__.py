"""``python -m streams.cli``: the same command line as the ``dealstream`` console script."""

from __future__ import annotations

import sys

from streams.cli.main import main

sys.exit(main())
