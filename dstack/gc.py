"""Deleting runs, and collecting what no kept run needs: objects, manifests, kept work dirs, old venvs.

Safety alongside running jobs is a grace period plus freshening, as in git: nothing written (or, in the
local store, found already there by a save) within `DSTACK_GC_GRACE_S` seconds (default an hour) is
collected, manifests that young count as roots, and manifests written while gc runs are read again just
before anything is deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.errors import NotFoundError, RunError, UsageError

if TYPE_CHECKING:
    from dstack.store.objects import ObjectStore, StoredItem
    from dstack.store.state import Run, State

GRACE_ENV = "DSTACK_GC_GRACE_S"
DEFAULT_GRACE_S = 3600.0
UNUSED_ENV = "DSTACK_GC_UNUSED_DAYS"
DEFAULT_UNUSED_DAYS = 30.0
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str, option: str = "--older-than") -> float:
    """Seconds in an age like `30d`, `12h`, `90m`, `2w`; UsageError naming `option` otherwise."""
    m = _AGE.match(text.strip())
    if not m:
        raise UsageError(f"{option}: can't read {text!r} as an age", hint="use e.g. 30d, 12h, 90m or 2w")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _seconds_from_env(name: str, default: float, scale: float = 1.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default * scale
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number", hint="unset it or give a number") from None
    if value < 0:
        raise UsageError(f"{name}={raw!r} is negative", hint="give 0 or more")
    return value * scale


def grace_s() -> float:
    """How young an object or manifest must be for gc to spare it unread (`DSTACK_GC_GRACE_S`)."""
    return _seconds_from_env(GRACE_ENV, DEFAULT_GRACE_S)


# -- deleting runs ---------------------------------------------------------------------------------


@dataclass
class Pruned:
    """What `prune_runs` did: runs deleted, and runs it left with why."""

    deleted: list[Run] = field(default_factory=list)
    skipped: list[tuple[Run, str]] = field(default_factory=list)


def _refusal(state: State, run: Run, force: bool) -> str | None:
    from dstack.store.state import ACTIVE_RUN

    if run.status in ACTIVE_RUN:
        return f"it is {run.status} (stop it first: `dstack stop {run.name}`)"
    tags = state.run_tag_names(run.id)
    if tags and not force:
        return f"it is tagged {', '.join(tags)} (pass --force to delete it and its tags)"
    return None


def _delete(state: State, runs: list[Run]) -> None:
    tags = [t for r in runs for t in state.run_tag_names(r.id)]
    if tags:
        from dstack.shared_tags import unpublish_tag
        from dstack.store import open_object_store

        store = open_object_store(state)
        for tag in tags:
            unpublish_tag(store, tag)
    state.mark_runs_deleted([r.id for r in runs])


def delete_runs(state: State, refs: list[str], force: bool = False) -> list[Run]:
    """Mark the runs deleted (all or none): rows stay for lineage, artifacts are no longer kept for them."""
    runs: dict[str, Run] = {}
    for ref in refs:
        run = state.run(ref)
        why = _refusal(state, run, force)
        if why:
            raise RunError(f"can't delete run {run.name}: {why}")
        runs[run.id] = run
    todo = [r for r in runs.values() if r.deleted_at is None]
    _delete(state, todo)
    return list(runs.values())


def prune_runs(
    state: State, older_than_s: float, workflow: str | None = None, force: bool = False, dry_run: bool = False
) -> Pruned:
    """Delete kept runs created more than `older_than_s` ago (of `workflow`), skipping active/tagged ones."""
    result = Pruned()
    for run in state.runs_older_than(time.time() - older_than_s, workflow):
        why = _refusal(state, run, force)
        if why:
            result.skipped.append((run, why))
        else:
            result.deleted.append(run)
    if not dry_run:
        _delete(state, result.deleted)
    return result


def check_not_deleted(run: Run) -> None:
    """NotFoundError if the run was deleted (its artifacts may be gone)."""
    if run.deleted_at is not None:
        raise NotFoundError(
            f"run {run.name} was deleted {time.strftime('%Y-%m-%d %H:%M', time.localtime(run.deleted_at))}; "
            "its artifacts are no longer kept"
        )


# -- collecting --------------------------------------------------------------------------------------


@dataclass
class Freed:
    """One kind of thing gc removed (or would remove): how many and how many bytes."""

    what: str
    count: int = 0
    bytes: int = 0


@dataclass
class Collection:
    """What `collect` did (or, with `dry_run`, would do)."""

    store: str
    dry_run: bool
    shared: bool  # S3: every manifest in the bucket protects its objects
    grace_s: float
    freed: list[Freed] = field(default_factory=list)
    spared_young: int = 0  # unreferenced objects younger than the grace period
    kept_objects: int = 0
    kept_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.freed)


def _read_references(store: ObjectStore, names: Iterable[str]) -> set[str]:
    """The digests the named manifests reference (missing manifests skipped, corrupt ones fatal)."""
    from dstack.errors import NotFoundError as Missing

    def read(name: str) -> list[str]:
        try:
            return [e.digest for e in store.get_manifest(name).entries]
        except Missing:
            return []

    refs: set[str] = set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for digests in pool.map(read, sorted(set(names))):
            refs.update(digests)
    return refs


def _shared_tag_manifests(store: ObjectStore) -> set[str]:
    """Manifests that tag records in the store name (a colleague's tags)."""
    import json

    names: set[str] = set()
    for key in store.list_meta("tags/"):
        raw = store.get_meta(key)
        try:
            record = json.loads(raw or b"{}")
            names.update(j["manifest"] for j in record.get("jobs", []) if j.get("manifest"))
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # an unreadable tag record protects nothing it can't name
    return names


def _is_doomed(m: StoredItem, state_kept: set[str], deleted_jobs: set[str], shared: bool) -> bool:
    """Whether manifest `m` (older than the grace period) is garbage."""
    if m.name in state_kept:
        return False
    if not shared:
        return True
    parts = m.name.split("/")  # in a shared bucket only this machine's deleted jobs' manifests go
    return len(parts) >= 2 and parts[0] == "jobs" and parts[1] in deleted_jobs


def collect(
    state: State, store: ObjectStore, dry_run: bool = False, grace: float | None = None
) -> Collection:
    """Remove the objects and manifests no kept run or tag references, plus local leftovers."""
    grace = grace_s() if grace is None else grace
    started = time.time()
    cutoff = started - grace
    shared = store.url.startswith("s3://")
    result = Collection(store.url, dry_run, shared, grace)
    state_kept = state.kept_manifest_names()
    tag_kept = _shared_tag_manifests(store) if shared else set()
    deleted_jobs = state.deleted_job_ids() if shared else set()
    manifests = list(store.list_manifests())
    doomed = [
        m
        for m in manifests
        if m.mtime < cutoff and m.name not in tag_kept and _is_doomed(m, state_kept, deleted_jobs, shared)
    ]
    doomed_names = {m.name for m in doomed}
    refs = _read_references(store, (m.name for m in manifests if m.name not in doomed_names))
    candidates: dict[str, StoredItem] = {}
    for o in store.list_objects():
        if o.name in refs:
            result.kept_objects += 1
            result.kept_bytes += o.size
        elif o.mtime >= cutoff:
            result.spared_young += 1
        else:
            candidates[o.name] = o
    if not dry_run:
        # runs created since the sweep began: the manifests written meanwhile, and the old ones a new run
        # names again (a code snapshot of the same files), are needed with everything they reference
        seen = {m.name for m in manifests}
        revived = doomed_names & state.kept_manifest_names()
        doomed = [m for m in doomed if m.name not in revived]
        doomed_names -= revived
        late = [m.name for m in store.list_manifests() if m.name not in seen]
        for digest in _read_references(store, [*late, *revived]):
            candidates.pop(digest, None)
        if candidates:
            _forget_stored(store.url)  # first, so a save starting now asks the store again
        store.delete_manifests(sorted(doomed_names))
        deleted = set(store.delete_objects(sorted(candidates), written_before=cutoff))
        candidates = {d: o for d, o in candidates.items() if d in deleted}
    result.freed.append(Freed("objects", len(candidates), sum(o.size for o in candidates.values())))
    result.freed.append(Freed("manifests", len(doomed), sum(m.size for m in doomed)))
    if not dry_run:
        count, size = store.clean_tmp(cutoff)
        result.freed.append(Freed("unfinished uploads", count, size))
    result.freed += _collect_local_dirs(state, dry_run, started)
    return result


def _forget_stored(url: str) -> None:
    """The digest cache's "already in the store" shortcut must not name what gc removed."""
    from dstack.home import sub
    from dstack.store.digests import DigestCache

    with DigestCache(sub("cache") / "digests.sqlite") as cache:
        cache.forget_store(url)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path, dry_run: bool, freed: Freed) -> None:
    freed.count += 1
    freed.bytes += _tree_size(path)
    if not dry_run:
        shutil.rmtree(path, ignore_errors=True)


