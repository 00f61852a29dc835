"""Command-line clients of a running daemon (filled in by the API issue)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def add_commands(commands: Any) -> None:
    """Add the client subcommands (status, containers, watch, healthcheck) to ``commands``."""
    del commands


_ = argparse
