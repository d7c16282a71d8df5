"""`dstack watch W`: run W whenever the files it reads change on disk (polled, debounced), stopping the
previous run first if it is still going."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dstack.errors import RepoError, RunError
from dstack.repo import is_included
from dstack.store.state import ACTIVE_RUN, State
from dstack.triggers.model import Trigger

DEBOUNCE_S = float(os.environ.get("DSTACK_WATCH_DEBOUNCE_S", "0.5"))
POLL_S = 0.2
Stats = dict[str, tuple[int, int, int]]  # each watched file's mtime, size and inode


@dataclass
class WatchEvent:
    """What the watcher did: "watching", "stopped" (a previous run), "started", "skipped" or "failed"."""

    kind: str
    text: str
    run_name: str | None = None


def watched_include(cwd: Path, workflow: str) -> tuple[Path, list[str] | None]:
    """The project root and the globs whose files W reads: its repo triggers', its `repo: include`, or all."""
    from dstack.triggers.model import parse_triggers
    from dstack.workflows import load_project

    project = load_project(cwd)
    wf = project.workflow(workflow)
    repo = [t for t in parse_triggers(workflow, wf.triggers or [], wf.file, wf.line) if t.kind == "repo"]
    if repo:
        if any(t.include is None for t in repo):
            return Path(project.root).resolve(), wf.repo_include
        return Path(project.root).resolve(), sorted({g for t in repo for g in t.include or ()})
    return Path(project.root).resolve(), wf.repo_include


def scan(root: Path, include: list[str] | None) -> Stats:
    """Each watched file (tracked or untracked, not ignored) with its mtime, size and inode."""
    proc = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RepoError(f"`git ls-files` failed in {root}: {proc.stderr.decode(errors='replace').strip()}")
    found = {}
    for raw in proc.stdout.split(b"\0"):
        rel = os.fsdecode(raw)
        if not rel or (include and not is_included(rel, include)):
            continue
        try:
            st = os.lstat(root / rel)
        except OSError:
            continue
        found[rel] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return found


def _content_changed(root: Path, before: Stats, now: Stats, digests: dict[str, str]) -> bool:
    """Whether files came or went, or one's bytes differ from when it was last seen changing."""
    import hashlib

    changed = before.keys() != now.keys()
    for rel in now:
        if before.get(rel) == now[rel]:
            continue
        try:
            digest = hashlib.blake2b((root / rel).read_bytes(), digest_size=16).hexdigest()
        except OSError:
            digest = ""
        changed = changed or digests.get(rel) != digest
        digests[rel] = digest
    return changed


def watch(state: State, cwd: Path, workflow: str, debounce: float = DEBOUNCE_S) -> Iterator[WatchEvent]:
    """Yield what happens while watching, forever (the caller ends it, e.g. on Ctrl-C)."""
    from dstack.runs import stop_run
    from dstack.triggers.fire import start

    root, include = watched_include(cwd, workflow)
    seen = scan(root, include)
    what = ", ".join(include) if include else "every file of the repo"
    yield WatchEvent("watching", f"{len(seen)} file(s) ({what}) for {workflow}")
    changed_at: float | None = None
    current: str | None = None
    digests: dict[str, str] = {}  # of files seen changing: a touch that keeps the bytes is no change
    while True:
        time.sleep(POLL_S)
        now = scan(root, include)
        if now != seen:
            if _content_changed(root, seen, now, digests):
                changed_at = time.monotonic()
            seen = now
            continue
        if changed_at is None or time.monotonic() - changed_at < debounce:
            continue
        changed_at = None
        if current is not None and state.run(current).status in ACTIVE_RUN:
            try:
                stopped = stop_run(state, current)
                yield WatchEvent("stopped", f"stopped run {stopped.name} (files changed)", stopped.name)
            except RunError:
                pass  # it ended meanwhile
        fire = start(state, root, Trigger(workflow, "repo"), "watch")
        current = fire.run_id
        kind = fire.outcome.split(":")[0]
        yield WatchEvent(kind, fire.outcome, fire.run_name)
