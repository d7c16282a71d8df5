"""Rendering for the CLI: status lines, tables, JSON, one-line errors. The only module that prints.

Lines and tables are drawn here with a few ANSI codes (plain text when the stream is not a terminal), so
everyday commands never import rich; rich's consoles are still there for trees and progress bars.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

_console: Console | None = None
_err: Console | None = None

_ANSI = {
    "bold": "1",
    "dim": "2",
    "italic": "3",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}
# rich's markup: [style], [/style] or [/]; `\[` is a literal bracket
_TAG = re.compile(r"(\\*)\[(/?)([a-z][a-z ]*)?\]")


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


def _colour(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def render_markup(markup: str, colour: bool) -> str:
    """rich-style markup (`[bold]x[/bold]`, `[red]`, `[/]`, `\\[` for a bracket) as ANSI or plain text."""
    open_styles: list[str] = []

    def sub(m: re.Match[str]) -> str:
        slashes, closing, name = m.group(1), m.group(2), m.group(3)
        if len(slashes) % 2 == 1:  # escaped: a literal bracket
            return slashes[:-1] + m.group(0)[len(slashes) :]
        codes = [] if name is None else [_ANSI.get(word) for word in name.split()]
        if closing:
            if open_styles:
                open_styles.pop()
            if not colour:
                return slashes
            return slashes + "\x1b[0m" + "".join(f"\x1b[{c}m" for c in open_styles)
        if name is None or not codes or None in codes:
            return m.group(0)  # not a style: text in brackets
        open_styles.append(";".join(c for c in codes if c))
        return slashes + (f"\x1b[{open_styles[-1]}m" if colour else "")

    text = _TAG.sub(sub, markup)
    return text + ("\x1b[0m" if colour and open_styles else "")


def escape(text: str) -> str:
    """Text made safe to put inside markup (brackets that look like tags are escaped)."""
    return re.sub(r"(\\*)(\[[a-z/])", r"\1\1\\\2", text)


def out(text: str = "") -> None:
    """Plain text to stdout, no markup (job output goes here untouched)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def info(markup: str) -> None:
    """A status line to stderr, so stdout stays the job's output."""
    sys.stderr.write(render_markup(markup, _colour(sys.stderr)) + "\n")
    sys.stderr.flush()


def error(message: str) -> None:
    info(f"[red]Error:[/red] {escape(message)}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


class Styled(str):
    """A table cell with a style (`red`, `bold green`): plain text wherever it is used as a string."""

    style: str

    def __new__(cls, text: str, style: str = "") -> Styled:
        obj = super().__new__(cls, text)
        obj.style = style
        return obj


def _cell(value: Any) -> tuple[str, str]:
    """(text, style) of a cell: a Styled string, a rich Text (duck-typed), or anything printable."""
    if value is None:
        return "", ""
    if isinstance(value, Styled):
        return str(value), value.style
    plain = getattr(value, "plain", None)
    if isinstance(plain, str):  # a rich Text
        style = getattr(value, "style", "")
        return plain, style if isinstance(style, str) else ""
    return str(value), ""


def table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    """Columns padded to their widest cell, two spaces apart, bold header; to stdout."""
    colour = _colour(sys.stdout)
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [len(c) for c in columns]
    for r in cells:
        for i, (text, _) in enumerate(r[: len(widths)]):
            widths[i] = max(widths[i], max((len(line) for line in text.split("\n")), default=0))

    def paint(text: str, style: str) -> str:
        if not colour or not style:
            return text
        codes = ";".join(c for c in (_ANSI.get(w) for w in style.split()) if c)
        return f"\x1b[{codes}m{text}\x1b[0m" if codes else text

    def line(row: list[tuple[str, str]]) -> str:
        parts = [paint(t.ljust(widths[i]), s) for i, (t, s) in enumerate(row[: len(widths)])]
        return "  ".join(parts).rstrip()

    lines = []
    if title:
        lines.append(paint(title, "italic"))
    lines.append(line([(c, "bold") for c in columns]))
    for r in cells:
        lines.append(line([(t.replace("\n", " "), s) for t, s in r]))
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


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


def status(s: str) -> Styled:
    """A status as styled text (a plain string too, safe in tables and markup)."""
    return Styled(s, STATUS_STYLE.get(s, ""))


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
