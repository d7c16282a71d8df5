"""Deleting and pruning runs (issue 19), through the real CLI and a real SQLite state."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from helpers import dstack

WORKFLOWS = """\
workflows:
  - name: prepare
    commands: ["mkdir -p data", "echo rows > data/set.txt"]
    artifacts: [data]
  - name: train
    depends-on: [prepare]
    commands: ["mkdir -p model", "echo $RANDOM-$$ > model/w.txt"]
    artifacts: [model]
  - name: slow
    commands: ["sleep 30"]
"""


def runs_json(repo: Path, *extra: str) -> list[dict]:
    return json.loads(dstack("runs", "--json", *extra, cwd=repo).out)


def run(repo: Path, *args: str) -> str:
    dstack("run", *args, cwd=repo)
    return str(runs_json(repo)[0]["name"])


def test_delete_hides_refuses_downloads_and_keeps_lineage(make_repo, tmp_path):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    first = run(repo, "prepare")
    kept = run(repo, "train")  # reuses `prepare` from the first run
    tagged = run(repo, "prepare", "--force")
    dstack("tags", "add", "best", tagged, cwd=repo)

    res = dstack("runs", "delete", first, cwd=repo)
    assert f"Deleted 1 run(s): {first}" in res.err
    assert [r["name"] for r in runs_json(repo)] == [tagged, kept]
    listed = {r["name"]: r for r in runs_json(repo, "--all")}
    assert listed[first]["deleted_at"] is not None and listed[kept]["deleted_at"] is None
    assert first in dstack("runs", "--all", cwd=repo).out

    # downloading a deleted run's artifacts: one line saying so
    res = dstack("artifacts", "download", first, "-o", str(tmp_path / "x"), cwd=repo, check=False)
    assert res.code != 0 and "Traceback" not in res.err
    assert f"run {first} was deleted" in res.err and len(res.err.strip().splitlines()) == 1

    # the kept run still names the deleted one in its lineage and still downloads its reused artifact
    lineage = json.loads(dstack("lineage", kept, "--json", cwd=repo).out)
    assert first in json.dumps(lineage)
    dstack("artifacts", "download", kept, "-o", str(tmp_path / "kept"), cwd=repo)
    assert (tmp_path / "kept/data/set.txt").read_text() == "rows\n"

    # tagged: refused without --force, deleted (with its tag) with it
    res = dstack("runs", "delete", tagged, cwd=repo, check=False)
    assert res.code != 0 and f"can't delete run {tagged}: it is tagged best" in res.err
    assert "--force" in res.err
    dstack("runs", "delete", tagged, "--force", cwd=repo)
    assert json.loads(dstack("tags", "list", "--json", cwd=repo).out) == []
    assert [r["name"] for r in runs_json(repo)] == [kept]

    # a new run no longer reuses a deleted run's job: it runs `prepare` again
    again = dstack("run", "prepare", cwd=repo)
    assert "reused" not in again.err


def test_active_runs_are_refused(make_repo):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    dstack("run", "slow", "-d", cwd=repo)
    name = runs_json(repo)[0]["name"]
    try:
        res = dstack("runs", "delete", name, cwd=repo, check=False)
        assert res.code != 0 and "stop it first" in res.err and "Traceback" not in res.err
        pruned = json.loads(dstack("runs", "prune", "--older-than", "0s", "--json", cwd=repo).out)
        assert pruned["deleted"] == [] and pruned["skipped"][0]["name"] == name
    finally:
        dstack("stop", name, cwd=repo)


def test_prune_by_age_and_workflow(make_repo, dstack_home):
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    old = run(repo, "prepare")
    old_train = run(repo, "train")
    new = run(repo, "prepare", "--force")
    dstack("tags", "add", "keep", old, cwd=repo)
    with sqlite3.connect(dstack_home / "state.sqlite") as db:  # make two runs 40 days old
        db.execute(
            "UPDATE runs SET created_at = ? WHERE name IN (?, ?)", (time.time() - 40 * 86400, old, old_train)
        )
    db.close()

    bad = dstack("runs", "prune", "--older-than", "a month", cwd=repo, check=False)
    assert bad.code != 0 and "--older-than: can't read 'a month' as an age" in bad.err

    dry = json.loads(dstack("runs", "prune", "--older-than", "30d", "--dry-run", "--json", cwd=repo).out)
    assert dry["deleted"] == [old_train] and [s["name"] for s in dry["skipped"]] == [old]
    assert len(runs_json(repo)) == 3

    res = dstack("runs", "prune", "--older-than", "30d", "--workflow", "prepare", cwd=repo)
    assert "Deleted 0 run(s)" in res.err and f"Kept {old}: it is tagged keep" in res.err
    res = dstack("runs", "prune", "--older-than", "30d", cwd=repo)
    assert "Deleted 1 run(s)" in res.err
    assert {r["name"] for r in runs_json(repo)} == {old, new}
    dstack("runs", "prune", "--older-than", "30d", "--force", cwd=repo)
    assert [r["name"] for r in runs_json(repo)] == [new]
