"""Runs on this machine: the researcher's loop from the README, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from helpers import dstack, write

PIPELINE = """\
workflows:
  - name: prepare
    provider: bash
    commands:
      - mkdir -p data
      - echo "rows=$rows" > data/set.txt
    artifacts: [data]
  - name: train
    depends-on: [prepare]
    provider: bash
    commands:
      - cat data/set.txt
      - mkdir -p model
      - echo "lr=${{ lr }}" > model/weights.txt
      - echo "trained with $lr"
    artifacts: [model]
"""
VARIABLES = """\
variables:
  global:
    rows: 10
  train:
    lr: 0.01
"""


def pipeline_repo(make_repo) -> Path:
    return make_repo({".dstack/workflows.yaml": PIPELINE, ".dstack/variables.yaml": VARIABLES})


def runs_json(repo: Path) -> list[dict]:
    return json.loads(dstack("runs", "--json", cwd=repo).out)


def test_run_streams_output_and_saves_artifacts(make_repo, tmp_path):
    repo = pipeline_repo(make_repo)
    res = dstack("run", "train", "--lr", "0.5", cwd=repo)
    assert "rows=10" in res.out
    assert "trained with 0.5" in res.out
    [run] = runs_json(repo)
    assert run["status"] == "done"
    assert [j["name"] for j in run["jobs"]] == ["prepare", "train"]
    listing = dstack("artifacts", "list", run["name"], "--json", cwd=repo)
    paths = {a["name"] for a in json.loads(listing.out)}
    assert paths == {"data/set.txt", "model/weights.txt"}
    dstack("artifacts", "download", run["name"], "-o", str(tmp_path / "out"), cwd=repo)
    assert (tmp_path / "out/model/weights.txt").read_text() == "lr=0.5\n"
    assert (tmp_path / "out/data/set.txt").read_text() == "rows=10\n"


def test_same_code_and_variables_reuse_jobs(make_repo):
    repo = pipeline_repo(make_repo)
    dstack("run", "train", cwd=repo)
    again = dstack("run", "train", cwd=repo)
    assert "reused" in again.err
    changed = dstack("run", "train", "--lr", "0.2", cwd=repo)
    assert "prepare (reused)" in changed.err
    assert "trained with 0.2" in changed.out
    forced = dstack("run", "train", "--force", cwd=repo)
    assert "rows=10" in forced.out


def test_variables_are_quoted_never_pasted(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: echo
    commands:
      - echo ${{ msg }}
      - echo "$MSG"
""",
            ".dstack/variables.yaml": "variables:\n  echo:\n    msg: hi\n",
        }
    )
    res = dstack("run", "echo", "--msg", "a; touch pwned", cwd=repo)
    assert res.out.splitlines().count("a; touch pwned") == 2
    assert not any(Path(d).name == "pwned" for d in os.listdir(repo))


def test_unknown_variable_is_an_error(make_repo):
    repo = pipeline_repo(make_repo)
    res = dstack("run", "train", "--lrr", "1", cwd=repo, check=False)
    assert res.code != 0
    assert "unknown variable '--lrr'" in res.err
    assert "Traceback" not in res.err


def test_failed_job_fails_run_and_cancels_dependents(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: a
    commands: [echo before, "false", echo never]
  - name: b
    depends-on: [a]
    commands: [echo b]
"""
        }
    )
    res = dstack("run", "b", cwd=repo, check=False)
    assert res.code == 4
    assert "before" in res.out and "never" not in res.out
    [run] = runs_json(repo)
    assert run["status"] == "failed"
    assert {j["name"]: j["status"] for j in run["jobs"]} == {"a": "failed", "b": "cancelled"}


def test_detach_then_follow_logs(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: slow
    commands: ["for i in 1 2 3; do echo tick $i; sleep 0.3; done"]
"""
        }
    )
    res = dstack("run", "slow", "-d", cwd=repo)
    assert "Detached" in res.err
    [run] = runs_json(repo)
    follow = dstack("logs", "-f", run["name"][:6], cwd=repo)
    assert follow.out.splitlines() == ["tick 1", "tick 2", "tick 3"]
    assert runs_json(repo)[0]["status"] == "done"


