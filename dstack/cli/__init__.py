"""The command line: thin typer commands over the core.

This package imports nothing heavy (no typer): `dstack.cli.fast` lists runs without it, and `dstack.cli.ui`
renders for both paths. typer apps are made with `dstack.cli.apps.new_app`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """`from dstack.cli import new_app, LazyGroup` works (from `dstack.cli.apps`, with typer)."""
    if name in ("new_app", "LazyGroup"):
        from dstack.cli import apps

        return getattr(apps, name)
    raise AttributeError(f"module 'dstack.cli' has no attribute {name!r}")


def repair_runs(state: Any) -> list[Any]:
    """`dstack.scheduler.daemon.repair`, imported only when some run is unfinished (listings mostly have
    none)."""
    if not state.runs(active_only=True):
        return []
    from dstack.cli.entry import configure_logging

    configure_logging()  # before the daemon's modules (and their libraries' loggers) load
    from dstack.scheduler.daemon import repair

    return repair(state)
