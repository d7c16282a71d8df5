"""A new state file, built aside and linked into place: the first command on a new DSTACK_HOME syncs the
disk twice, where creating the file in place (a journal for its header, a WAL for the schema, a checkpoint
on close) syncs it eight times."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from dstack.store.disk import disk_error


def create_state_file(path: Path, migrations: list[str]) -> None:
    """Make `path` (absent) a WAL database holding every migration, mode 0600. Another process creating it
    at the same time wins or loses whole (nothing it wrote is replaced); where the file system has no hard
    links, nothing is made here and the caller creates the file in place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        try:
            os.unlink(tmp)  # left by a crashed process that had this pid
        except FileNotFoundError:
            pass
        db = sqlite3.connect(tmp, isolation_level=None)
        try:
            os.chmod(tmp, 0o600)
            db.execute("PRAGMA journal_mode=OFF")  # nothing to roll back: a file nobody sees yet
            db.execute("PRAGMA synchronous=OFF")  # synced once below, before it is linked into place
            for script in migrations:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {len(migrations)}")
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # made meanwhile by another process: that one is the state
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise
            return  # no hard links here: created in place by the caller
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except sqlite3.OperationalError as e:
        raise disk_error(e, path) from e
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
