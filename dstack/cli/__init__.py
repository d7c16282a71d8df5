"""The command line: thin typer commands over the core."""

from __future__ import annotations

from typing import Any

import typer


def new_app(**options: Any) -> typer.Typer:
    """A typer app as every dstack command group is made: plain help (typer's rich help costs ~0.1 s at
    start), no pretty tracebacks (errors are one line; `--debug` shows a traceback)."""
    options.setdefault("rich_markup_mode", None)
    options.setdefault("pretty_exceptions_enable", False)
    return typer.Typer(**options)
