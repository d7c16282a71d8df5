"""The dashboard's one bulk read: every run's list columns and tags in two light queries (no diffs)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field


@dataclass
class RunSummary:
    """What the runs page shows of a run."""

    name: str
    workflow: str
    status: str
    reason: str | None
    branch: str | None
    commit: str
    created_at: float
    finished_at: float | None
    tags: list[str] = field(default_factory=list)


def run_summaries(db: sqlite3.Connection) -> list[RunSummary]:
    """Every run, newest first, with its tag names."""
    tags: dict[str, list[str]] = {}
    for run_id, name in db.execute("SELECT run_id, name FROM tags ORDER BY created_at DESC"):
        tags.setdefault(run_id, []).append(name)
    rows = db.execute(
        "SELECT id, name, workflow, status, reason, branch, substr(commit_sha, 1, 8), created_at, "
        "finished_at FROM runs ORDER BY created_at DESC"
    )
    return [
        RunSummary(r[1], r[2], r[3], r[4], r[5], r[6] or "", r[7], r[8], tags.get(r[0], [])) for r in rows
    ]