def test_stop_ends_the_process_tree(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: forever
    commands: ["sleep 300 & sleep 300; wait"]
"""
        }
    )
    dstack("run", "forever", "-d", cwd=repo)
    [run] = runs_json(repo)
    deadline = time.time() + 20
    while runs_json(repo)[0]["jobs"][0]["status"] != "running" and time.time() < deadline:
        time.sleep(0.1)
    dstack("stop", run["name"], cwd=repo)
    [run] = runs_json(repo)
    assert run["status"] == "stopped"
    home = Path(os.environ["DSTACK_HOME"])
    pid = int(next(home.glob("jobs/*/pid")).read_text())
    deadline = time.time() + 10
    while group_alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not group_alive(pid), "the job's process group is still alive"


def group_alive(pgid: int) -> bool:
    """Is any process of the group alive (zombies don't count: PID 1 here may not reap them)?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_killed_orchestrator_is_repaired(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: a
    commands: ["sleep 1", "echo finished"]
"""
        }
    )
    dstack("run", "a", "-d", cwd=repo)
    home = Path(os.environ["DSTACK_HOME"])
    import sqlite3

    deadline = time.time() + 10
    pid = None
    while pid is None and time.time() < deadline:
        with sqlite3.connect(home / "state.sqlite") as db:
            pid = db.execute("SELECT orchestrator_pid FROM runs").fetchone()[0]
        time.sleep(0.05)
    assert pid
    os.kill(pid, signal.SIGKILL)
    follow = dstack("logs", "-f", runs_json(repo)[0]["name"], cwd=repo)
    assert "finished" in follow.out
    assert runs_json(repo)[0]["status"] == "done"


def test_tags_feed_later_runs(make_repo, tmp_path):
    repo = pipeline_repo(make_repo)
    dstack("run", "prepare", cwd=repo)
    [run] = runs_json(repo)
    dstack("tags", "add", "base", run["name"], cwd=repo)
    write(
        repo,
        ".dstack/workflows.yaml",
        PIPELINE
        + """\
  - name: report
    depends-on: ["prepare:base"]
    commands: [cat data/set.txt]
""",
    )
    res = dstack("run", "report", cwd=repo)
    assert "rows=10" in res.out
    tags = json.loads(dstack("tags", "list", "--json", cwd=repo).out)
    assert tags[0]["name"] == "base" and tags[0]["run"] == run["name"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("mine\n")
    dstack("tags", "add", "mydata", "--from", str(tmp_path / "mine"), cwd=repo)
    dstack("tags", "delete", "base", cwd=repo)
    assert [t["name"] for t in json.loads(dstack("tags", "list", "--json", cwd=repo).out)] == ["mydata"]


def test_unknown_run_is_one_line(make_repo):
    repo = pipeline_repo(make_repo)
    res = dstack("logs", "nope", cwd=repo, check=False)
    assert res.code == 3
    assert res.err.strip().startswith("Error: no run named 'nope'")


def test_state_file_is_private(make_repo):
    repo = pipeline_repo(make_repo)
    dstack("runs", cwd=repo)
    home = Path(os.environ["DSTACK_HOME"])
    assert (home / "state.sqlite").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700


def test_real_time_artifacts_outlive_a_killed_job(make_repo, monkeypatch, tmp_path):
    monkeypatch.setenv("DSTACK_REAL_TIME_INTERVAL", "0.2")
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: train
    commands:
      - mkdir -p ckpt
      - echo epoch-1 > ckpt/last.txt
      - sleep 300
    artifacts:
      - path: ckpt
        real-time: true
"""
        }
    )
    dstack("run", "train", "-d", cwd=repo)
    name = runs_json(repo)[0]["name"]
    deadline = time.time() + 20
    while time.time() < deadline:
        listing = json.loads(dstack("artifacts", "list", name, "--json", cwd=repo).out)
        if listing:
            break
        time.sleep(0.2)
    assert [a["name"] for a in listing] == ["ckpt/last.txt"]
    home = Path(os.environ["DSTACK_HOME"])
    pid = int(next(home.glob("jobs/*/pid")).read_text())
    os.killpg(pid, signal.SIGKILL)  # the job dies mid-way, as a host would
    dstack("logs", "-f", name, cwd=repo, check=False)
    [run] = runs_json(repo)
    assert run["status"] == "failed"
    dstack("artifacts", "download", name, "-o", str(tmp_path / "out"), cwd=repo)
    assert (tmp_path / "out/ckpt/last.txt").read_text() == "epoch-1\n"


