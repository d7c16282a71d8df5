"""A job's copy of its repo state on this machine, at the cost of what changed.

Per repo, `$DSTACK_HOME/checkouts/` holds one pristine tree, brought up to date with each run's manifest by
diff (only changed files come from the store, digest-checked), and a few spare trees: finished jobs' work/
folders (dstack.backends.spare). A job's `work/` is a spare brought to its files by diff or, when there is
none, a `cp -R --reflink=auto` of the pristine tree (one process, new inodes). Either way a job that writes
into a tracked file in place changes neither the store nor the pristine tree nor another job's tree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.backends import spare

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dstack.ssh.connection import Connection
    from dstack.store.objects import Manifest, ManifestEntry, ObjectStore


def pool_name(repo: str, include: list[str] | None) -> str:
    """The name of a repo's spare trees for one include list (the whole repo state: no suffix)."""
    name = hashlib.sha256(repo.encode()).hexdigest()[:16]
    if include is not None:
        name += "-" + hashlib.sha256(json.dumps(include).encode()).hexdigest()[:12]
    return name + ".spares"


def checkout_copy(
    code: Manifest, files: Manifest, store: ObjectStore, work: Path, repo: str, include: list[str] | None
) -> None:
    """Fill `work` (not there yet) with `files`: `code`, the run's whole repo state of the repo at `repo`, or
    the part of it `include` picks; how it was handed out is recorded beside it."""
    import fcntl

    from dstack.artifacts import materialize
    from dstack.home import sub

    base = sub("checkouts")
    pool = os.fspath(base / pool_name(repo, include))
    want = {e.path: (e.digest, e.mode) for e in files.entries}
    top = os.fspath(work)
    reuse = reuses_trees(files)
    had = spare.take(pool, top) if reuse else None
    kept: spare.Rows | None = None
    if had is not None:
        try:
            kept = spare.sweep(top, want, had)
            missing = [e for e in files.entries if e.path not in kept]
            materialize(missing, store, work)
            kept.update(spare.stat_rows(top, {e.path: want[e.path] for e in missing}))
        except Exception:  # a tree the job left in a state we can't mend: a fresh copy instead
            spare.discard(top)
            kept = None
    if kept is None:
        key = hashlib.sha256(repo.encode()).hexdigest()[:16]
        with open(base / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one job at a time updates and copies the pristine tree
            _update(code, store, base / key, base / f"{key}.json")
            copied = _copy(base / key, work, None if include is None else sorted(want))
        if not copied:  # no GNU cp here: from the store, file by file
            materialize(list(files.entries), store, work)
        if not reuse:
            return
        kept = spare.stat_rows(top, want)
    spare.hand_out(os.fspath(work.parent), pool, kept)


def reuses_trees(files: Manifest) -> bool:
    """Whether a tree of `files` is worth keeping for the next job (a small one is quicker to copy anew
    than to check file by file, and its job's end then costs one `rm -rf`)."""
    least = os.environ.get("DSTACK_SPARE_MIN_FILES", "")  # tests and benchmarks set their own
    return len(files.entries) >= (int(least) if least.isdigit() else SPARE_MIN_FILES)


HAS_PYTHON = "command -v python3 >/dev/null 2>&1"
SPARE_MIN_FILES = 1000  # trees with fewer files are copied anew for each job and removed after it
MANY_DIGESTS = 500  # from here on the host's python3 checks the cache (a shell loop takes ~40 µs each)


def missing_objects(conn: Connection, root: str, digests: Iterable[str]) -> set[str]:
    """The digests the host's object cache lacks, in one remote command (dstack.ssh.transfer's, sped up)."""
    import shlex

    from dstack.ssh import transfer

    wanted = sorted(set(digests))
    if len(wanted) < MANY_DIGESTS:
        return transfer.missing_objects(conn, root, wanted)
    objects = shlex.quote(f"{root}/objects")
    check = f"{_python()} missing {objects}"
    out = conn.run(
        f"mkdir -p {objects} && if {HAS_PYTHON}; then {check}; else echo no-python3; fi",
        input="\n".join(wanted) + "\n",
    ).stdout.split()
    if out == ["no-python3"]:
        return transfer.missing_objects(conn, root, wanted)
    return set(out)


def place_tree(entries: Iterable[ManifestEntry], under: str = "") -> list[tuple[str, ManifestEntry]]:
    """`dstack.ssh.transfer.place(entries, under)`, at string speed for the plain paths of a repo state."""
    from dstack.ssh import transfer

    prefix = f"{under}/" if under else ""
    placed = []
    for e in entries:
        path = e.path
        parts = path.split("/")
        if "\\" in path or "\0" in path or "" in parts or "." in parts or ".." in parts:
            placed += transfer.place([e], under)  # refused there, or made plain
        else:
            placed.append((prefix + path, e))
    return placed


def remote_checkout(root: str, job_dir: str, pool: str) -> str:
    """The host's command that lays out JOB_DIR/work from the records on its stdin: a spare tree of
    `pool` brought up to date by diff where python3 is there, else every file from the object cache."""
    import shlex

    from dstack.ssh.transfer import materialize_command

    args = " ".join(shlex.quote(a) for a in ("checkout", f"{root}/objects", pool, job_dir))
    sh = materialize_command(root, f"{job_dir}/work", use_python=False)
    return f"if {HAS_PYTHON}; then {_python()} {args}; else {sh}; fi"


def remote_recycle(job_dir: str, job_id: str) -> str:
    """The host's command that hands the job's work/ back to its pool of spares, or removes it."""
    import shlex

    q = shlex.quote(job_dir)
    py = f"{_python()} recycle {q} {shlex.quote(job_id)}"
    return f"if [ -f {q}/{spare.RECORD} ] && {HAS_PYTHON}; then {py}; else rm -rf {q}/work; fi"


def recycle_many(job_dirs: list[str]) -> str:
    """`remote_recycle` of several job folders in one shell line (the spare code written once)."""
    import shlex

    dirs = " ".join(shlex.quote(d) for d in job_dirs)
    py = f'{_python()} recycle "$d" "${{d##*/}}"'
    return (
        f'for d in {dirs}; do if [ -f "$d"/{shlex.quote(spare.RECORD)} ] && {HAS_PYTHON}; then {py}; '
        'else rm -rf -- "$d/work"; fi; done 2>/dev/null'
    )


@functools.cache
def _python() -> str:
    """`python3 -c SOURCE` of dstack.backends.spare, isolated and without site (a faster start)."""
    import shlex

    return f"python3 -I -S -c {shlex.quote(Path(spare.__file__).read_text())}"


def _copy(tree: Path, work: Path, only: list[str] | None) -> bool:
    """Copy the pristine tree (or its files `only`) into `work` with cp; False where cp can't (not GNU)."""
    work.mkdir(parents=True, exist_ok=True)
    if only is None:
        argvs = [["cp", "-R", "--reflink=auto", f"{tree}/.", os.fspath(work)]]
    else:
        step = 2000  # paths per cp, well under the argument limit
        argvs = [
            ["cp", "--parents", "--reflink=auto", "-P", "-t", os.fspath(work), "--", *only[i : i + step]]
            for i in range(0, len(only), step)
        ]
    for argv in argvs:
        if subprocess.run(argv, cwd=tree, capture_output=True).returncode != 0:
            return False
    return True


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
    if had == want:
        return
    record.unlink(missing_ok=True)  # while the tree changes it has no record: a crash means a rebuild
    for path in had.keys() - want.keys():
        _remove(tree, path)
    changed = [e for e in files.entries if had.get(e.path) != want[e.path]]
    for e in changed:
        if e.path in had:
            _remove(tree, e.path)
    tree.mkdir(parents=True, exist_ok=True)
    if changed:
        try:
            materialize(changed, store, tree)
        except Exception:
            shutil.rmtree(tree, ignore_errors=True)  # e.g. a file became a folder: start clean next time
            raise
    _write_json(record, want)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


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
