"""Spare working trees: a finished job's work/ kept, to be brought up to date by diff for the next job.

A tree is handed out with a record of each file's digest, mode and stat (inode, size, mtime, ctime). Before a
spare is used again, every file whose stat differs (written into in place, replaced, chmod-ed), that the
record lacks (a job's output) or that the next job does not want is removed, and only what is then missing
is written. A tree whose job left a process behind is never kept. Standard library only: the same code runs
on this machine (dstack.backends.checkout) and, sent as `python3 -c`, on SSH hosts (`main`).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

MAX_SPARES = 4  # spare trees kept per repo and include list
RECORD = (
    "checkout.json"  # in the job's directory: the pool its work/ belongs to, and what it was handed out as
)

Want = dict  # path -> (digest, mode)
Rows = dict  # path -> [digest, mode, inode, size, mtime_ns, ctime_ns]


def take(pool: str, work: str) -> Rows | None:
    """Move a spare tree of `pool` to `work` (which must not exist): its record, or None if there is none."""
    import fcntl

    try:
        names = [n for n in os.listdir(pool) if not n.endswith((".json", ".lock", ".tmp"))]
    except FileNotFoundError:
        return None
    with open(pool + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two jobs never take the same spare
        for name in names:
            tree, record = os.path.join(pool, name), os.path.join(pool, name + ".json")
            if not os.path.isdir(tree):
                continue
            try:
                with open(record) as f:
                    rows = json.load(f)["files"]
                os.unlink(record)
            except (OSError, ValueError, KeyError, TypeError):
                shutil.rmtree(tree, ignore_errors=True)  # no record: no way to trust it
                continue
            os.makedirs(os.path.dirname(work), exist_ok=True)
            os.replace(tree, work)
            return rows  # type: ignore[no-any-return]
    return None


def sweep(work: str, want: Want, had: Rows) -> Rows:
    """Remove from the tree at `work` whatever is not as it was handed out and wanted as it is (folders no
    wanted file is in included); the rows of the files kept. Folders get the default mode back."""
    dirs = {""}
    for path in want:
        parent = path.rpartition("/")[0]
        while parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    mode = 0o777 & ~_umask()
    kept: Rows = {}
    stack = [""]
    folders = []
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(work, rel) if rel else work) as it:
            for entry in it:
                path = rel + "/" + entry.name if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(path)
                    folders.append((path, entry))
                    continue
                st = entry.stat(follow_symlinks=False)
                w, row = want.get(path), had.get(path)
                if w is not None and row == [w[0], w[1], *_stat_row(st)]:
                    kept[path] = row
                else:
                    os.unlink(entry.path)
    for path, entry in reversed(folders):  # deepest first: emptied above
        if path not in dirs:
            os.rmdir(entry.path)
        elif stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) != mode:
            os.chmod(entry.path, mode)
    return kept


def stat_rows(work: str, want: Want) -> Rows:
    """The record of `want`'s files as they are under `work` now."""
    rows: Rows = {}
    for path, (digest, mode) in want.items():
        rows[path] = [digest, mode, *_stat_row(os.lstat(os.path.join(work, path)))]
    return rows


def hand_out(job_dir: str, pool: str, rows: Rows) -> None:
    """Record how the job's work/ was handed out (the pool it goes back to, each file's row)."""
    _write_json(os.path.join(job_dir, RECORD), {"pool": pool, "files": rows})