def test_cycle_is_an_error_naming_it(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: a
    depends-on: [b]
    commands: [echo a]
  - name: b
    depends-on: [a]
    commands: [echo b]
"""
        }
    )
    res = dstack("run", "a", cwd=repo, check=False)
    assert res.code == 2
    assert "cycle: a → b → a" in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_unknown_dependency_or_tag_is_an_error(make_repo):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: a
    depends-on: [nope]
    commands: [echo a]
  - name: b
    depends-on: ["a:missing-tag"]
    commands: [echo b]
  - name: c
    commands: [echo c]
"""
        }
    )
    res = dstack("run", "a", cwd=repo, check=False)
    assert res.code == 2 and "'nope'" in res.err
    res = dstack("run", "b", cwd=repo, check=False)
    assert res.code == 2 and "no tag 'missing-tag'" in res.err
    assert "c" in dstack("run", "c", cwd=repo).out


def test_not_a_git_repo_and_no_dstack_folder(tmp_path, make_repo):
    plain = tmp_path / "plain"
    (plain / ".dstack").mkdir(parents=True)
    (plain / ".dstack/workflows.yaml").write_text("workflows:\n  - name: a\n    commands: [echo a]\n")
    res = dstack("run", "a", cwd=plain, check=False)
    assert res.code == 2 and "Git" in res.err and "Traceback" not in res.err
    bare = make_repo({"README": "x"}, name="bare")
    res = dstack("run", "a", cwd=bare, check=False)
    assert res.code == 2 and "no .dstack/ folder" in res.err and "dstack init" in res.err


def test_two_runs_at_once(make_repo):
    import subprocess
    import sys

    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: a
    commands: ["sleep 0.5", "echo one-$x"]
""",
            ".dstack/variables.yaml": "variables:\n  a:\n    x: 0\n",
        }
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dstack", "run", "a", "--x", str(i)],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sorted(o[0].strip() for o in outs) == ["one-0", "one-1", "one-2"]
    assert sorted(r["status"] for r in runs_json(repo)) == ["done"] * 3


def test_init_schema_version(make_repo):
    repo = make_repo({"README": "x"})
    dstack("init", cwd=repo)
    res = dstack("run", "hello", "--name", "researcher", cwd=repo)
    assert "Hello, researcher!" in res.out
    schema = json.loads(dstack("schema", cwd=repo).out)
    assert "workflows" in json.dumps(schema)
    assert dstack("--version").out.startswith("dstack ")
    listing = dstack("run", "--help", cwd=repo).out
    assert "hello" in listing and "Say hello" in listing
    assert "--name" in dstack("run", "hello", "--help", cwd=repo).out


def test_download_when_two_jobs_save_the_same_path(make_repo, tmp_path):
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: first
    commands: ["mkdir -p data", "echo one > data/set.txt", "echo keep > data/first.txt"]
    artifacts: [data]
  - name: second
    depends-on: [first]
    commands: ["echo two > data/set.txt"]
    artifacts: [data]
"""
        }
    )
    dstack("run", "second", cwd=repo)
    name = runs_json(repo)[0]["name"]
    dstack("artifacts", "download", name, "-o", str(tmp_path / "out"), cwd=repo)
    assert (tmp_path / "out/data/set.txt").read_text() == "two\n"
    assert (tmp_path / "out/data/first.txt").read_text() == "keep\n"
