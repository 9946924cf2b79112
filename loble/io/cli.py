"""Subcommands of this subsystem (filled in by its issue)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add this subsystem's subcommands to the ``loble`` parser."""
