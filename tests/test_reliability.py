"""Runs that must never hang, crash-loop, leak or run twice (issue 13), through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import dstack

ONE = """\
workflows:
  - name: a
    commands: ["sleep 2", "echo finished"]
"""


def runs_json(repo: Path) -> list[dict]:
    return json.loads(dstack("runs", "--json", cwd=repo).out)


def db_value(sql: str) -> object:
    home = Path(os.environ["DSTACK_HOME"])
    with sqlite3.connect(home / "state.sqlite") as db:
        row = db.execute(sql).fetchone()
    return row[0] if row else None


def wait_for(check, timeout: float = 20, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def running_orchestrator() -> int:
    """Wait until the run's job runs, then return its orchestrator's pid."""
    wait_for(lambda: db_value("SELECT status FROM jobs") == "running", what="the job to run")
    return int(wait_for(lambda: db_value("SELECT orchestrator_pid FROM runs"), what="an orchestrator"))


def test_large_repo_file_never_hangs_the_run(make_repo):
    """13.1: hashing a >4.5 MB file uses blake3's threads; an orchestrator forked after that deadlocked."""
    repo = make_repo({".dstack/workflows.yaml": "workflows:\n  - name: a\n    commands: [wc -c data.bin]\n"})
    (repo / "data.bin").write_bytes(os.urandom(5_000_000))
    subprocess.run(["git", "add", "data.bin"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=repo, check=True)
    assert "5000000 data.bin" in dstack("run", "a", cwd=repo, timeout=30).out
    dstack("run", "a", "--force", "-d", cwd=repo, timeout=30)
    follow = dstack("logs", "-f", runs_json(repo)[0]["name"], cwd=repo, timeout=30)
    assert "5000000 data.bin" in follow.out
    assert [r["status"] for r in runs_json(repo)] == ["done", "done"]


def test_stuck_orchestrator_is_replaced(make_repo, monkeypatch):
    """13.4: an orchestrator that stops beating (SIGSTOP stands in for a deadlock) is killed and replaced."""
    monkeypatch.setenv("DSTACK_ORCHESTRATOR_STALE_S", "3")
    repo = make_repo({".dstack/workflows.yaml": ONE})
    dstack("run", "a", "-d", cwd=repo)
    stuck = running_orchestrator()
    os.kill(stuck, signal.SIGSTOP)
    try:
        follow = dstack("logs", "-f", runs_json(repo)[0]["name"], cwd=repo, timeout=30)
    finally:
        if alive(stuck):
            os.kill(stuck, signal.SIGKILL)
    assert "finished" in follow.out
    [run] = runs_json(repo)
    assert run["status"] == "done"
    assert not alive(stuck), "the stuck orchestrator was left behind"
    assert 1 <= int(db_value("SELECT orchestrator_restarts FROM runs")) <= 3  # type: ignore[call-overload]


def test_crash_looping_orchestrator_fails_the_run_and_logs_returns(make_repo, monkeypatch):
    """13.4: an orchestrator that dies on every start is restarted 3 times (with a backoff, never 10 times a
    second), then the run fails with the reason and `logs -f` returns."""
    monkeypatch.setenv("DSTACK_ORCHESTRATOR_BACKOFF_S", "0.2")
    repo = make_repo({".dstack/workflows.yaml": ONE})
    dstack("run", "a", "-d", cwd=repo)
    pid = running_orchestrator()
    os.kill(pid, signal.SIGSTOP)
    home = Path(os.environ["DSTACK_HOME"])
    with sqlite3.connect(home / "state.sqlite") as db:  # a spec no orchestrator can read: each one crashes
        db.execute("""UPDATE jobs SET spec = json_set(spec, '$.resources', 'broken')""")
    os.kill(pid, signal.SIGKILL)
    started = time.time()
    follow = dstack("logs", "-f", runs_json(repo)[0]["name"], cwd=repo, timeout=40, check=False)
    assert follow.code == 4, follow.describe(["logs", "-f"])
    assert time.time() - started < 30
    [run] = runs_json(repo)
    assert run["status"] == "failed"
    assert "orchestrator died 4 times" in run["reason"]
    assert run["jobs"][0]["status"] == "failed"
    assert "Traceback" not in follow.err
    log = next(home.glob("runs/*.log")).read_text()
    assert log.count("Traceback") <= 4
    assert db_value("SELECT count(*) FROM jobs WHERE status IN ('starting', 'running')") == 0


def test_stop_ends_a_stuck_orchestrator(make_repo):
    """13.4: `dstack stop` always ends the run, killing an orchestrator that no longer answers."""
    repo = make_repo({".dstack/workflows.yaml": ONE.replace("sleep 2", "sleep 300")})
    dstack("run", "a", "-d", cwd=repo)
    stuck = running_orchestrator()
    os.kill(stuck, signal.SIGSTOP)
    try:
        dstack("stop", runs_json(repo)[0]["name"], cwd=repo, timeout=30)
        wait_for(lambda: not alive(stuck), timeout=5, what="the orchestrator to end")
    finally:
        if alive(stuck):
            os.kill(stuck, signal.SIGKILL)
    [run] = runs_json(repo)
    assert run["status"] == "stopped" and run["jobs"][0]["status"] == "stopped"


def job_processes(job_id: str) -> list[int]:
    """Live processes whose environment names the job."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                if f"DSTACK_JOB={job_id}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_stop_ends_descendants_that_called_setsid(make_repo):
    """13.10: `setsid sleep 300 &` leaves the job's process group; stop still ends it."""
    repo = make_repo(
        {".dstack/workflows.yaml": "workflows:\n  - name: a\n    commands: ['setsid sleep 300 & wait']\n"}
    )
    dstack("run", "a", "-d", cwd=repo)
    running_orchestrator()
    job_id = str(db_value("SELECT id FROM jobs"))
    wait_for(lambda: job_processes(job_id), what="the job's sleep")
    dstack("stop", runs_json(repo)[0]["name"], cwd=repo, timeout=30)
    wait_for(lambda: not job_processes(job_id), timeout=10, what="every process of the job to end")


def cgroup_v2_writable() -> bool:
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        probe = root / "dstack" / f"probe-{os.getpid()}"
        if (root / "cgroup.controllers").exists():
            try:
                probe.mkdir(parents=True, exist_ok=True)
                probe.rmdir()
                return True
            except OSError:
                continue
    return False


def sleeping(seconds: str) -> list[int]:
    """Live `sleep SECONDS` processes."""
    want = f"sleep\0{seconds}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == want and alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_stop_ends_descendants_that_cleared_their_environment(make_repo):
    """13.10: a job's cgroup holds even a descendant that cleared its environment and called setsid."""
    if not cgroup_v2_writable():
        pytest.skip("no cgroup v2 this user may create a folder in: only setsid'ed descendants are tracked")
    seconds = str(300 + os.getpid() % 600)
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"workflows:\n  - name: a\n    commands: ['env -i setsid sleep {seconds} & wait']\n"
        }
    )
    dstack("run", "a", "-d", cwd=repo)
    wait_for(lambda: sleeping(seconds), what="the job's sleep")
    dstack("stop", runs_json(repo)[0]["name"], cwd=repo, timeout=30)
    wait_for(lambda: not sleeping(seconds), timeout=10, what="the job's sleep to end")


