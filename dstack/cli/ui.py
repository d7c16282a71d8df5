"""Rendering for the CLI: one console, tables, JSON, one-line errors. The only module that prints."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

_console: Console | None = None
_err: Console | None = None


def console() -> Console:
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(highlight=False, soft_wrap=True)
    return _console


def err_console() -> Console:
    global _err
    if _err is None:
        from rich.console import Console

        _err = Console(stderr=True, highlight=False, soft_wrap=True)
    return _err


def out(text: str = "") -> None:
    """Plain text to stdout, no markup (job output goes here untouched)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def info(markup: str) -> None:
    """A status line to stderr, so stdout stays the job's output."""
    err_console().print(markup)


def error(message: str) -> None:
    from rich.markup import escape

    err_console().print(f"[red]Error:[/red] {escape(message)}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    from rich.table import Table

    t = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c)
    from rich.text import Text

    for r in rows:
        t.add_row(*(v if isinstance(v, Text) else Text("" if v is None else str(v)) for v in r))
    console().print(t)


STATUS_STYLE = {
    "done": "green",
    "reused": "cyan",
    "running": "yellow",
    "starting": "yellow",
    "pending": "dim",
    "waiting": "magenta",
    "failed": "red",
    "stopped": "red",
    "cancelled": "dim",
    "stopping": "yellow",
}


def status(s: str) -> Any:
    """A status as styled text (a rich Text, safe in tables)."""
    from rich.text import Text

    return Text(s, style=STATUS_STYLE.get(s, ""))


def status_markup(s: str) -> str:
    style = STATUS_STYLE.get(s)
    return f"[{style}]{s}[/{style}]" if style else s


def ago(ts: float | None) -> str:
    if not ts:
        return ""
    d = time.time() - ts
    if d < 60:
        return f"{int(d)}s ago"
    if d < 3600:
        return f"{int(d // 60)}m ago"
    if d < 86400:
        return f"{int(d // 3600)}h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def duration(start: float | None, end: float | None) -> str:
    if not start:
        return ""
    d = (end or time.time()) - start
    return f"{d:.1f}s" if d < 60 else f"{int(d // 60)}m{int(d % 60):02d}s"


def size(n: int) -> str:
    f = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if f < 1024 or unit == "TB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{n} B"
