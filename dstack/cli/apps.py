"""How dstack's typer apps are made: plain help, and top-level groups built only when used."""

from __future__ import annotations

from typing import Any, ClassVar

import typer
from typer.core import TyperGroup


def new_app(**options: Any) -> typer.Typer:
    """A typer app as every dstack command group is made: plain help (typer's rich help costs ~0.1 s at
    start), no pretty tracebacks (errors are one line; `--debug` shows a traceback)."""
    options.setdefault("rich_markup_mode", None)
    options.setdefault("pretty_exceptions_enable", False)
    return typer.Typer(**options)


class LazyGroup(TyperGroup):
    """The top command: its groups (`hosts`, `tags`, …) are imported and built only when one is used or
    listed, so `dstack runs` doesn't build every group's options at start."""

    lazy: ClassVar[dict[str, str]] = {}  # group name -> "module:attribute" of its typer app
    _listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(name for name in self.lazy if name not in self.commands)]

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        self._listing = True  # `dstack --help` needs each group's help line, not its options
        try:
            super().format_commands(ctx, formatter)
        finally:
            self._listing = False

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            import importlib

            module, _, attribute = self.lazy[cmd_name].partition(":")
            app: typer.Typer = getattr(importlib.import_module(module), attribute)
            if self._listing:
                helptext = app.info.help if isinstance(app.info.help, str) else None
                return TyperGroup(name=cmd_name, help=helptext)
            group = typer.main.get_group(app)
            group.name = cmd_name
            self.commands[cmd_name] = group
        return super().get_command(ctx, cmd_name)
