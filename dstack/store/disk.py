"""SQLite and file errors under DSTACK_HOME as one line: the disk is full (and how much is free), or an I/O
error, instead of `sqlite3.OperationalError: disk I/O error` tracebacks."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from dstack.errors import StorageError


class DiskError(StorageError):
    """The disk under DSTACK_HOME is full or failed a read/write of the state."""


DISK_ERRORS = ("disk i/o error", "database or disk is full", "unable to open database file")


def disk_error(error: BaseException, path: Path | None = None) -> DiskError:
    """One line for a failed write under DSTACK_HOME: the disk is full (how much is free), or an I/O error."""
    import shutil

    from dstack.home import home

    where = path.parent if path is not None else home()
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    if 0 <= free < 1024 * 1024 or getattr(error, "errno", None) == 28:  # ENOSPC
        return DiskError(
            f"the disk under DSTACK_HOME ({where}) is full: free space there "
            f"({max(free, 0) // 1024} KiB left) or point DSTACK_HOME at a disk with room"
        )
    return DiskError(f"could not read or write the state under DSTACK_HOME ({where}): {error}")


class Connection(sqlite3.Connection):
    """A connection whose disk-full and I/O errors are one-line StorageErrors, not tracebacks."""

    path: Path | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as e:
            if str(e).lower().startswith(DISK_ERRORS):
                raise disk_error(e, self.path) from e
            raise

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.OperationalError as e:
            if str(e).lower().startswith(DISK_ERRORS):
                raise disk_error(e, self.path) from e
            raise
