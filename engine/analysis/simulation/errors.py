"""The world's exceptions, under ``engine.errors.EngineError``."""

from __future__ import annotations

from engine.errors import EngineError


class WorldError(EngineError):
    """A world that cannot be built or an offer it cannot read; the message says which."""


class WorldParamError(WorldError):
    """A world parameter outside its allowed range.

    ``fields`` names the parameter (two for a joint rule) and ``rule`` what it must be, so a
    caller that took the value from somewhere else (a command-line flag) can name it that way.
    """

    def __init__(self, fields: tuple[str, ...], rule: str, value: object) -> None:
        self.fields = fields
        self.rule = rule
        self.value = value
        super().__init__(self.describe(fields))

    def describe(self, names: tuple[str, ...]) -> str:
        """The message with ``names`` in place of the field names."""
        return f"{' + '.join(names)} must be {self.rule}, got {self.value}"
