"""What a workflow's `triggers:` say, read once with file:line errors; cron expressions checked here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dstack.errors import ConfigError

REPO_WORDS = ("push", "commit")
_FIELDS = [  # (name, lowest, highest, names)
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    ),
    ("day-of-week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
]
_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EXAMPLE = 'e.g. "0 3 * * *" (03:00 every day) or "*/15 * * * *" (every 15 minutes)'


@dataclass(frozen=True)
class Trigger:
    """One entry of a workflow's `triggers:`: a repo trigger (commits) or a schedule."""

    workflow: str
    kind: str  # "repo" | "schedule"
    include: tuple[str, ...] | None = None  # repo: globs relative to the project root; None: any file
    schedule: str | None = None  # cron expression
    line: int = 0

    def describe(self) -> str:
        """How `dstack triggers` shows it."""
        if self.kind == "schedule":
            return f"schedule {self.schedule}"
        return "commit " + (", ".join(self.include) if self.include else "(any file)")


def parse_triggers(
    workflow: str, value: Any, file: str, line: int, unknown: list[ConfigError] | None = None
) -> list[Trigger]:
    """A workflow's `triggers:` (YAML with lines, or plain values) as Triggers; ConfigError at file:line.

    `unknown`: collects triggers of kinds dstack doesn't run (older repos have some) instead of failing."""
    items = value if isinstance(value, list) else [value]
    lines = getattr(value, "lines", None) or []
    found: list[Trigger] = []
    for i, item in enumerate(items):
        at = lines[i] if i < len(lines) else line

        def fail(message: str, hint: str | None = None, at: int = at) -> ConfigError:
            return ConfigError(message, file=file, line=at, hint=hint)

        if isinstance(item, str) and item.strip() in REPO_WORDS:
            found.append(Trigger(workflow, "repo", None, line=at))
            continue
        if not isinstance(item, dict) or len(item) != 1:
            error = fail(
                f"trigger {item!r} is not one dstack runs",
                hint='write `push`, `{repo: {include: [GLOBS]}}` or `{schedule: "0 3 * * *"}`',
            )
            if unknown is None:
                raise error
            unknown.append(error)
            continue
        key, body = next(iter(item.items()))
        at = item.lines.get(key, at) if hasattr(item, "lines") else at
        if key in ("schedule", "cron"):
            if not isinstance(body, str):
                raise fail("'schedule' must be a cron expression in quotes", hint=_EXAMPLE, at=at)
            found.append(Trigger(workflow, "schedule", schedule=check_cron(body, file, at), line=at))
        elif key in ("repo", *REPO_WORDS):
            include = body.get("include") if isinstance(body, dict) else None
            if body is not None and not (isinstance(body, dict) and set(body) <= {"include"}):
                raise fail(f"'{key}' takes only `include: [GLOBS]`", at=at)
            if isinstance(include, str):
                include = [include]
            if include is not None and not (
                isinstance(include, list) and include and all(isinstance(g, str) for g in include)
            ):
                raise fail(
                    "'include' must be a list of globs", hint="e.g. include: [train.py, 'src/**']", at=at
                )
            found.append(Trigger(workflow, "repo", tuple(include) if include else None, line=at))
        else:
            hint = "dstack runs `repo:` and `schedule:` triggers"
            error = fail(f"unknown trigger '{key}'", hint=hint, at=at)
            if unknown is None:
                raise error
            unknown.append(error)
    return found


def check_cron(expression: str, file: str | None = None, line: int | None = None) -> str:
    """The expression, normalized to single spaces, if cron accepts it; ConfigError at file:line if not."""
    text = " ".join(expression.split())
    if text.lower() in _MACROS:
        return text.lower()
    parts = text.split(" ")
    if len(parts) != 5:
        raise ConfigError(
            f"schedule {expression!r} has {len(parts)} field(s); cron needs 5: "
            "minute hour day-of-month month day-of-week",
            file=file,
            line=line,
            hint=_EXAMPLE,
        )
    for part, (name, low, high, names) in zip(parts, _FIELDS, strict=True):
        for piece in part.split(","):
            problem = _field_problem(piece.lower(), low, high, names)
            if problem:
                raise ConfigError(
                    f"schedule {expression!r}: {name} {piece!r} {problem}",
                    file=file,
                    line=line,
                    hint=_EXAMPLE,
                )
    return text


def _field_problem(piece: str, low: int, high: int, names: dict[str, int]) -> str | None:
    span, slash, step = piece.partition("/")
    if slash and not (step.isdigit() and int(step) > 0):
        return "has a bad step (write */N with N > 0)"
    if span == "*":
        return None
    first, dash, last = span.partition("-")
    values = []
    for v in (first, last) if dash else (first,):
        number = names.get(v, int(v) if v.isdigit() else None)
        if number is None:
            return f"is not a number from {low} to {high}"
        if not low <= number <= high:
            return f"is out of range ({low}-{high})"
        values.append(number)
    if dash and values[0] > values[1]:
        return "is a range that runs backwards"
    return None
