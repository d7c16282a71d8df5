"""`dstack triggers [install|uninstall]`: one project's hooks and crontab entries, and what fired."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dstack.errors import DstackError, UsageError
from dstack.store.state import State
from dstack.store.triggers import last_fires
from dstack.triggers import hooks, schedule
from dstack.triggers.fire import project_triggers
from dstack.triggers.model import Trigger


@dataclass
class TriggersStatus:
    """What a project declares, what is installed for it, and when each trigger last fired."""

    project_root: str
    triggers: list[dict[str, Any]] = field(default_factory=list)
    hooks: list[hooks.HookStatus] = field(default_factory=list)
    schedules: list[schedule.Entry] = field(default_factory=list)
    schedules_in: str | None = None  # "crontab", "file PATH", or why there is none

    def to_json(self) -> dict[str, Any]:
        return {
            "project_root": self.project_root,
            "triggers": self.triggers,
            "hooks": [h.to_json() for h in self.hooks],
            "schedules": [e.to_json() for e in self.schedules],
            "schedules_in": self.schedules_in,
        }


def _has_cron() -> bool:
    try:
        schedule.where()
        return True
    except schedule.ScheduleError:
        return False


def _root(cwd: Path) -> Path:
    """The project's root; the repo's top when `.dstack/` is gone (so `uninstall` still works)."""
    from dstack.errors import RepoError
    from dstack.repo import find_repo_root
    from dstack.workflows import load_project

    try:
        return Path(load_project(cwd).root).resolve()
    except RepoError:
        return find_repo_root(cwd.resolve()).resolve()


def _project(cwd: Path) -> tuple[Path, list[Trigger]]:
    from dstack.workflows import load_project

    project = load_project(cwd)
    return Path(project.root).resolve(), project_triggers(project)


def install(state: State, cwd: Path) -> TriggersStatus:
    """Install the hooks (if any repo trigger) and crontab entries (one per schedule) the project declares."""
    from dstack.home import sub

    root, triggers = _project(cwd)
    if not triggers:
        raise UsageError(
            "no workflow in .dstack/ has triggers",
            hint='add e.g. `triggers: [{repo: {include: [train.py]}}]` or `[{schedule: "0 3 * * *"}]`',
        )
    if any(t.kind == "repo" for t in triggers):
        hooks.install_hooks(state, root)
    elif any(h.state == "installed" for h in hooks.hook_statuses(root)):
        hooks.uninstall_hooks(state, root)
    if any(t.kind == "schedule" for t in triggers) or _has_cron():
        schedule.install_schedules(root, triggers, sub("triggers") / "schedule.log")
    return status(state, cwd)


def uninstall(state: State, cwd: Path) -> TriggersStatus:
    """Remove the project's hooks (putting back the chained ones) and crontab entries."""
    root = _root(cwd)
    hooks.uninstall_hooks(state, root)
    if _has_cron():
        schedule.uninstall_schedules(root)
    return status(state, cwd, check=False)


def status(state: State, cwd: Path, check: bool = True) -> TriggersStatus:
    """The project's triggers with what is installed for them and when each last fired."""
    try:
        root, triggers = _project(cwd)
    except DstackError:
        if check:
            raise
        root, triggers = _root(cwd), []
    result = TriggersStatus(str(root), hooks=hooks.hook_statuses(root))
    try:
        result.schedules_in = schedule.where()
        result.schedules = schedule.entries(root)
    except schedule.ScheduleError as e:
        result.schedules_in = f"none ({e.message})"
    fires = last_fires(state, str(root))
    hooked = all(h.state == "installed" for h in result.hooks)
    for t in triggers:
        if t.kind == "repo":
            installed = hooked
        else:
            installed = any(e.workflow == t.workflow and e.schedule == t.schedule for e in result.schedules)
        last = fires.get((t.workflow, t.kind))
        result.triggers.append(
            {
                "workflow": t.workflow,
                "trigger": t.describe(),
                "kind": t.kind,
                "installed": installed,
                "last_fired": last.fired_at if last else None,
                "last_origin": last.origin if last else None,
                "last_run": last.run_name if last else None,
                "last_outcome": last.outcome if last else None,
            }
        )
    for (workflow, kind), last in fires.items():
        if kind == "watch":
            result.triggers.append(
                {
                    "workflow": workflow,
                    "trigger": "dstack watch",
                    "kind": "watch",
                    "installed": None,
                    "last_fired": last.fired_at,
                    "last_origin": last.origin,
                    "last_run": last.run_name,
                    "last_outcome": last.outcome,
                }
            )
    return result
