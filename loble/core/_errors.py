"""The errors Loble raises.

Every error a user can cause derives from :class:`LobleError`, so the command
line catches one type and prints one line, never a traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "LobleError", "StateMachineError"]


class LobleError(Exception):
    """Base class of every error Loble raises on purpose."""


class ConfigError(LobleError):
    """A configuration or scenario is invalid.

    ``errors`` holds one message per problem, each naming the key path and the
    bad value (``backends[1].address: '10.0.0.2' has no port``), so a user
    fixes every mistake in one pass.
    """

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class StateMachineError(LobleError):
    """An input arrived that the state machine's table has no row for.

    This is a bug in the driver (or in the core), never a user error: the
    message names the machine, the state and the input, like h11's
    "can't handle X when state=Y".
    """
