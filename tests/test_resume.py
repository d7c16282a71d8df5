"""Resume instead of restart: a job placed again after an interruption starts from the real-time artifacts
its last attempt saved (a counter checkpointed once a second), on this machine, on SSH hosts and on Slurm."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import dstack

COUNTER = """\
workflows:
  - name: count
    retry:
      limit: 1
      on: [host-lost, interruption]
    commands:
      - mkdir -p ckpt
      - n=$(cat ckpt/counter 2>/dev/null || echo 0); echo "from $n"
      - while [ "$n" -lt 20 ]; do n=$((n+1)); echo "$n" > ckpt/counter; echo "count $n"; sleep 1; done
    artifacts:
      - path: ckpt
        real-time: true
"""


def job_of(repo: Path, run: str) -> dict[str, Any]:
    [job] = json.loads(dstack("jobs", run, "--json", cwd=repo).out)
    return job


def wait(what: Any, timeout: float = 30, step: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := what()) and time.monotonic() < deadline:
        time.sleep(step)
    return found


def saved_counter(job_id: str) -> int:
    """The counter in the job's last saved real-time artifacts (0 before the first save)."""
    import sqlite3

    with sqlite3.connect(Path(os.environ["DSTACK_HOME"]) / "state.sqlite") as db:
        row = db.execute("SELECT manifest FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if not row or not row[0] or "/rt-" not in row[0]:
        return 0
    from dstack.store import open_object_store
    from dstack.store.state import open_state

    with open_state() as state:
        store = open_object_store(state)
        manifest = store.get_manifest(row[0])
        [entry] = [e for e in manifest.entries if e.path == "ckpt/counter"]
        return int(store.get_bytes(entry.digest).decode())


def start_counting(repo: Path, *args: str) -> tuple[str, str]:
    """Start the counter job; once a checkpoint past 3 is saved, return (run name, job id)."""
    dstack("run", "count", "-d", *args, cwd=repo)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    job_id = wait(lambda: job_of(repo, run)["id"])
    assert wait(lambda: saved_counter(job_id) >= 3, timeout=40), dstack("logs", run, cwd=repo).out
    return run, job_id


def check_resumed(repo: Path, run: str, job_id: str, saved_before: int, timeout: float = 60) -> str:
    """The job finished at 20, its second attempt from a saved checkpoint; the attempt's log says so."""
    assert wait(lambda: job_of(repo, run)["status"] in ("done", "failed"), timeout=timeout, step=0.5)
    job = job_of(repo, run)
    shown = dstack("logs", run, cwd=repo).out
    assert job["status"] == "done", (job, shown)
    header = next(line for line in shown.splitlines() if line.startswith("── attempt 2 on "))
    second = shown.split(header, 1)[1].strip().splitlines()
    note = second[0]
    assert re.fullmatch(
        rf"dstack: attempt 2 of job {job_id}, resuming from attempt 1: restored 1 file \(\d+ B\) of "
        r"real-time artifacts",
        note,
    ), shown
    output = [line for line in second[1:] if not line.startswith("dstack: inputs: ")]  # (with an S3 store)
    start = int(output[0].removeprefix("from "))
    assert start >= saved_before > 0 and start < 20, shown  # from the checkpoint, not from scratch
    assert output[1] == f"count {start + 1}" and output[-1] == "count 20", shown
    first = shown.split(header, 1)[0]
    assert "dstack: attempt" not in first and "from 0" in first  # nothing special on attempt 1
    out = repo.parent / f"out-{run}"
    dstack("artifacts", "download", run, "-o", str(out), cwd=repo)
    assert [p.read_text() for p in out.rglob("counter")] == ["20\n"]
    return shown


@pytest.mark.timeout(90)
def test_local_job_killed_resumes_from_its_checkpoint(make_repo, monkeypatch):
    """A local job whose processes are SIGKILLed leaves no exit code: it is lost, like a host that died."""
    monkeypatch.setenv("DSTACK_REAL_TIME_INTERVAL", "1")
    repo = make_repo({".dstack/workflows.yaml": COUNTER})
    run, job_id = start_counting(repo)
    pid = int((Path(os.environ["DSTACK_HOME"]) / "jobs" / job_id / "pid").read_text())
    saved = saved_counter(job_id)
    os.killpg(pid, signal.SIGKILL)  # the wrapper too: no exit code is written
    check_resumed(repo, run, job_id, saved)


@pytest.mark.timeout(120)
def test_job_on_a_host_that_stops_answering_resumes_on_another(make_repo, sshd_factory, monkeypatch):
    """The host is cut off mid-way (its job goes on, unheard): the job is lost there and placed on the other
    host, which gets the checkpoint the orchestrator saved before the cut."""
    monkeypatch.setenv("DSTACK_HOST_LOST_S", "3")
    monkeypatch.setenv("DSTACK_REAL_TIME_INTERVAL", "1")
    one, two = sshd_factory.netns(), sshd_factory.netns()
    repo = make_repo({".dstack/workflows.yaml": COUNTER})
    for server, name in ((one, "first"), (two, "second")):
        dstack("hosts", "add", server.address, "--name", name, "-i", str(server.key), "--yes", cwd=repo)
    dstack("hosts", "disable", "local", cwd=repo)
    run, job_id = start_counting(repo)
    runner = job_of(repo, run)["runner"]
    victim = one if runner == "first" else two
    saved = saved_counter(job_id)
    victim.cut()
    try:
        check_resumed(repo, run, job_id, saved)
        assert job_of(repo, run)["runner"] != runner
    finally:
        victim.reconnect()


@pytest.mark.timeout(150)
def test_slurm_job_whose_node_fails_resumes_on_another_node(make_repo, slurm_cluster, monkeypatch):
    """The job's node goes DOWN: Slurm ends the job with NODE_FAIL, dstack submits it again, and the new
    attempt (on the other node) starts from the checkpoint saved before."""
    monkeypatch.setenv("DSTACK_REAL_TIME_INTERVAL", "1")
    import subprocess

    repo = make_repo({".dstack/workflows.yaml": COUNTER})
    login = slurm_cluster.login
    dstack("hosts", "add", login.address, "--slurm", "--name", "cluster", "-i", str(login.key), "--yes",
           cwd=repo, timeout=60)  # fmt: skip
    dstack("hosts", "disable", "local", cwd=repo)
    run, job_id = start_counting(repo)
    [first] = [line.split()[0] for line in slurm_cluster.queue() if "dstack-" in line]
    node = slurm_cluster.run("squeue", "-h", "-j", first, "-o", "%N").strip()
    saved = saved_counter(job_id)
    slurm_cluster.run("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=dstack-test")
    try:
        check_resumed(repo, run, job_id, saved, timeout=90)
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=slurm_cluster.env(),
                       capture_output=True, timeout=30)  # fmt: skip
        for line in slurm_cluster.queue():
            slurm_cluster.run("scancel", line.split()[0])


