"""Slurm clusters as runners, against a real cluster (tests/slurm.py): adding one, running jobs through
sbatch, stopping them with scancel, Slurm's own end reasons."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import copy_example, dstack
from slurm import SlurmCluster

WORKFLOWS = """\
workflows:
  - name: hi
    commands:
      - echo "hi from $(hostname)"
      - mkdir -p out && hostname > out/where
    artifacts: [out]
  - name: sleepy
    resources: {cpu: 1}
    commands:
      - echo started
      - sleep ${{ secs }}
      - echo finished
  - name: forever
    commands:
      - echo tick
      - sleep 600
  - name: slow
    max_duration: 1m
    commands:
      - echo started
      - sleep 600
  - name: pair
    nodes: 2
    commands:
      - python rendezvous.py
  - name: fragile
    retry: 1
    commands:
      - echo "attempt on $(hostname)"
      - sleep 600
  - name: huge
    resources: {cpu: 64}
    commands: [echo never]
"""
RENDEZVOUS = """\
import os, socket, time
rank, me = int(os.environ["DSTACK_NODE_RANK"]), socket.gethostname()
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
assert addr == os.environ["DSTACK_MASTER_NODE_ADDR"] == os.environ["DSTACK_NODES_IPS"].split(",")[0]
assert os.environ["DSTACK_NODES_NUM"] == os.environ["WORLD_SIZE"] == "2" and os.environ["NODE_RANK"] == str(rank)
if rank == 0:
    with socket.create_server((addr, port)) as server:
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            other = conn.recv(100).decode()
            conn.sendall(me.encode())
    print(f"rank 0 on {me} met {other} via {addr}:{port}; ips {os.environ['DSTACK_NODES_IPS']}")
else:
    for _ in range(150):
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            time.sleep(0.2)
    with conn:
        conn.sendall(f"rank {rank} on {me}".encode())
        print(f"rank {rank} on {me} met rank 0 on {conn.recv(100).decode()}")
