"""Multi-node jobs on SSH hosts: `nodes: 2` on two real sshd servers, each in its own network namespace and
routed to the other, whose ranks meet through MASTER_ADDR:MASTER_PORT; one rank failing ends the other;
a job that needs more hosts than exist is refused at once."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import dstack

# rank 0 listens on MASTER_PORT, rank 1 connects to MASTER_ADDR:MASTER_PORT; each says where it is
RENDEZVOUS = """\
import os, socket, time
rank, addr, port = int(os.environ["DSTACK_NODE_RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
assert os.environ["NODE_RANK"] == str(rank) and os.environ["WORLD_SIZE"] == os.environ["DSTACK_NODES_NUM"] == "2"
assert os.environ["DSTACK_MASTER_NODE_ADDR"] == addr == os.environ["DSTACK_NODES_IPS"].split(",")[0]
if rank == 0:
    server = socket.create_server(("0.0.0.0", port))
    server.settimeout(30)
    conn, _ = server.accept()
    me = conn.getsockname()[0]
    conn.sendall(f"rank 0 at {me}\\n".encode())
    print(f"rank 0 at {me} met {conn.recv(100).decode().strip()}", flush=True)
else:
    for _ in range(300):
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            time.sleep(0.1)
    me = conn.getsockname()[0]
    conn.sendall(f"rank 1 from {me}\\n".encode())
    print(f"rank 1 from {me} met {conn.recv(100).decode().strip()}", flush=True)
conn.close()
"""

WORKFLOWS = """\
workflows:
  - name: meet
    nodes: 2
    commands:
      - echo "rank $DSTACK_NODE_RANK of $DSTACK_NODES_NUM, ips $DSTACK_NODES_IPS, port $MASTER_PORT"
      - python3 meet.py
      - mkdir -p out && echo "written by rank $DSTACK_NODE_RANK" > out/who.txt
    artifacts: [out]
  - name: one-fails
    resources: {nodes: 2}
    commands:
      - if [ "$DSTACK_NODE_RANK" = 1 ]; then echo "rank 1 gives up"; exit 3; fi
      - echo "rank 0 sleeping"
      - sleep 120
  - name: hold
    nodes: 2
    resources: {cpu: 2}
    commands: ['echo "rank $DSTACK_NODE_RANK holding"', "sleep 120"]
  - name: next
    nodes: 2
    resources: {cpu: 2}
    commands: ['echo "rank $DSTACK_NODE_RANK next"']
  - name: both-sleep
    nodes: 2
    commands: ['echo "rank $DSTACK_NODE_RANK sleeping"', "sleep 120"]
  - name: torch
    provider: torchrun
    script: train.py
    nodes: 2
    commands: ['export PATH="$PWD/bin:$PATH"']
  - name: three
    nodes: 3
    commands: [echo never]
"""


def add_host(server, name: str, cwd: Path) -> None:
    res = dstack("hosts", "add", server.address, "--name", name, "-i", str(server.key), "--yes", cwd=cwd)
    assert f"Added host {name}" in res.err


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts(sshd_factory, make_repo) -> Iterator[tuple[Path, list]]:
    """Two namespaced hosts that reach each other (through this machine, as two boxes on one LAN) and a
    repo with both registered as `one` and `two`."""
    servers = [sshd_factory.netns(), sshd_factory.netns()]
    rules = []
    for server in servers:  # the namespace's side of its veth is .2, ours .1: route the others through us
        gateway = server.host.rsplit(".", 1)[0] + ".1"
        _sh("ip", "netns", "exec", server.netns, "ip", "route", "add", "10.200.0.0/16", "via", gateway)
    a, b = servers[0].veth, servers[1].veth
    for rule in (["-i", a, "-o", b, "-j", "ACCEPT"], ["-i", b, "-o", a, "-j", "ACCEPT"]):
        _sh("iptables", "-I", "FORWARD", *rule)  # dockerd's FORWARD policy is DROP
        rules.append(rule)
    # a stand-in for torch's launcher (torch is not needed here): it says what it was asked
    torchrun = '#!/bin/sh\necho "torchrun $*"\n'
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS, "meet.py": RENDEZVOUS, "bin/torchrun": torchrun})
    (repo / "bin/torchrun").chmod(0o755)
    subprocess.run(["git", "commit", "-qam", "executable"], cwd=repo, check=True, timeout=10)
    add_host(servers[0], "one", repo)
    add_host(servers[1], "two", repo)
    try:
        yield repo, servers
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-D", "FORWARD", *rule], capture_output=True, timeout=10)


def test_two_ranks_meet_on_two_hosts_and_rank_0_gives_the_artifacts(two_hosts, tmp_path):
    repo, servers = two_hosts
    started = time.time()
    res = dstack("run", "meet", cwd=repo, timeout=60)
    assert time.time() - started < 60
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    assert run["status"] == "done", run
    [job] = json.loads(dstack("jobs", run["name"], "--json", cwd=repo).out)
    assert job["status"] == "done" and job["runner"] == "one+two"

    one, two = servers[0].host, servers[1].host
    assert f"rank 0 of 2, ips {one},{two}, port 29500" in res.out  # rank 0's log is the job's
    assert f"rank 0 at {one} met rank 1 from {two}" in res.out
    rank1 = dstack("logs", run["name"], "--rank", "1", cwd=repo).out
    assert f"rank 1 of 2, ips {one},{two}" in rank1 and f"rank 1 from {two} met rank 0 at {one}" in rank1
    assert "rank 0 of 2" not in rank1

    out = tmp_path / "out"
    dstack("artifacts", "download", run["name"], "-o", str(out), cwd=repo)
    assert (out / "out/who.txt").read_text() == "written by rank 0\n"

    res = dstack("logs", run["name"], "--rank", "2", cwd=repo, check=False)
    assert res.code != 0 and f"run {run['name']} has no job with a rank 2" in res.err


def test_one_rank_failing_ends_the_others_and_names_the_rank(two_hosts):
    repo, servers = two_hosts
    started = time.time()
    res = dstack("run", "one-fails", cwd=repo, timeout=45, check=False)
    took = time.time() - started
    assert res.code != 0 and took < 30, (took, res.out, res.err)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]
    [job] = json.loads(dstack("jobs", run["name"], "--json", cwd=repo).out)
    assert job["status"] == "failed" and job["exit_code"] == 3, job
    assert "rank 1 of 2 failed" in job["reason"] and "rank 1 on two exited with code 3" in job["reason"]
    assert "rank 1 gives up" in job["reason"]
    assert "rank 0 sleeping" in res.out
    assert not _job_processes(servers[0])  # rank 0's process tree is gone


def test_more_nodes_than_hosts_is_refused_at_once(two_hosts):
    repo, _ = two_hosts
    started = time.time()
    res = dstack("run", "three", cwd=repo, timeout=30, check=False)
    assert res.code == 4 and time.time() - started < 20  # as for a one-node job no runner fits
    [error] = [line for line in res.err.splitlines() if line.startswith("Error:")]
    assert (
        "no runner could ever fit this job — nodes (3 asked, 2 registered SSH hosts fit the job: one, two)"
        in error
    )
    assert "Traceback" not in res.err
    [job] = json.loads(dstack("jobs", "--json", cwd=repo).out)
    assert job["status"] == "failed" and job["runner"] is None  # nothing was reserved or started


def _job(repo: Path, run: str) -> dict:
    [job] = json.loads(dstack("jobs", run, "--json", cwd=repo).out)
    return job


def _job_processes(server) -> list[str]:
    """The job processes left in the host's namespace (its own network, this machine's process table)."""
    left = subprocess.run(["ip", "netns", "pids", server.netns], capture_output=True, text=True, timeout=10)
    cmds = []
    for pid in left.stdout.split():
        try:
            cmds.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return [c for c in cmds if "sleep 120" in c or "job.sh" in c]


def test_busy_hosts_make_the_job_wait_and_stop_ends_every_rank(two_hosts):
    repo, servers = two_hosts
    dstack("run", "hold", "-d", cwd=repo)
    first = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    deadline = time.time() + 30
    while "rank 1 holding" not in dstack("logs", first, "--rank", "1", cwd=repo).out:
        assert time.time() < deadline, _job(repo, first)
        time.sleep(0.3)
    assert all(_job_processes(s) for s in servers)  # a rank on each host
    hosts = {h["name"]: h for h in json.loads(dstack("hosts", "--json", cwd=repo).out)}
    assert hosts["one"]["jobs"] == hosts["two"]["jobs"] == [f"{first}/hold"]

    dstack("run", "next", "-d", cwd=repo)
    second = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    deadline = time.time() + 20
    while _job(repo, second)["status"] != "waiting":
        assert time.time() < deadline, _job(repo, second)
        time.sleep(0.3)
    waiting = _job(repo, second)
    assert (
        waiting["runner"] is None
        and "2 hosts with 2 CPU free are needed; 0 have that now" in waiting["reason"]
    )

    dstack("stop", first, cwd=repo)
    assert not any(_job_processes(s) for s in servers)  # every rank, on both hosts
    follow = dstack("logs", first, "--rank", "1", "-f", cwd=repo, timeout=20)  # ends: the job has
    assert "rank 1 holding" in follow.out
    deadline = time.time() + 30
    while _job(repo, second)["status"] != "done":
        assert time.time() < deadline, _job(repo, second)
        time.sleep(0.3)
    assert "rank 1 next" in dstack("logs", second, "--rank", "1", cwd=repo).out


def test_a_rank_whose_host_is_lost_ends_the_others(two_hosts, monkeypatch):
    monkeypatch.setenv("DSTACK_HOST_LOST_S", "5")
    repo, servers = two_hosts
    dstack("run", "both-sleep", "-d", cwd=repo)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    deadline = time.time() + 30
    while "rank 1 sleeping" not in dstack("logs", run, "--rank", "1", cwd=repo).out:
        assert time.time() < deadline, _job(repo, run)
        time.sleep(0.3)
    servers[1].cut()
    cut_at = time.time()
    try:
        while _job(repo, run)["status"] == "running" and time.time() - cut_at < 45:
            time.sleep(0.5)
        took, job = time.time() - cut_at, _job(repo, run)
    finally:
        servers[1].reconnect()
    assert job["status"] == "failed" and took < 35, (took, job)
    assert "rank 1 on two: host two stopped answering" in job["reason"], job
    assert not _job_processes(servers[0])  # rank 0 was stopped


def test_torchrun_provider_passes_each_rank_its_place(two_hosts):
    repo, servers = two_hosts
    res = dstack("run", "torch", cwd=repo, timeout=60)
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    master = servers[0].host
    want = (
        "torchrun --nnodes 2 --nproc_per_node 1 --node_rank {} --master_addr "
        + master
        + " --master_port 29500"
    )
    assert want.format(0) + " train.py" in res.out
    assert want.format(1) + " train.py" in dstack("logs", run, "--rank", "1", cwd=repo).out


def test_a_rank_that_cannot_be_laid_out_starts_no_rank(two_hosts):
    repo, servers = two_hosts
    (servers[1].dir / "home/.dstack").mkdir(exist_ok=True)
    (servers[1].dir / "home/.dstack/jobs").write_text("not a folder: no job can be laid out on this host\n")
    res = dstack("run", "both-sleep", cwd=repo, timeout=30, check=False)
    assert res.code != 0
    run = json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"]
    job = _job(repo, run)
    assert (
        job["status"] == "failed"
        and "could not start on one+two: rank 1 on two: could not lay out" in job["reason"]
    )
    assert not (servers[0].dir / "home/.dstack/jobs" / job["id"]).exists()  # rank 0's folder went again
    assert not _job_processes(servers[0]) and "sleeping" not in res.out  # and nothing was launched