def recycle(job_dir: str, job_id: str) -> bool:
    """Hand the job's work/ back to its pool: False (nothing moved) when it has no record, a process of
    the job is left, or the pool is full."""
    try:
        with open(os.path.join(job_dir, RECORD)) as f:
            pool = json.load(f)["pool"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    work = os.path.join(job_dir, "work")
    if not os.path.isdir(work) or job_lives(job_id):
        return False
    os.makedirs(pool, exist_ok=True)
    if sum(1 for n in os.listdir(pool) if os.path.isdir(os.path.join(pool, n))) >= MAX_SPARES:
        return False
    name = os.urandom(16).hex()
    try:
        os.replace(os.path.join(job_dir, RECORD), os.path.join(pool, name + ".json"))
        os.replace(work, os.path.join(pool, name))
    except OSError:
        _unlink(os.path.join(pool, name + ".json"))
        return False
    return True


def job_lives(job_id: str) -> bool:
    """Whether a process of the job is left: its cgroup is there, or a process's environment names it."""
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.isdir(os.path.join(root, "dstack", job_id)):
            return True
    mark = ("DSTACK_JOB=" + job_id).encode()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        return True
            except OSError:
                continue
    return False


def discard(work: str) -> None:
    """Remove a tree that can't be trusted (moved aside first: what can't be deleted stays out of `work`)."""
    aside = f"{work}.discarded-{os.urandom(8).hex()}"
    try:
        os.replace(work, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def lay_out(objects: str, work: str, want: Want) -> None:
    """Write `want`'s files under `work` from the object cache `objects` (copies; never outside `work`)."""
    base = os.path.realpath(work)
    made = set()
    for path, (digest, mode) in want.items():
        dest = os.path.join(base, path)
        parent = os.path.dirname(dest)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            real = os.path.realpath(parent)
            if real != base and not real.startswith(base + os.sep):
                sys.exit(f"dstack: {path} would be written outside {base}")
            made.add(parent)
        src = os.path.join(objects, digest)
        if os.path.lexists(dest) and not os.path.isdir(dest):
            os.unlink(dest)
        if mode & 0o170000 == 0o120000:
            with open(src, "rb") as f:
                os.symlink(f.read(), dest)
        else:
            shutil.copyfile(src, dest)
            os.chmod(dest, mode & 0o755)  # no setuid/setgid/sticky, no group/other write


def main(argv: list[str]) -> None:
    """On a host: `checkout OBJECTS POOL JOB_DIR` (records `<digest> <octal mode> <path>\\0` on stdin) lays
    out JOB_DIR/work from a spare or the cache; `recycle JOB_DIR JOB_ID` hands it back; `missing OBJECTS`
    prints which digests on stdin the cache lacks."""
    if argv[0] == "missing":  # the digests on stdin that the object cache lacks
        lacks = [d for d in sys.stdin.read().split() if not os.path.exists(os.path.join(argv[1], d))]
        sys.stdout.write("".join(d + "\n" for d in lacks))
        return
    if argv[0] == "recycle":
        if not recycle(argv[1], argv[2]):
            shutil.rmtree(os.path.join(argv[1], "work"), ignore_errors=True)
            _unlink(os.path.join(argv[1], RECORD))
        return
    objects, pool, job_dir = argv[1:4]
    want: Want = {}
    for rec in sys.stdin.buffer.read().split(b"\0"):
        if rec:
            digest, mode, path = rec.decode("utf-8", "surrogateescape").split(" ", 2)
            want[path] = (digest, int(mode, 8))
    work = os.path.join(job_dir, "work")
    had = take(pool, work)
    kept: Rows = {}
    if had is not None:
        try:
            kept = sweep(work, want, had)
        except OSError:  # a tree the job left in a state we can't mend: laid out afresh
            discard(work)
            kept = {}
    missing = {p: w for p, w in want.items() if p not in kept}
    lay_out(objects, work, missing)
    kept.update(stat_rows(work, missing))
    hand_out(job_dir, pool, kept)


def _stat_row(st: os.stat_result) -> list[int]:
    """What tells a file changed since it was handed out (ctime: no job can set it back)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _write_json(path: str, data: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(data, separators=(",", ":")))  # json.dump encodes in Python: far slower
    os.replace(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _umask() -> int:
    """This process's umask, read without changing it (other threads may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


if __name__ == "__main__":
    main(sys.argv[1:])