"""
VARIABLES = "variables:\n  sleepy:\n    secs: 4\n"


def test_fixture_nodes_are_separate_hosts(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("srun", "-N2", "--ntasks-per-node=1", "hostname", timeout=30)
    assert sorted(out.split()) == list(slurm_cluster.nodes)


def add_cluster(repo: Path, cluster: SlurmCluster, *extra: str, name: str = "cluster") -> None:
    login = cluster.login
    dstack("hosts", "add", login.address, "--slurm", "--name", name, "-i", str(login.key), "--yes", *extra,
           cwd=repo, timeout=60)  # fmt: skip
    dstack("hosts", "disable", "local", cwd=repo)


@pytest.fixture
def repo(make_repo, slurm_cluster: SlurmCluster) -> Path:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": WORKFLOWS,
            ".dstack/variables.yaml": VARIABLES,
            "rendezvous.py": RENDEZVOUS,
        }
    )
    add_cluster(repo, slurm_cluster)
    yield repo
    slurm_cluster.run("scancel", "--name=dstack", "-u", "root")  # nothing a failed test left runs on
    for job in slurm_cluster.queue():
        slurm_cluster.run("scancel", job.split()[0])


def last_run(repo: Path) -> dict:
    return json.loads(dstack("runs", "--json", cwd=repo).out)[0]


def jobs_of(repo: Path, run: str) -> list[dict]:
    return json.loads(dstack("jobs", run, "--json", cwd=repo).out)


def test_hosts_add_slurm_lists_partitions_and_nodes(repo: Path, slurm_cluster: SlurmCluster) -> None:
    [host] = [h for h in json.loads(dstack("hosts", "--json", cwd=repo).out) if h["name"] == "cluster"]
    assert host["kind"] == "slurm" and host["status"] == "ready"
    slurm = host["cloud"]["slurm"]
    assert slurm["version"].startswith(("2", "3"))
    [main] = slurm["partitions"]
    assert main["name"] == "main" and main["default"]
    assert sorted(n["name"] for n in main["nodes"]) == list(slurm_cluster.nodes)
    assert {(n["cpus"], n["memory_mib"]) for n in main["nodes"]} == {(2, 2000)}
    assert host["capacity"]["cpus"] == 4 and host["capacity"]["queued"]
    table = dstack("hosts", cwd=repo).out
    assert "slurm" in table and "main: 2/2 nodes free" in table
    assert "main: 2/2 nodes free" in dstack("hosts", "check", "cluster", cwd=repo).err


def test_hosts_add_slurm_errors(make_repo, slurm_cluster: SlurmCluster, sshd) -> None:
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    login = slurm_cluster.login
    res = dstack("hosts", "add", login.address, "--slurm", "--partition", "gpu", "-i", str(login.key), "--yes",
                 cwd=repo, check=False)  # fmt: skip
    assert res.code != 0 and "has no partition 'gpu'" in res.err and "its partitions: main" in res.err
    res = dstack("hosts", "add", login.address, "--partition", "main", cwd=repo, check=False)
    assert res.code != 0 and "--partition is for Slurm clusters" in res.err
    # a plain sshd without SLURM_CONF: sinfo can't reach a controller
    res = dstack("hosts", "add", sshd.address, "--slurm", "--name", "nope", "-i", str(sshd.key), "--yes",
                 cwd=repo, check=False)  # fmt: skip
    assert res.code != 0 and "`sinfo` failed" in res.err


def test_job_runs_through_sbatch_and_is_in_squeue_while_running(
    repo: Path, slurm_cluster: SlurmCluster
) -> None:
    dstack("run", "sleepy", "--secs", "6", "--host", "cluster", "-d", cwd=repo)
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        seen = [line for line in slurm_cluster.queue() if "dstack-" in line and "RUNNING" in line]
        time.sleep(0.3)
    assert seen, "the job never showed in squeue"
    run = last_run(repo)["name"]
    res = dstack("logs", run, "-f", cwd=repo, timeout=60)
    assert "started" in res.out and "finished" in res.out
    assert last_run(repo)["status"] == "done"
    assert slurm_cluster.wait_queue_empty() == []


def test_artifacts_and_dependencies_on_the_shared_filesystem(repo: Path, slurm_cluster: SlurmCluster) -> None:
    res = dstack("run", "hi", "--host", "cluster", cwd=repo, timeout=60)
    run = last_run(repo)["name"]
    log = dstack("logs", run, cwd=repo).out
    assert "hi from dstksl" in log, res.output  # it ran on a compute node, not the login node
    out = dstack("artifacts", "download", run, "-o", str(repo / "got"), cwd=repo)
    assert (repo / "got" / "out" / "where").read_text().strip() in slurm_cluster.nodes, out.output


def test_stop_leaves_squeue_empty(repo: Path, slurm_cluster: SlurmCluster) -> None:
    dstack("run", "forever", "--host", "cluster", "-d", cwd=repo)
    run = last_run(repo)["name"]
    deadline = time.monotonic() + 30
    while "tick" not in dstack("logs", run, cwd=repo).out and time.monotonic() < deadline:
        time.sleep(0.3)
    assert any("RUNNING" in line for line in slurm_cluster.queue())
    dstack("stop", run, cwd=repo, timeout=60)
    assert slurm_cluster.queue() == []
    assert last_run(repo)["status"] == "stopped"


def _block_nodes(cluster: SlurmCluster) -> str:
    """Hold both nodes' CPUs with a job outside dstack (its Slurm id): dstack's next job must queue."""
    return cluster.run(
        "sbatch", "--parsable", "-N2", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 60"
    ).strip()


def _wait_waiting(repo: Path, run: str) -> dict:
    deadline = time.monotonic() + 20
    while (job := jobs_of(repo, run)[0])["status"] != "waiting" and time.monotonic() < deadline:
        time.sleep(0.3)
    return job


def test_queued_job_waits_with_slurms_reason(repo: Path, slurm_cluster: SlurmCluster) -> None:
    # dstack's job must queue in Slurm, not be refused or held back, and show as waiting with squeue's reason
    blocker = _block_nodes(slurm_cluster)
    try:
        dstack("run", "sleepy", "--secs", "1", "--host", "cluster", "-d", cwd=repo)
        run = last_run(repo)["name"]
        job = _wait_waiting(repo, run)
        assert job["status"] == "waiting" and job["runner"] == "cluster", job
        assert re.fullmatch(r"in Slurm's queue: (Resources|Priority)", job["reason"] or ""), job
        table = dstack("jobs", run, cwd=repo).out
        assert "waiting" in table and "in Slurm's queue" in table, table
        assert last_run(repo)["jobs"][0]["status"] == "waiting"
        assert [line for line in slurm_cluster.queue() if "dstack-" in line and "PENDING" in line]
    finally:
        slurm_cluster.run("scancel", blocker)
    res = dstack("logs", run, "-f", cwd=repo, timeout=60)
    assert "finished" in res.out
    [job] = jobs_of(repo, run)
    assert last_run(repo)["status"] == "done" and not job["reason"] and job["status"] == "done"


def test_stop_while_waiting_in_slurms_queue_leaves_squeue_empty(
    repo: Path, slurm_cluster: SlurmCluster
) -> None:
    blocker = _block_nodes(slurm_cluster)
    try:
        dstack("run", "forever", "--host", "cluster", "-d", cwd=repo)
        run = last_run(repo)["name"]
        assert _wait_waiting(repo, run)["status"] == "waiting"
        dstack("stop", run, cwd=repo, timeout=60)
        assert [line for line in slurm_cluster.queue() if "dstack-" in line] == []
        assert jobs_of(repo, run)[0]["status"] == "stopped"
    finally:
        slurm_cluster.run("scancel", blocker)


def test_a_job_that_fits_no_node_is_refused(repo: Path) -> None:
    res = dstack("run", "huge", "--host", "cluster", cwd=repo, check=False, timeout=60)
    assert res.code != 0
    assert "cluster: not enough CPUs (64 asked, 2 there)" in res.err


def _wait(what, timeout: float = 30, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while not (found := what()) and time.monotonic() < deadline:
        time.sleep(step)
    return found


def test_node_failure_ends_the_job_with_node_fail_and_retry_submits_it_again(
    repo: Path, slurm_cluster: SlurmCluster
) -> None:
    dstack("run", "fragile", "--host", "cluster", "-d", cwd=repo)
    run = last_run(repo)["name"]
    assert _wait(lambda: "attempt on" in dstack("logs", run, cwd=repo).out)
    [first] = [line.split() for line in slurm_cluster.queue() if "dstack-" in line]
    node = slurm_cluster.run("squeue", "-h", "-j", first[0], "-o", "%N").strip()
    slurm_cluster.run("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=dstack-test")
    try:
        again = _wait(
            lambda: [j for j in slurm_cluster.queue() if "dstack-" in j and j.split()[0] != first[0]]
        )
        assert again, "dstack did not submit the job again"
        [job] = jobs_of(repo, run)
        assert "attempt 1 failed (Slurm ended it: NODE_FAIL" in (job["reason"] or "") or job["status"] in (
            "waiting",
            "running",
        )
        assert _wait(lambda: dstack("logs", run, cwd=repo).out.count("attempt on") == 2)
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=slurm_cluster.env(),
                       capture_output=True, timeout=30)  # fmt: skip
    dstack("stop", run, cwd=repo, timeout=60)
    assert slurm_cluster.queue() == []


@pytest.mark.timeout(200)
def test_over_max_duration_fails_saying_timeout(repo: Path, slurm_cluster: SlurmCluster) -> None:
    """`--time` counts minutes: a 1-minute limit, and slurmctld checks limits every 30 s (so 60-95 s)."""
    started = time.monotonic()
    res = dstack("run", "slow", "--host", "cluster", cwd=repo, check=False, timeout=150)
    assert res.code != 0
    assert 55 < time.monotonic() - started < 150
    [job] = jobs_of(repo, last_run(repo)["name"])
    assert job["status"] == "failed" and "TIMEOUT" in job["reason"], job
    assert slurm_cluster.queue() == []


@pytest.mark.timeout(240)
def test_digits_example_runs_on_the_cluster(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    digits = copy_example("digits", tmp_path / "digits")
    add_cluster(digits, slurm_cluster)
    res = dstack("run", "evaluate", "--host", "cluster", cwd=digits, timeout=200)
    assert "accuracy" in res.output
    run = last_run(digits)
    assert run["status"] == "done"
    jobs = jobs_of(digits, run["name"])
    assert sorted(j["name"] for j in jobs) == ["evaluate", "prepare", "train"]
    assert {j["runner"] for j in jobs} == {"cluster"}


def test_two_node_job_ranks_meet_through_master_addr(repo: Path, slurm_cluster: SlurmCluster) -> None:
    res = dstack("run", "pair", "--host", "cluster", cwd=repo, timeout=90)
    run = last_run(repo)["name"]
    log = dstack("logs", run, cwd=repo).out
    match = re.search(r"rank 0 on (\S+) met rank 1 on (\S+) via ([\d.]+):(\d+)", log)
    assert match, res.output + log
    assert {match[1], match[2]} == set(slurm_cluster.nodes)  # one rank per node
    [job] = jobs_of(repo, run)
    [rank1] = (slurm_cluster.login.dir / "home").glob(f".dstack/slurm/jobs/{job['id']}/rank-1.log")
    assert f"rank 1 on {match[2]} met rank 0 on {match[1]}" in rank1.read_text()
    assert (
        f"rank 1 on {match[2]} met rank 0 on {match[1]}" in dstack("logs", run, "--rank", "1", cwd=repo).out
    )
    res = dstack("logs", run, "--rank", "2", cwd=repo, check=False)
    assert res.code != 0 and f"run {run} has no job with a rank 2" in res.err


# --- what sinfo/squeue print, read without a cluster (formats as Slurm 20.11 to 23.x print them) ------------

SINFO = """\
home=/home/alice
version=slurm 20.11.9
sacct=1
--- partitions
cpu|up|1-00:00:00|cpu*
gpu|up|infinite|gpu
old|down|infinite|old
--- nodes
c1|cpu|32|128000|(null)|idle
c2|cpu|32|128000|(null)|alloc
g1|gpu|16|64000|gpu:tesla_v100:4(S:0-1)|mix
g2|gpu|16|64000+|gpu:a100:8,mps:100|drain*
o1|old|4|8000|(null)|down*
"""


def _spec(**resources: object):
    from dstack.specs import JobSpec

    return JobSpec.model_validate({"workflow": "w", "resources": resources})


def test_sinfo_output_becomes_partitions_nodes_and_capacity() -> None:
    from dstack.backends.slurm_cluster import SlurmOptions, parse_cluster, parse_gres
    from dstack.scheduler.placement import reserve, shortfall
    from dstack.store.reservation import Hold, Reservation

    assert parse_gres("gpu:a100:4(S:0-1),gpu:2,mps:100") == [("a100", 4), ("", 2)]
    cluster = parse_cluster(SINFO, SlurmOptions(), "alice@login")
    assert cluster.version == "20.11.9" and cluster.sacct and cluster.root == "/home/alice/.dstack/slurm"
    assert [p.name for p in cluster.partitions] == ["cpu", "gpu", "old"]  # the default first
    assert cluster.summary() == "cpu: 1/2 nodes free, gpu: 0/2 nodes free"  # `old` is down
    cap = cluster.capacity()  # g2 is drained and o1 down: neither counts
    assert cap.queued and cap.cpus == 80 and [len(p.parts) for p in cap.parts] == [2, 1]
    assert shortfall(cap, _spec(gpu={"count": 4, "name": "V100"})) is None
    assert shortfall(cap, _spec(gpu={"count": 8})) == "GPUs (8 asked, 4 there)"
    assert shortfall(cap, _spec(cpu=16, nodes=2)) is None  # both cpu nodes
    assert shortfall(cap, _spec(cpu=16, nodes=3)) == "nodes (3 asked, 2 that fit the job there)"  # not across
    assert reserve(cap, [Hold(cpu=1000)], _spec(cpu=32)) == Reservation()  # Slurm queues it: nothing held
    only_gpu = parse_cluster(SINFO, SlurmOptions(partition="gpu"), "alice@login")
    assert shortfall(only_gpu.capacity(), _spec(cpu=32)) == "CPUs (32 asked, 16 there)"


def test_not_a_login_node_and_a_missing_partition_are_one_line_errors() -> None:
    from dstack.backends.slurm_cluster import SlurmOptions, parse_cluster
    from dstack.errors import HostError

    with pytest.raises(HostError, match="alice@box is no Slurm login node: sbatch, squeue not found"):
        parse_cluster("missing=sbatch\nmissing=squeue\n" + SINFO, SlurmOptions(), "alice@box")
    with pytest.raises(HostError, match="has no partition 'big'") as err:
        parse_cluster(SINFO, SlurmOptions(partition="big"), "alice@login")
    assert err.value.hint == "its partitions: cpu, gpu, old"


@pytest.mark.parametrize(
    ("lines", "status", "code", "reason"),
    [
        ("id 7\nsqueue PENDING|Priority", "running", None, "in Slurm's queue: Priority"),
        ("id 7\nsqueue PENDING|None", "running", None, "in Slurm's queue: PENDING"),
        ("id 7\nsqueue RUNNING|None", "running", None, None),
        ("id 7\nsqueue COMPLETING|None\nexit 0", "running", None, None),
        ("id 7\nsqueue COMPLETED|None\nexit 0", "exited", 0, None),
        ("id 7\nsqueue FAILED|NonZeroExitCode\nexit 3", "exited", 3, None),
        ("id 7\nsqueue TIMEOUT|TimeLimit\nexit 143", "exited", 143, "Slurm ended it: TIMEOUT"),
        ("id 7\nsqueue \nsacct CANCELLED by 0", "exited", 1, "Slurm ended it: CANCELLED"),
        ("id 7\nsqueue NODE_FAIL|None", "lost", None, "Slurm ended it: NODE_FAIL"),
        ("id 7\nsqueue PREEMPTED|None", "lost", None, "Slurm ended it: PREEMPTED"),
        ("id 7\nsqueue \nexit 0", "exited", 0, None),  # purged from squeue, no accounting
        ("id 7\nsqueue ", "lost", None, "Slurm no longer knows job 7"),
        ("nodir", "lost", None, "the job's folder on the cluster is gone"),
    ],
)
def test_slurm_states_become_job_states(
    lines: str, status: str, code: int | None, reason: str | None
) -> None:
    from dstack.backends.slurm import job_state

    state = job_state(lines)
    assert (state.status, state.exit_code) == (status, code)
    assert state.waiting == (state.reason or "").startswith("in Slurm's queue")  # shown as `waiting`
    assert (state.reason or "").startswith(reason or "") and (reason is not None) == (
        state.reason is not None
    )


def test_sbatch_options_come_from_resources_max_duration_and_the_cluster() -> None:
    from dstack.backends.base import JobContext
    from dstack.backends.slurm import sbatch_args
    from dstack.backends.slurm_cluster import SlurmOptions, parse_cluster
    from dstack.store.objects import Manifest

    cluster = parse_cluster(SINFO, SlurmOptions(account="lab", qos="high", sbatch_args=["--exclusive"]), "x")
    spec = _spec(cpu=1.5, memory_mib=4096, gpu={"count": 2, "name": "v100"}, nodes=1)
    spec.max_duration_s = 90
    ctx = JobContext("j1", "run-1", spec, Manifest(entries=[]), ".", [], None)  # type: ignore[arg-type]
    args = sbatch_args(cluster, ctx, "/home/alice/.dstack/slurm/jobs/j1")
    assert args == [
        "--job-name=dstack-run-1-w",
        "--output=/home/alice/.dstack/slurm/jobs/j1/log",
        "--chdir=/home/alice/.dstack/slurm/jobs/j1",
        "--open-mode=append",
        "--no-requeue",
        "--export=ALL,DSTACK_GPUS_PER_NODE=2",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--mem=4096M",
        "--gres=gpu:tesla_v100:2",
        "--time=2",
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
        "--exclusive",
    ]


def test_with_an_s3_store_the_cluster_fetches_and_uploads_itself_and_a_second_run_ships_nothing(
    repo: Path, slurm_cluster: SlurmCluster, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
    dstack_home: Path,
) -> None:  # fmt: skip
    from s3server import ACCESS_KEY, SECRET_KEY

    s3 = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    url = s3.new_url()
    (repo / "unique.txt").write_text(url)  # an object the cluster's cache has never seen
    dstack("config", "storage", url, "--endpoint-url", s3.endpoint_url, "--region", "us-east-1", cwd=repo)
    dstack("run", "hi", "--host", "cluster", cwd=repo, timeout=90)
    run = last_run(repo)["name"]
    log = dstack("logs", run, cwd=repo).out
    assert f"fetched by cluster from {url} directly" in log, log
    orchestrator_log = "".join(p.read_text() for p in (dstack_home / "runs").glob("*.log"))
    assert f"uploaded by the host to {url}" in orchestrator_log, orchestrator_log[-2000:]
    dstack("artifacts", "download", run, "-o", str(repo / "got"), cwd=repo)
    assert (repo / "got" / "out" / "where").read_text().strip() in slurm_cluster.nodes
    dstack("run", "hi", "--host", "cluster", "--force", cwd=repo, timeout=90)  # the code is in the cache
    assert "dstack: inputs: all in cluster's cache" in dstack("logs", last_run(repo)["name"], cwd=repo).out