def _venv_last_use(venv: Path) -> float:
    """When a cached venv was last used: Python reads pyvenv.cfg at every start (atime, relatime)."""
    times = []
    for p in (venv, venv / ".ready", venv / "pyvenv.cfg"):
        try:
            st = os.stat(p)
        except OSError:
            continue
        times += [st.st_mtime, st.st_atime if p.name == "pyvenv.cfg" else st.st_mtime]
    return max(times, default=0.0)


def _collect_local_dirs(state: State, dry_run: bool, now: float) -> list[Freed]:
    """Working dirs of finished jobs (`--keep`) of deleted runs or unused for N days, and old venvs."""
    from dstack.home import home
    from dstack.store.state import ACTIVE_JOB

    unused_before = now - _seconds_from_env(UNUSED_ENV, DEFAULT_UNUSED_DAYS, 86400)
    work = Freed("working directories")
    venvs = Freed("cached venvs")
    owners = state.job_dir_owners()
    jobs_root = home() / "jobs"
    if jobs_root.is_dir():
        for jd in sorted(jobs_root.iterdir()):
            owner = owners.get(jd.name)
            if owner is None or owner[0] in ACTIVE_JOB or not (jd / "work").is_dir():
                continue
            status, finished_at, deleted = owner
            if deleted or (finished_at or now) < unused_before:
                _remove(jd / "work", dry_run, work)
    venv_root = home() / "venvs"
    if venv_root.is_dir():
        import fcntl

        for venv in sorted(p for p in venv_root.iterdir() if p.is_dir()):
            if _venv_last_use(venv) >= unused_before:
                continue
            with open(f"{venv}.lock", "a") as lock:  # the lock a job takes while it builds the venv
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                _remove(venv, dry_run, venvs)
            if not dry_run:
                Path(f"{venv}.lock").unlink(missing_ok=True)
    return [work, venvs]
