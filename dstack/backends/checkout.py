"""A job's copy of its repo state on this machine, at the cost of what changed.

One pristine tree per repo lives in `$DSTACK_HOME/checkouts/`; before a job starts it is brought up to date
with the run's manifest (only changed files come from the store, digest-checked), then copied whole into the
job's `work/` with `cp -R --reflink=auto` (one process, new inodes: a job that writes into a tracked file in
place changes neither the store nor the pristine tree nor another job's copy). Modes come with the copy
(less the umask); times are the copy's, as after a `git checkout`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.store.objects import Manifest, ObjectStore


def checkout_copy(files: Manifest, store: ObjectStore, work: Path, repo: str) -> None:
    """Fill `work` with the repo state `files` (of the repo at `repo`), through that repo's pristine tree."""
    import fcntl

    from dstack.home import sub

    base = sub("checkouts")
    key = hashlib.sha256(repo.encode()).hexdigest()[:16]
    tree, record = base / key, base / f"{key}.json"
    with open(base / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one job at a time updates and copies a repo's tree
        _update(files, store, tree, record)
        work.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["cp", "-R", "--reflink=auto", f"{tree}/.", str(work)], capture_output=True, text=True
        )
    if proc.returncode != 0:  # no GNU cp here: copy from the store, file by file
        from dstack.repo import checkout_files

        checkout_files(files, store, work)


def _update(files: Manifest, store: ObjectStore, tree: Path, record: Path) -> None:
    """Bring the pristine tree to `files`: write what changed, delete what went; rebuilt when in doubt."""
    from dstack.artifacts import materialize

    want = {e.path: [e.digest, e.mode, e.is_symlink] for e in files.entries}
    try:
        had = json.loads(record.read_text())
    except (OSError, ValueError):
        had = None
    if had is None or not tree.is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        had = {}
    record.unlink(missing_ok=True)  # while the tree changes it has no record: a crash means a rebuild
    for path in had.keys() - want.keys():
        _remove(tree, path)
    changed = [e for e in files.entries if had.get(e.path) != want[e.path]]
    for e in changed:
        if e.path in had:
            _remove(tree, e.path)
    if changed:
        try:
            materialize(changed, store, tree)
        except Exception:
            shutil.rmtree(tree, ignore_errors=True)  # e.g. a file became a folder: start clean next time
            raise
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(want))
    os.replace(tmp, record)


def _remove(tree: Path, path: str) -> None:
    """Delete one file of the tree and the folders it leaves empty."""
    target = tree / path
    try:
        target.unlink()
    except FileNotFoundError:
        return
    except IsADirectoryError:
        shutil.rmtree(target, ignore_errors=True)
    parent = target.parent
    while parent != tree:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent
