"""The digest cache: like Git's index, (path, size, mtime, ctime, inode) -> digest, in one SQLite file."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from dstack.errors import StorageError
from dstack.hashing import digest_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS digests (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    digest TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stored (
    store TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (store, digest)
) WITHOUT ROWID;
"""
_FLUSH_EVERY = 2000


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


class DigestCache:
    """Digests of files keyed by their stat, so an unchanged file is never read twice.

    Safe for several threads and for two processes (WAL, busy timeout). Writes are batched and
    flushed in one transaction every few thousand files and on `flush()`/`close()`.
    """

    # a file modified this recently may change again within the same timestamp tick ("racy git"):
    # its digest is returned but not cached
    racy_window_ns = 2_000_000_000

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise StorageError(f"can't open the digest cache {path}: {e}") from e
        self._lock = threading.Lock()
        self._pending: list[tuple[str, int, int, int, int, str]] = []
        self._pending_stored: list[tuple[str, str]] = []
        self._stored: dict[str, set[str]] = {}

    # -- digests ------------------------------------------------------------------------------

    def digest(self, path: Path, st: os.stat_result | None = None) -> str:
        """The digest of the file at `path`: cached if its stat is unchanged, else computed and cached."""
        name = _abspath(path)
        st = st if st is not None else os.stat(name)
        if not _storable(name):
            return digest_file(Path(name))
        with self._lock:
            row = self._db.execute(
                "SELECT size, mtime_ns, ctime_ns, inode, digest FROM digests WHERE path = ?", (name,)
            ).fetchone()
        if row is not None and tuple(row[:4]) == _key(st):
            return str(row[4])
        return self._compute(name, st)

    def digest_many(
        self,
        paths: Sequence[str | os.PathLike[str]],
        stats: Sequence[os.stat_result] | None = None,
        under: str | None = None,
    ) -> list[str]:
        """Digests of many files, in order: one range query for the cached ones, one write transaction.

        `under`: an absolute directory holding all the paths, if the caller knows it.
        """
        names = [_abspath(p) for p in paths]
        sts = list(stats) if stats is not None else [os.stat(n) for n in names]
        if not names:
            return []
        if under is None:
            under = os.path.commonpath(names) if len(names) > 1 else names[0]
        known = self._rows_under(under) if _storable(under) else {}
        out: list[str] = []
        misses: list[int] = []
        for i, (name, st) in enumerate(zip(names, sts, strict=True)):
            row = known.get(name)
            if (
                row is not None
                and row[1] == st.st_size
                and row[2] == st.st_mtime_ns
                and row[3] == st.st_ctime_ns
                and row[4] == st.st_ino
            ):
                out.append(row[5])
            else:
                out.append("")
                misses.append(i)
        if len(misses) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                computed = pool.map(lambda i: self._compute(names[i], sts[i]), misses)
                for i, digest in zip(misses, computed, strict=True):
                    out[i] = digest
        elif misses:
            out[misses[0]] = self._compute(names[misses[0]], sts[misses[0]])
        self.flush()
        return out

    def _rows_under(self, prefix: str) -> dict[str, tuple[str, int, int, int, int, str]]:
        # a range scan on the primary key: every cached path that starts with `prefix`
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, mtime_ns, ctime_ns, inode, digest FROM digests"
                " WHERE path >= ? AND path < ?",
                (prefix, prefix + "\U0010ffff"),
            ).fetchall()
        return {r[0]: r for r in rows}

    def _compute(self, name: str, st: os.stat_result) -> str:
        digest = digest_file(Path(name))
        after = os.stat(name)
        if _key(after) != _key(st):
            return self._compute(name, after)  # changed while we read it
        racy = time.time_ns() - st.st_mtime_ns < self.racy_window_ns
        if stat.S_ISREG(st.st_mode) and not racy and _storable(name):
            with self._lock:
                self._pending.append((name, *_key(st), digest))
                full = len(self._pending) >= _FLUSH_EVERY
            if full:
                self.flush()
        return digest

    # -- objects known to be in a store (immutable, so once there, there) ---------------------

    def is_stored(self, store_url: str, digest: str) -> bool:
        """Whether `digest` is known to be in the object store at `store_url`."""
        with self._lock:
            known = self._stored.get(store_url)
            if known is None:
                rows = self._db.execute("SELECT digest FROM stored WHERE store = ?", (store_url,)).fetchall()
                known = self._stored[store_url] = {r[0] for r in rows}
            return digest in known

    def mark_stored(self, store_url: str, digest: str) -> None:
        """Remember that `digest` is in the object store at `store_url`."""
        with self._lock:
            self._stored.setdefault(store_url, set()).add(digest)
            self._pending_stored.append((store_url, digest))

    def forget_store(self, store_url: str) -> None:
        """Forget what is known to be in `store_url` (after it was emptied or garbage-collected)."""
        with self._lock:
            self._stored.pop(store_url, None)
            self._pending_stored = [p for p in self._pending_stored if p[0] != store_url]
            self._db.execute("DELETE FROM stored WHERE store = ?", (store_url,))

    def forget_under(self, prefix: str) -> None:
        """Drop the cached digests of paths under the directory `prefix` (a job's work dir, removed next)."""
        self.flush()
        base = prefix.rstrip("/") + "/"
        with self._lock:
            self._db.execute("DELETE FROM digests WHERE path >= ? AND path < ?", (base, base + "\U0010ffff"))

    # -- lifecycle ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the pending entries in one transaction."""
        with self._lock:
            pending, self._pending = self._pending, []
            pending_stored, self._pending_stored = self._pending_stored, []
            if not pending and not pending_stored:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)", pending)
                self._db.executemany("INSERT OR IGNORE INTO stored VALUES (?, ?)", pending_stored)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StorageError(f"can't write the digest cache {self.path}: {e}") from e

    def close(self) -> None:
        """Flush and close the database."""
        try:
            self.flush()
        finally:
            self._db.close()

    def __enter__(self) -> DigestCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _abspath(path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    return name if os.path.isabs(name) else os.path.abspath(name)


def _storable(name: str) -> bool:
    """Whether SQLite can hold the path as text (a name that isn't UTF-8 is hashed but not cached)."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True
