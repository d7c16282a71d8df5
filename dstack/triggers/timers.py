"""Schedules as systemd user timers, for machines without cron: one `.timer` and `.service` per schedule."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from dstack.errors import DstackError

_DOW = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_MONTHS = "jan feb mar apr may jun jul aug sep oct nov dec".split()
_MACROS = {
    "@hourly": "hourly",
    "@daily": "daily",
    "@midnight": "daily",
    "@weekly": "Sun *-*-* 00:00:00",
    "@monthly": "*-*-01 00:00:00",
    "@yearly": "*-01-01 00:00:00",
    "@annually": "*-01-01 00:00:00",
}
PREFIX = "dstack-trigger-"
MARK = "# dstack trigger "


class TimerError(DstackError):
    """A schedule systemd can't express, or `systemctl --user` failed."""

    exit_code = 2


def available() -> bool:
    """Whether this user has a running systemd user manager."""
    try:
        proc = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def units_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def on_calendar(cron: str) -> str:
    """A checked cron expression as systemd's `OnCalendar=` (each field spelled out as a list)."""
    if cron in _MACROS:
        return _MACROS[cron]
    minute, hour, dom, month, dow = cron.split(" ")
    if dom != "*" and dow != "*":
        raise TimerError(
            f"schedule {cron!r} runs on a day of the month OR a weekday; systemd timers can't say that",
            hint="split it into two schedules, one for each",
        )
    m, h = _values(minute, 0, 59), _values(hour, 0, 23)
    d, mo = _values(dom, 1, 31), _values(month, 1, 12)
    days = _values(dow, 0, 7)
    weekdays = "" if days == "*" else ",".join(dict.fromkeys(_DOW[int(v)] for v in days.split(","))) + " "
    return f"{weekdays}*-{mo}-{d} {h}:{m}:00"


def _values(field: str, low: int, high: int) -> str:
    if field == "*":
        return "*"
    found: list[int] = []
    for piece in field.lower().split(","):
        span, _, step = piece.partition("/")
        first, dash, last = span.partition("-")
        if span == "*":
            a, b = low, high
        else:
            a = _number(first, low)
            b = _number(last, low) if dash else (high if step else a)
        found += range(a, b + 1, int(step or 1))
    if len(found) == high - low + 1:
        return "*"
    return ",".join(f"{v:02d}" for v in sorted(set(found)))


def _number(text: str, low: int) -> int:
    if text in _MONTHS:
        return _MONTHS.index(text) + 1
    if text[:3] in ("sun", "mon", "tue", "wed", "thu", "fri", "sat"):
        return ["sun", "mon", "tue", "wed", "thu", "fri", "sat"].index(text[:3])
    return int(text)


def _quote(text: str, exec_line: bool = False) -> str:
    """A quoted word for a unit file: `%` (specifiers) escaped, and `$` too on ExecStart= (variables)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped.replace("$", "$$") if exec_line else escaped}"'


def unit_name(project_root: str, workflow: str, schedule: str) -> str:
    digest = hashlib.sha256(f"{project_root}\0{workflow}\0{schedule}".encode()).hexdigest()[:12]
    return PREFIX + digest


def unit_files(
    project_root: str, workflow: str, schedule: str, log: Path, env: dict[str, str]
) -> dict[str, str]:
    """The `.service` and `.timer` texts of one schedule."""
    from shlex import quote

    name = unit_name(project_root, workflow, schedule)
    mark = f"{MARK}{quote(project_root)} {quote(workflow)} {schedule}\n"
    out = str(log).replace("%", "%%")
    command = [sys.executable, "-m", "dstack", "triggers", "scheduled", workflow, "--schedule", schedule]
    service = (
        f"{mark}[Unit]\nDescription=dstack: {workflow} on schedule {schedule}\n\n[Service]\nType=oneshot\n"
        f"WorkingDirectory={project_root.replace('%', '%%')}\n"
        + "".join(f"Environment={_quote(f'{k}={v}')}\n" for k, v in env.items())
        + f"ExecStart={' '.join(_quote(c, exec_line=True) for c in command)}\n"
        f"StandardOutput=append:{out}\nStandardError=append:{out}\n"
    )
    timer = (
        f"{mark}[Unit]\nDescription=dstack: {workflow} on schedule {schedule}\n\n"
        f"[Timer]\nOnCalendar={on_calendar(schedule)}\n\n[Install]\nWantedBy=timers.target\n"
    )
    return {f"{name}.service": service, f"{name}.timer": timer}


def systemctl(*args: str) -> None:
    proc = subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise TimerError(f"`systemctl --user {' '.join(args)}` failed: {proc.stderr.strip()}")


def installed(project_root: str | None = None) -> list[tuple[str, str, str, Path]]:
    """Our timers: (project root, workflow, schedule, timer file), of one project or all."""
    from shlex import split

    found = []
    folder = units_dir()
    for path in sorted(folder.glob(f"{PREFIX}*.timer")) if folder.is_dir() else []:
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        if first.startswith(MARK):
            root, workflow, *schedule = split(first[len(MARK) :])
            if project_root is None or root == project_root:
                found.append((root, workflow, " ".join(schedule), path))
    return found


def install(project_root: str, schedules: list[tuple[str, str]], log: Path, env: dict[str, str]) -> None:
    """Make the user's timers for this project exactly one per (workflow, schedule)."""
    wanted: dict[str, str] = {}
    for workflow, schedule in schedules:
        wanted.update(unit_files(project_root, workflow, schedule, log, env))
    folder = units_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p for _, _, _, p in installed(project_root) if p.name not in wanted]
    for path in stale:
        systemctl("disable", "--now", path.name)
        path.unlink()
        path.with_suffix(".service").unlink(missing_ok=True)
    for name, text in wanted.items():
        (folder / name).write_text(text)
    systemctl("daemon-reload")
    for name in wanted:
        if name.endswith(".timer"):
            systemctl("enable", "--now", name)


def uninstall(project_root: str) -> int:
    """Stop and remove this project's timers; how many there were."""
    mine = installed(project_root)
    for _, _, _, path in mine:
        systemctl("disable", "--now", path.name)
        path.unlink()
        path.with_suffix(".service").unlink(missing_ok=True)
    if mine:
        systemctl("daemon-reload")
    return len(mine)
