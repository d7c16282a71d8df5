"""The plan cache: `dstack run`'s plans by the fingerprint of their inputs, in one small SQLite file."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from types import TracebackType

_SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    fingerprint TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    used_at REAL NOT NULL
) WITHOUT ROWID;
"""
KEEP = 500  # plans kept; the least recently used go first
MAX_PLAN = 4 << 20  # a plan bigger than this (a huge uncommitted diff) is not kept


def _path() -> Path:
    from dstack.home import sub

    return sub("cache") / "plans.sqlite"


def read_plan(fingerprint: str) -> str | None:
    """The plan remembered under `fingerprint` in `$DSTACK_HOME/cache`; None if none (or unreadable)."""
    try:
        with PlanCache(_path()) as cache:
            return cache.get(fingerprint)
    except sqlite3.DatabaseError as e:
        _discard_if_corrupt(e)
        return None  # a cache: the plan is worked out again
    except OSError:
        return None


def write_plan(fingerprint: str, plan: str) -> None:
    """Remember `plan`; a cache that can't be written is skipped (the run is recorded already)."""
    if len(plan) > MAX_PLAN:
        return
    try:
        with PlanCache(_path()) as cache:
            cache.put(fingerprint, plan)
    except sqlite3.DatabaseError as e:
        _discard_if_corrupt(e)
    except OSError:
        pass


def _discard_if_corrupt(error: sqlite3.DatabaseError) -> None:
    """A cache file that is not a database any more (it is written unsynced) is removed: made anew next."""
    if "malformed" in str(error) or "not a database" in str(error):
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{_path()}{suffix}")
            except OSError:
                pass


class PlanCache:
    """Plans (JSON) by fingerprint. A cache: unreadable or missing means "work it out again"."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=5, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # a cache: a plan lost in a crash is worked out again, so nothing here waits for the disk
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error:
            self._db.close()
            raise

    def get(self, fingerprint: str) -> str | None:
        """The plan remembered under `fingerprint`, or None."""
        row = self._db.execute("SELECT plan FROM plans WHERE fingerprint = ?", (fingerprint,)).fetchone()
        if row is None:
            return None
        self._db.execute("UPDATE plans SET used_at = ? WHERE fingerprint = ?", (time.time(), fingerprint))
        return str(row[0])

    def put(self, fingerprint: str, plan: str) -> None:
        """Remember `plan` under `fingerprint`, keeping the `KEEP` most recently used."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO plans VALUES (?, ?, ?)", (fingerprint, plan, time.time())
            )
            self._db.execute(
                "DELETE FROM plans WHERE fingerprint NOT IN "
                "(SELECT fingerprint FROM plans ORDER BY used_at DESC LIMIT ?)",
                (KEEP,),
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PlanCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