def test_passthrough_secret_is_not_left_in_env_sh(make_repo):
    """13.12: `env: [MY_SECRET]` values never stay on disk once the job has read them."""
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: a
    env: [MY_SECRET]
    commands: ['echo "secret of ${#MY_SECRET} characters"']
"""
        }
    )
    res = dstack("run", "a", "--keep", cwd=repo, env={"MY_SECRET": "hunter2"})
    assert "secret of 7 characters" in res.out
    home = Path(os.environ["DSTACK_HOME"])
    [job_dir] = home.glob("jobs/*")
    assert not (job_dir / "env.sh").exists()
    leaks = [p for p in home.rglob("*") if p.is_file() and b"hunter2" in p.read_bytes()]
    assert leaks == []


def test_identical_runs_at_once_execute_the_job_once(make_repo, tmp_path):
    """13.14: eight identical `dstack run` at once: one executes the job, the other seven join it."""
    counter = tmp_path / "count.txt"
    repo = make_repo(
        {
            ".dstack/workflows.yaml": f"""\
workflows:
  - name: a
    commands: ["echo ran >> {counter}", "sleep 1", "mkdir -p out", "echo result > out/r.txt"]
    artifacts: [out]
"""
        }
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dstack", "run", "a"],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, outs
    assert counter.read_text().splitlines() == ["ran"]
    runs = runs_json(repo)
    assert [r["status"] for r in runs] == ["done"] * 8
    statuses = sorted(r["jobs"][0]["status"] for r in runs)
    assert statuses == ["done"] + ["reused"] * 7
    for r in runs:
        listing = json.loads(dstack("artifacts", "list", r["name"], "--json", cwd=repo).out)
        assert [a["name"] for a in listing] == ["out/r.txt"]


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A 3 MiB tmpfs as DSTACK_HOME (needs root and mount(2); skipped, saying so, where that is refused)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    monkeypatch.setenv("DSTACK_HOME", str(mnt / "home"))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line(make_repo, small_disk):
    """13.9: with DSTACK_HOME's disk full, commands say so in one line (not `sqlite3.OperationalError`)."""
    repo = make_repo({".dstack/workflows.yaml": "workflows:\n  - name: a\n    commands: [echo hi]\n"})
    dstack("runs", cwd=repo)
    subprocess.run(f"head -c 8000000 /dev/zero > {small_disk}/filler", shell=True, capture_output=True)
    for args in (["runs"], ["run", "a"]):
        res = dstack(*args, cwd=repo, check=False)
        assert res.code != 0
        assert "Traceback" not in res.err and "OperationalError" not in res.err
        [line] = res.err.strip().splitlines()
        assert f"the disk under DSTACK_HOME ({small_disk}/home) is full" in line


