"""The off-policy evaluation's own error, under the engine's root exception."""

from __future__ import annotations

from engine.errors import EngineError


class OpeError(EngineError):
    """Off-policy evaluation cannot run on this input; the message says what to change."""
