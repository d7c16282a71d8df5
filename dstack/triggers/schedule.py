"""Schedules: one crontab line per `schedule:` trigger, tagged so `uninstall` removes exactly those lines.

The user's crontab is read with `crontab -l` and written with `crontab -`; `DSTACK_CRONTAB=FILE` makes dstack
use that file instead (for machines without cron, and for tests). Without cron, systemd user timers
(`dstack.triggers.timers`) hold them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dstack.errors import DstackError, UsageError
from dstack.triggers.model import Trigger

TAG = "# dstack trigger"  # the comment line above each of our entries
_ENV_KEPT = ("PATH", "DSTACK_HOME", "PYTHONPATH")  # cron's environment is bare: runs see the installer's


class ScheduleError(DstackError):
    """The crontab can't be read or written."""

    exit_code = 2


@dataclass
class Entry:
    """One of our crontab entries: the tag line and the cron line under it."""

    project_root: str
    workflow: str
    schedule: str
    line: str

    def to_json(self) -> dict[str, str]:
        return dict(self.__dict__)


SYSTEMD = "systemd user timers"


def where() -> str:
    """What holds schedules: a file (`DSTACK_CRONTAB`), the user's crontab, or systemd user timers."""
    from dstack.triggers import timers

    if os.environ.get("DSTACK_CRONTAB"):
        return f"file {os.environ['DSTACK_CRONTAB']}"
    if shutil.which("crontab"):
        return "crontab"
    if timers.available():
        return SYSTEMD
    raise ScheduleError(
        "schedules need cron or systemd: this machine has no `crontab` command and no systemd user manager",
        hint="install cron (Debian/Ubuntu: `apt-get install cron`), or set DSTACK_CRONTAB=FILE to use a file",
    )


def read_crontab() -> str | None:
    """The crontab's text; None when there is none."""
    path = os.environ.get("DSTACK_CRONTAB")
    if path:
        return Path(path).read_text() if Path(path).exists() else None
    where()
    proc = subprocess.run(["crontab", "-l"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "no crontab" in proc.stderr.lower():
            return None
        raise ScheduleError(f"`crontab -l` failed: {proc.stderr.strip()}")
    return proc.stdout


def write_crontab(text: str | None) -> None:
    """Replace the crontab (None: remove it)."""
    path = os.environ.get("DSTACK_CRONTAB")
    if path:
        if text is None:
            Path(path).unlink(missing_ok=True)
        else:
            Path(path).write_text(text)
        return
    args = ["crontab", "-r"] if text is None else ["crontab", "-"]
    proc = subprocess.run(args, input=text or "", capture_output=True, text=True, check=False)
    if proc.returncode != 0 and not (text is None and "no crontab" in proc.stderr.lower()):
        raise ScheduleError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")


def _tag(project_root: str, workflow: str, schedule: str) -> str:
    return f"{TAG} {shlex.quote(project_root)} {shlex.quote(workflow)} {schedule}"


def _env() -> dict[str, str]:
    return {k: os.environ[k] for k in _ENV_KEPT if os.environ.get(k)}


def _cron_line(trigger: Trigger, project_root: Path, log: Path) -> str:
    q = shlex.quote
    env = " ".join(f"{k}={q(v)}" for k, v in _env().items())
    command = (
        f"cd {q(str(project_root))} && {env} {q(sys.executable)} -m dstack triggers scheduled "
        f"{q(trigger.workflow)} --schedule {q(trigger.schedule or '')} >>{q(str(log))} 2>&1"
    )
    return f"{trigger.schedule} {command.replace('%', chr(92) + '%')}"  # % ends a cron command


def entries(project_root: Path | None = None) -> list[Entry]:
    """Our entries in the crontab or timers (of one project, or all)."""
    if where() == SYSTEMD:
        from dstack.triggers import timers

        mine = timers.installed(None if project_root is None else str(project_root))
        return [Entry(r, w, s, f"{p} (OnCalendar={timers.on_calendar(s)})") for r, w, s, p in mine]
    lines = (read_crontab() or "").splitlines()
    found = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith(TAG + " "):
            try:
                root, workflow, *schedule = shlex.split(line[len(TAG) + 1 :])
            except ValueError:
                continue
            if project_root is None or root == str(project_root):
                found.append(Entry(root, workflow, " ".join(schedule), lines[i + 1]))
    return found


def _without(text: str, project_root: Path) -> str:
    lines = text.splitlines(keepends=True)
    kept, skip = [], False
    for line in lines:
        if skip:
            skip = False
            continue
        if line.startswith(TAG + " "):
            try:
                root = shlex.split(line[len(TAG) + 1 :])[0]
            except (ValueError, IndexError):
                root = None
            if root == str(project_root):
                skip = True
                continue
        kept.append(line)
    return "".join(kept)


def install_schedules(project_root: Path, triggers: list[Trigger], log: Path) -> list[Entry]:
    """Make the crontab hold exactly one entry per schedule trigger of the project (others untouched)."""
    schedules = [t for t in triggers if t.kind == "schedule"]
    if where() == SYSTEMD:
        from dstack.triggers import timers

        timers.install(str(project_root), [(t.workflow, t.schedule or "") for t in schedules], log, _env())
        return entries(project_root)
    before = read_crontab()
    text = _without(before or "", project_root)
    if schedules and text and not text.endswith("\n"):
        raise UsageError("the crontab's last line has no newline", hint="fix it with `crontab -e` and retry")
    for t in schedules:
        text += (
            _tag(str(project_root), t.workflow, t.schedule or "")
            + "\n"
            + _cron_line(t, project_root, log)
            + "\n"
        )
    if text != (before or ""):
        write_crontab(text if text or before is not None else None)
    return entries(project_root)


def uninstall_schedules(project_root: Path) -> int:
    """Remove the project's entries from the crontab; how many there were. An emptied crontab is removed."""
    if where() == SYSTEMD:
        from dstack.triggers import timers

        return timers.uninstall(str(project_root))
    before = read_crontab()
    if before is None:
        return 0
    count = len(entries(project_root))
    text = _without(before, project_root)
    if text != before:
        write_crontab(text or None)
    return count