@pytest.mark.timeout(90)
def test_job_in_a_container_killed_resumes_from_its_checkpoint(
    make_repo, docker_engine, busybox_image, monkeypatch
):
    """The same on Docker here: the tree the container mounts gets the checkpoint before `docker run`."""
    monkeypatch.setenv("DSTACK_REAL_TIME_INTERVAL", "1")
    workflows = COUNTER.replace("    retry:", f"    image: {busybox_image}\n    retry:")
    repo = make_repo({".dstack/workflows.yaml": workflows})
    run, job_id = start_counting(repo)
    pid = int((Path(os.environ["DSTACK_HOME"]) / "jobs" / job_id / "pid").read_text())
    saved = saved_counter(job_id)
    os.killpg(pid, signal.SIGKILL)  # the wrapper and `docker run`: the container is left, unheard of
    check_resumed(repo, run, job_id, saved)


@pytest.mark.timeout(120)
def test_job_in_a_container_on_a_host_resumes_after_its_wrapper_is_killed(
    make_repo, sshd_factory, docker_engine, busybox_image, monkeypatch
):
    """Docker on an SSH host: the job's wrapper there is SIGKILLed (no exit code: lost), the job is placed
    again on the host, and the container of the new attempt starts from the checkpoint."""
    monkeypatch.setenv("DSTACK_REAL_TIME_INTERVAL", "1")
    server = sshd_factory.loopback(env={"DOCKER_HOST": os.environ["DOCKER_HOST"]})
    workflows = COUNTER.replace("    retry:", f"    image: {busybox_image}\n    retry:")
    repo = make_repo({".dstack/workflows.yaml": workflows})
    dstack("hosts", "add", server.address, "--name", "box", "-i", str(server.key), "--yes", cwd=repo)
    dstack("hosts", "disable", "local", cwd=repo)
    run, job_id = start_counting(repo)
    pid = int((server.dir / "home" / ".dstack" / "jobs" / job_id / "pid").read_text())
    saved = saved_counter(job_id)
    os.killpg(pid, signal.SIGKILL)
    check_resumed(repo, run, job_id, saved)


