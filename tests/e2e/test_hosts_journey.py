"""A newcomer's journey with two GPU boxes (real sshd servers in their own network namespaces): add both,
run a pipeline whose jobs are placed by their resources across them, kill the CLI mid-run and re-attach,
download the artifacts; then a host that stops answering mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import dstack

PIPELINE = """\
workflows:
  - name: prepare
    commands: ["mkdir -p data", "seq 1 100 > data/numbers.txt", "echo prepared on $(hostname -I 2>/dev/null)"]
    artifacts: [data]
  - name: train-a
    depends-on: [prepare]
    resources: {cpu: 2}
    commands:
      - mkdir -p model-a
      - for i in 1 2 3 4 5 6; do echo "a step $i"; sleep 0.5; done
      - awk '{s+=$1} END {print s}' data/numbers.txt > model-a/sum.txt
    artifacts: [model-a]
  - name: train-b
    depends-on: [prepare]
    resources: {cpu: 2}
    commands:
      - mkdir -p model-b
      - for i in 1 2 3 4 5 6; do echo "b step $i"; sleep 0.5; done
      - wc -l < data/numbers.txt > model-b/count.txt
    artifacts: [model-b]
  - name: evaluate
    depends-on: [train-a, train-b]
    commands: ["echo sum=$(cat model-a/sum.txt) count=$(cat model-b/count.txt) | tee report.txt"]
    artifacts: [report.txt]
"""


def add_host(server, name: str, cwd: Path) -> None:
    res = dstack("hosts", "add", server.address, "--name", name, "-i", str(server.key), "--yes", cwd=cwd)
    assert f"Added host {name}" in res.err


def test_two_hosts_placement_reattach_and_download(make_repo, sshd_factory, tmp_path):
    one, two = sshd_factory.netns(), sshd_factory.netns()
    repo = make_repo({".dstack/workflows.yaml": PIPELINE})
    add_host(one, "box1", repo)
    add_host(two, "box2", repo)
    dstack("hosts", "disable", "local", cwd=repo)
    listed = {h["name"]: h for h in json.loads(dstack("hosts", "--json", cwd=repo).out)}
    assert listed["box1"]["capacity"]["cpus"] >= 2 and listed["box2"]["status"] == "ready"
    assert listed["local"]["enabled"] is False

    cli = subprocess.Popen(
        [sys.executable, "-m", "dstack", "run", "evaluate"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert cli.stdout is not None
    deadline = time.time() + 60
    for line in cli.stdout:  # wait until training is under way, then kill the CLI
        if "step 2" in line or time.time() > deadline:
            break
    cli.send_signal(signal.SIGKILL)
    cli.wait(10)
    cli.stdout.close()
    cli.stderr.close()  # type: ignore[union-attr]

    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    follow = dstack("logs", "-f", run, cwd=repo, timeout=120)
    assert "sum=5050 count=100" in follow.out
    for job in ("a", "b"):  # re-attached with no line lost
        assert [ln.split("| ")[1] for ln in follow.out.splitlines() if f"{job} step" in ln] == [
            f"{job} step {i}" for i in range(1, 7)
        ]
    jobs = {j["name"]: j for j in json.loads(dstack("jobs", run, "--json", cwd=repo).out)}
    assert {jobs["train-a"]["runner"], jobs["train-b"]["runner"]} == {"box1", "box2"}
    assert all(j["status"] == "done" for j in jobs.values())

    out = tmp_path / "out"
    dstack("artifacts", "download", run, "-o", str(out), cwd=repo)
    assert (out / "report.txt").read_text() == "sum=5050 count=100\n"
    assert (out / "model-a/sum.txt").read_text().strip() == "5050"


def test_pinned_host_and_a_job_no_host_fits(make_repo, sshd_factory):
    server = sshd_factory.loopback()
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: where
    commands: ["echo running as $USER in $HOME"]
  - name: huge
    resources: {gpu: {name: H100, count: 8}}
    commands: [echo never]
"""
        }
    )
    add_host(server, "pinned", repo)
    dstack("run", "where", "--host", "pinned", cwd=repo)
    jobs = json.loads(dstack("jobs", "--json", cwd=repo).out)
    assert jobs[0]["runner"] == "pinned"
    res = dstack("run", "huge", cwd=repo, check=False)
    assert res.code == 4
    assert "no runner could ever fit this job" in res.err and "GPUs (8 H100 asked" in res.err


def test_host_that_stops_answering_fails_its_job_in_time(make_repo, sshd_factory, monkeypatch):
    monkeypatch.setenv("DSTACK_HOST_LOST_S", "5")
    server = sshd_factory.netns()
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: long
    commands: ["echo started", "sleep 120"]
"""
        }
    )
    add_host(server, "flaky", repo)
    dstack("run", "long", "--host", "flaky", "-d", cwd=repo)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    deadline = time.time() + 30
    while "started" not in dstack("logs", run, cwd=repo, check=False).out and time.time() < deadline:
        time.sleep(0.3)
    server.cut()
    cut_at = time.time()
    try:
        while time.time() - cut_at < 40:
            status = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
            if status["status"] == "failed":
                break
            time.sleep(1)
        took = time.time() - cut_at
        assert status["status"] == "failed", status
        assert took < 30
        assert "flaky" in (status["reason"] or "")
    finally:
        server.reconnect()
        os.environ.pop("DSTACK_HOST_LOST_S", None)


def test_retry_places_the_job_on_another_host_when_its_host_dies(make_repo, sshd_factory, monkeypatch):
    monkeypatch.setenv("DSTACK_HOST_LOST_S", "3")
    one, two = sshd_factory.netns(), sshd_factory.netns()
    repo = make_repo(
        {
            ".dstack/workflows.yaml": """\
workflows:
  - name: resilient
    retry:
      limit: 1
    commands: ["echo attempt on $HOME", "sleep 4", "echo finished"]
"""
        }
    )
    add_host(one, "first", repo)
    add_host(two, "second", repo)
    dstack("hosts", "disable", "local", cwd=repo)
    dstack("run", "resilient", "-d", cwd=repo)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    deadline = time.time() + 30
    runner = None
    while runner is None and time.time() < deadline:
        runner = json.loads(dstack("jobs", run, "--json", cwd=repo).out)[0]["runner"]
        time.sleep(0.2)
    victim = one if runner == "first" else two
    victim.cut()
    try:
        follow = dstack("logs", "-f", run, cwd=repo, timeout=90)
        assert "finished" in follow.out
        [job] = json.loads(dstack("jobs", run, "--json", cwd=repo).out)
        assert job["status"] == "done" and job["runner"] != runner
        # each attempt's log is whole, one after the other: the new one from its first line on
        header = f"── attempt 2 on {job['runner']} ──"
        shown = dstack("logs", run, cwd=repo).out
        assert header in shown and header in follow.out
        second = shown.split(header, 1)[1].strip().splitlines()
        assert second[0].startswith("dstack: attempt 2 of job ") and "starting afresh" in second[0], shown
        assert second[1].startswith("attempt on ") and second[-1] == "finished", shown
    finally:
        victim.reconnect()
