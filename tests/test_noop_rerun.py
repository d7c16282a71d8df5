"""A re-run with the same inputs records its run from the remembered plan; any change still re-runs
exactly what depends on it (the plan is only a shortcut: the runs it records equal the long way's)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import dstack, git, write

PIPELINE = """\
workflows:
  - name: prep
    depends-on:
      repo:
        include: [data.csv]
    commands: ["mkdir -p d", "cp data.csv d/rows.csv", "echo prepping"]
    artifacts: [d]
  - name: train
    depends-on: [prep]
    commands: ["mkdir -p m", "echo $lr > m/out", "echo training lr=$lr"]
    artifacts: [m]
"""
VARIABLES = "variables:\n  train:\n    lr: 0.1\n"
FILES = {
    ".dstack/workflows.yaml": PIPELINE,
    ".dstack/variables.yaml": VARIABLES,
    "data.csv": "a,b\n1,2\n",
    "notes.md": "hello\n",
}


def plans(home: Path) -> dict[str, dict]:
    """The remembered plans by fingerprint, each with its `used_at`."""
    path = home / "cache" / "plans.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT fingerprint, plan, used_at FROM plans").fetchall()
    db.close()
    return {fp: {**json.loads(plan), "used_at": used} for fp, plan, used in rows}


def last_statuses(repo: Path) -> dict[str, str]:
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    return {j["name"]: j["status"] for j in run["jobs"]}


def recorded_runs() -> list[tuple[object, list[object]]]:
    """Each run as recorded (newest first), without what differs between any two runs (ids, names, times)."""
    from dstack.store.state import open_state

    out = []
    with open_state() as state:
        for run in state.runs(limit=None):
            r = {
                k: v for k, v in run.__dict__.items() if k not in ("id", "name", "created_at", "finished_at")
            }
            jobs = [
                {
                    k: j.__dict__[k]
                    for k in ("workflow", "status", "key", "spec_data", "manifest", "reused_from")
                }
                for j in state.jobs(run.id)
            ]
            out.append((r, jobs))
    return out


def test_a_noop_rerun_records_the_same_run_from_the_remembered_plan(make_repo, dstack_home):
    repo = make_repo(FILES)
    write(repo, "notes.md", "an uncommitted change\n")
    write(repo, "scratch.txt", "untracked\n")
    time.sleep(2.1)  # older than the racy window: the plan trusts every file's stat
    dstack("run", "train", cwd=repo)
    [remembered] = plans(dstack_home).values()
    assert remembered["recent"] == {}
    res = dstack("run", "train", cwd=repo)
    assert "All jobs reused" in res.err
    [used] = plans(dstack_home).values()
    assert used["used_at"] > remembered["used_at"]  # the plan did it
    (dstack_home / "cache" / "plans.sqlite").unlink()
    res = dstack("run", "train", cwd=repo)  # the long way, for comparison
    assert "All jobs reused" in res.err
    long_way, from_plan, first = recorded_runs()
    assert from_plan == long_way
    assert from_plan[0]["untracked"] == ["scratch.txt"] and "an uncommitted change" in from_plan[0]["diff"]
    assert [j["status"] for j in first[1]] == ["done", "done"]


def _same_size_same_mtime(repo: Path) -> None:
    path = repo / "data.csv"
    st = path.stat()
    path.write_text("a,b\n3,4\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _staged(repo: Path) -> None:
    write(repo, "notes.md", "staged\n")
    git(repo, "add", "notes.md")


def _deleted(repo: Path) -> None:
    (repo / "notes.md").unlink()


def _executable(repo: Path) -> None:
    (repo / "notes.md").chmod(0o755)


CHANGES: dict[str, tuple[Callable[[Path], object], list[str], dict[str, str]]] = {
    # change -> (what it does, extra `dstack run train` arguments, the statuses of prep and train after)
    "prep's input, same size and mtime": (_same_size_same_mtime, [], {"prep": "done", "train": "done"}),
    "an unstaged change": (
        lambda r: write(r, "notes.md", "changed\n"),
        [],
        {"prep": "reused", "train": "done"},
    ),
    "a staged change": (_staged, [], {"prep": "reused", "train": "done"}),
    "a new untracked file": (lambda r: write(r, "new.txt", "x\n"), [], {"prep": "reused", "train": "done"}),
    "a deleted file": (_deleted, [], {"prep": "reused", "train": "done"}),
    "a file made executable": (_executable, [], {"prep": "reused", "train": "done"}),
    "a variable on the command line": (lambda r: None, ["--lr", "0.2"], {"prep": "reused", "train": "done"}),
    "a variable's default": (
        lambda r: write(r, ".dstack/variables.yaml", VARIABLES.replace("0.1", "0.3")),
        [],
        {"prep": "reused", "train": "done"},
    ),
    "the upstream's commands": (
        lambda r: write(r, ".dstack/workflows.yaml", PIPELINE.replace("echo prepping", "echo prepping!")),
        [],
        {"prep": "done", "train": "done"},
    ),
    "an ignored file": (
        lambda r: (
            write(r, ".gitignore", "*.log\n"),
            git(r, "add", ".gitignore"),
            git(r, "commit", "-qm", "i"),
        ),
        [],
        {"prep": "reused", "train": "done"},
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_change_reruns_exactly_what_depends_on_it(make_repo, dstack_home, change):
    repo = make_repo(FILES)
    apply, args, after = CHANGES[change]
    dstack("run", "train", cwd=repo)
    [remembered] = plans(dstack_home).values()
    assert "All jobs reused" in dstack("run", "train", cwd=repo).err
    assert max(p["used_at"] for p in plans(dstack_home).values()) > remembered["used_at"]  # from the plan
    apply(repo)
    dstack("run", "train", *args, cwd=repo)
    assert last_statuses(repo) == after
    assert "All jobs reused" in dstack("run", "train", *args, cwd=repo).err


def test_a_new_commit_is_recorded_though_nothing_runs(make_repo):
    repo = make_repo(FILES)
    dstack("run", "train", cwd=repo)
    write(repo, "notes.md", "committed\n")
    dstack("run", "train", cwd=repo)
    git(repo, "commit", "-qam", "notes")  # same files, a new HEAD
    assert "All jobs reused" in dstack("run", "train", cwd=repo).err
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    assert run["commit"] == git(repo, "rev-parse", "HEAD").strip()


def test_a_recent_file_is_checked_by_content(make_repo, dstack_home):
    """A file changed within the racy window is trusted by content only: a plan whose digest of it
    disagrees is not used (and is worked out and remembered again)."""
    repo = make_repo(FILES)
    dstack("run", "train", cwd=repo)
    [(fp, plan)] = plans(dstack_home).items()
    data = str(repo.resolve() / "data.csv")
    assert data in plan["recent"]
    plan["recent"][data] = "0" * 64  # as if data.csv had changed within its timestamp's tick
    del plan["used_at"]
    with sqlite3.connect(dstack_home / "cache" / "plans.sqlite") as db:
        db.execute("UPDATE plans SET plan = ? WHERE fingerprint = ?", (json.dumps(plan), fp))
    db.close()
    assert "All jobs reused" in dstack("run", "train", cwd=repo).err
    assert plans(dstack_home)[fp]["recent"].get(data) != "0" * 64  # the long way, remembered anew


TAGGED = """\
workflows:
  - name: prep
    depends-on:
      repo:
        include: [data.csv]
    commands: ["mkdir -p d", "cp data.csv d/rows.csv"]
    artifacts: [d]
  - name: use
    depends-on: ["prep:latest"]
    commands: ["cat d/rows.csv", "mkdir -p u", "cp d/rows.csv u/"]
    artifacts: [u]
"""


def test_a_moved_tag_is_read_again(make_repo):
    repo = make_repo({".dstack/workflows.yaml": TAGGED, "data.csv": "a\n1\n"})
    dstack("run", "prep", cwd=repo)
    first = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    dstack("tags", "add", "latest", first["name"], cwd=repo)
    dstack("run", "use", cwd=repo)
    assert "All jobs reused" in dstack("run", "use", cwd=repo).err
    write(repo, "data.csv", "a\n2\n")
    dstack("run", "prep", cwd=repo)
    second = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    dstack("tags", "add", "latest", second["name"], "--force", cwd=repo)
    res = dstack("run", "use", cwd=repo)
    assert "2" in res.out.split()  # ran with the new tag's artifacts
    assert last_statuses(repo) == {"use": "done"}


def test_an_unreadable_plan_cache_only_costs_time(make_repo, dstack_home):
    repo = make_repo(FILES)
    dstack("run", "train", cwd=repo)
    cache = dstack_home / "cache" / "plans.sqlite"
    for leftover in cache.parent.glob("plans.sqlite-*"):
        leftover.unlink()
    cache.write_bytes(b"not a database" * 100)
    assert "All jobs reused" in dstack("run", "train", cwd=repo).err