def test_job_that_fills_its_disk_says_so(make_repo, small_disk):
    """13.9: a job that fills the disk fails with 'no space left on device', not 'gone without an exit code'."""
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: a
    commands: ["head -c 8000000 /dev/zero > big.bin", "echo unreachable"]
"""
        }
    )
    res = dstack("run", "a", cwd=repo, check=False, timeout=30)
    assert res.code == 4, res.describe(["run", "a"])
    [run] = runs_json(repo)
    assert run["status"] == "failed"
    assert "no space left on device" in run["reason"]
    assert "without an exit code" not in run["reason"]


def test_job_checkout_follows_the_repo_and_is_private(make_repo):
    """Issue 15.6: a job's copy of the repo costs what changed (a pristine tree per repo, updated by diff),
    and a job that writes into a tracked file in place changes neither the store nor a later job's copy."""
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: show
    commands: ["cat data.txt", "ls sub 2>/dev/null || echo no-sub", "test -x run.sh && echo executable"]
  - name: scribble
    commands: ["printf XXXX 1<> data.txt", "cat data.txt"]
""",
            "data.txt": "original\n",
            "sub/gone.txt": "soon deleted\n",
            "run.sh": "#!/bin/sh\n",
        }
    )
    (repo / "run.sh").chmod(0o755)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "exec"], cwd=repo, check=True)
    assert dstack("run", "show", cwd=repo).out.splitlines() == ["original", "gone.txt", "executable"]
    assert dstack("run", "scribble", cwd=repo).out.splitlines() == ["XXXXinal"]
    assert dstack("run", "show", "--force", cwd=repo).out.splitlines()[0] == "original"
    home = Path(os.environ["DSTACK_HOME"])
    stored = [p for p in home.glob("artifacts/objects/*/*") if p.read_bytes() == b"original\n"]
    assert stored, "the store lost the tracked file's content"
    (repo / "data.txt").write_text("changed\n")
    subprocess.run(["git", "rm", "-q", "-r", "sub"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qam", "change"], cwd=repo, check=True)
    assert dstack("run", "show", cwd=repo).out.splitlines() == ["changed", "no-sub", "executable"]
