"""All SQL of triggers: what fired when (`trigger_fires`) and the hooks dstack wrote (`trigger_installs`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from dstack.store.state import State


@dataclass
class Fire:
    """One time a trigger fired: the run it started (if any) and what came of it."""

    project_root: str
    workflow: str
    kind: str  # "repo" | "schedule" | "watch"
    origin: str  # "commit SHA", "schedule EXPR", "watch"
    outcome: str  # "started", "skipped: …", "failed: …"
    run_id: str | None = None
    fired_at: float = field(default_factory=time.time)
    run_name: str | None = None


@dataclass
class Install:
    """A file dstack wrote for triggers (a Git hook), with what it needs to put things back."""

    path: str
    kind: str
    project_root: str
    detail: dict[str, Any] = field(default_factory=dict)
    installed_at: float = field(default_factory=time.time)


def record_fire(state: State, fire: Fire) -> None:
    """Remember that a trigger fired."""
    state.db.execute(
        "INSERT INTO trigger_fires (project_root, workflow, kind, origin, run_id, outcome, fired_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (fire.project_root, fire.workflow, fire.kind, fire.origin, fire.run_id, fire.outcome, fire.fired_at),
    )


def last_fires(state: State, project_root: str) -> dict[tuple[str, str], Fire]:
    """The latest fire of each (workflow, kind) of a project."""
    rows = state.db.execute(
        "SELECT f.project_root, f.workflow, f.kind, f.origin, f.outcome, f.run_id, f.fired_at, "
        "runs.name AS run_name FROM trigger_fires f LEFT JOIN runs ON runs.id = f.run_id "
        "WHERE f.project_root = ? ORDER BY f.fired_at",
        (project_root,),
    ).fetchall()
    return {(r["workflow"], r["kind"]): Fire(**dict(r)) for r in rows}


def save_install(state: State, install: Install) -> None:
    state.db.execute(
        "INSERT OR REPLACE INTO trigger_installs VALUES (?, ?, ?, ?, ?)",
        (install.path, install.kind, install.project_root, json.dumps(install.detail), install.installed_at),
    )


def get_install(state: State, path: str) -> Install | None:
    row = state.db.execute("SELECT * FROM trigger_installs WHERE path = ?", (path,)).fetchone()
    if row is None:
        return None
    d = dict(row)
    d["detail"] = json.loads(d["detail"] or "{}")
    return Install(**d)


def delete_install(state: State, path: str) -> None:
    state.db.execute("DELETE FROM trigger_installs WHERE path = ?", (path,))