@pytest.mark.timeout(120)
def test_with_an_s3_store_the_next_host_fetches_the_checkpoint_from_the_bucket(
    make_repo, sshd_factory, s3_server, s3_url, monkeypatch
):
    """The first host's wrapper is killed and the host disabled: the second host gets the checkpoint straight
    from the bucket (pre-signed URLs), as it gets dependencies' artifacts."""
    from test_s3_hosts import hashing_host

    monkeypatch.setenv("DSTACK_REAL_TIME_INTERVAL", "1")
    repo = make_repo({".dstack/workflows.yaml": COUNTER})
    dstack("config", "storage", s3_url, "--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1",
           cwd=repo)  # fmt: skip
    servers = {name: hashing_host(sshd_factory) for name in ("one", "two")}
    for name, server in servers.items():
        dstack("hosts", "add", server.address, "--name", name, "-i", str(server.key), "--yes", cwd=repo)
    dstack("hosts", "disable", "local", cwd=repo)
    run, job_id = start_counting(repo)
    first = job_of(repo, run)["runner"]
    other = "two" if first == "one" else "one"
    dstack("hosts", "disable", first, cwd=repo)
    pid = int((servers[first].dir / "home" / ".dstack" / "jobs" / job_id / "pid").read_text())
    saved = saved_counter(job_id)
    os.killpg(pid, signal.SIGKILL)
    shown = check_resumed(repo, run, job_id, saved)
    assert job_of(repo, run)["runner"] == other
    second = shown.split(f"── attempt 2 on {other} ──", 1)[1]
    assert re.search(
        rf"dstack: inputs: \d+ objects? \(.*\) fetched by {other} from s3://\S+ directly\n", second
    )


def test_a_resumed_attempts_artifacts_are_what_it_restored_plus_what_it_wrote() -> None:
    from dstack.artifacts import overlay
    from dstack.store.objects import Manifest

    def manifest(*paths: str, digest: str = "a") -> Manifest:
        entries = [{"path": p, "size": 1, "mode": 0o100644, "digest": digest * 64} for p in paths]
        return Manifest.model_validate({"entries": entries})

    restored = manifest("ckpt/counter", "ckpt/step-1", "ckpt/old", "log.txt")
    wrote = manifest("ckpt/counter", "ckpt/old/part", "ckpt/step-2", digest="b")
    merged = overlay(restored, wrote)
    assert [(e.path, e.digest[0]) for e in merged.entries] == [
        ("ckpt/counter", "b"),  # what it wrote wins
        ("ckpt/old/part", "b"),  # a folder now where a restored file was: the file goes
        ("ckpt/step-1", "a"),  # restored and not written again: kept
        ("ckpt/step-2", "b"),
        ("log.txt", "a"),
    ]
    assert overlay(manifest("x/y"), manifest("x", digest="b")).entries == manifest("x", digest="b").entries
    assert overlay(manifest(), wrote) == wrote
