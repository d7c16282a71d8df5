"""Never compute twice, always know where a result came from: reuse, lineage, reproduce, sweeps."""

from __future__ import annotations

import json
from pathlib import Path

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
    commands: ["mkdir -p m", "echo $lr-$batch > m/out", "echo lr=$lr batch=$batch"]
    artifacts: [m]
"""
VARIABLES = "variables:\n  train:\n    lr: 0.1\n    batch: 32\n"


def repo_with_pipeline(make_repo) -> Path:
    return make_repo(
        {
            ".dstack/workflows.yaml": PIPELINE,
            ".dstack/variables.yaml": VARIABLES,
            "data.csv": "a,b\n1,2\n",
            "notes.md": "hello\n",
        }
    )


def last_run(repo: Path) -> dict:
    return json.loads(dstack("runs", "--json", cwd=repo).out)[0]


def test_reuse_follows_the_files_a_job_depends_on(make_repo):
    repo = repo_with_pipeline(make_repo)
    dstack("run", "train", cwd=repo)
    write(repo, "notes.md", "changed, but prep only depends on data.csv\n")
    res = dstack("run", "prep", cwd=repo)
    assert "All jobs reused" in res.err
    write(repo, "data.csv", "a,b\n3,4\n")
    res = dstack("run", "prep", cwd=repo)
    assert "prepping" in res.out


def test_sweep_runs_the_grid_with_shared_upstream_once(make_repo):
    repo = repo_with_pipeline(make_repo)
    res = dstack("run", "train", "--lr", "0.1,0.01", "--batch", "32,64", cwd=repo)
    assert res.out.count("prepping") == 1
    for combo in ("lr=0.1 batch=32", "lr=0.1 batch=64", "lr=0.01 batch=32", "lr=0.01 batch=64"):
        assert combo in res.out
    run = last_run(repo)
    assert [j["name"] for j in run["jobs"]].count("train") == 4
    sweep = json.loads(dstack("runs", "--sweep", run["name"], "--json", cwd=repo).out)
    assert sorted((j["variables"]["lr"], j["variables"]["batch"]) for j in sweep) == [
        ("0.01", "32"),
        ("0.01", "64"),
        ("0.1", "32"),
        ("0.1", "64"),
    ]
    assert all(j["status"] == "done" for j in sweep)


def test_lineage_names_commit_diff_variables_and_inputs(make_repo):
    repo = repo_with_pipeline(make_repo)
    write(repo, "data.csv", "a,b\n5,6\n")  # an uncommitted change
    dstack("run", "train", "--lr", "0.3", cwd=repo)
    run = last_run(repo)
    commit = git(repo, "rev-parse", "HEAD").strip()
    [root] = json.loads(dstack("lineage", run["name"], "--json", cwd=repo).out)
    assert root["workflow"] == "train"
    assert root["variables"] == {"lr": "0.3", "batch": "32"}
    assert root["commit"] == commit
    assert root["diff_summary"] == "1 file changed, +1 -1"
    assert [a["path"] for a in root["artifacts"]] == ["m/out"]
    [prep] = root["upstream"]
    assert prep["workflow"] == "prep" and [a["path"] for a in prep["artifacts"]] == ["d/rows.csv"]
    [one] = json.loads(dstack("lineage", run["name"], "d/rows.csv", "--json", cwd=repo).out)
    assert one["workflow"] == "prep"
    text = dstack("lineage", run["name"], cwd=repo).out
    assert "train" in text and "prep" in text and commit[:12] in text


def test_reproduce_uses_the_recorded_repo_state(make_repo):
    repo = repo_with_pipeline(make_repo)
    dstack("run", "train", "--lr", "0.7", cwd=repo)
    original = last_run(repo)
    write(repo, "data.csv", "changed since\n")
    write(repo, ".dstack/variables.yaml", "variables:\n  train:\n    lr: 9\n    batch: 1\n")
    res = dstack("run", "--reproduce", original["name"], cwd=repo)
    assert "lr=0.7 batch=32" in res.out
    assert "identical train" in res.err and "identical prep" in res.err
    assert "different" not in res.err
