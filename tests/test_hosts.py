"""Hosts and the SSH runner against real sshd servers: add/check/remove, probing, jobs run detached there."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import (  # noqa: F401  (fixtures)
    SSHDFactory,
    SSHServer,
    ssh_keys_fixture,
    ssh_pool_fixture,
    sshd_factory_fixture,
    sshd_fixture,
)

from dstack import hosts
from dstack.backends.base import Capacity, DependencyArtifacts, GpuInfo, JobContext
from dstack.backends.ssh import SSHRunner
from dstack.errors import HostError, NotFoundError, UsageError
from dstack.specs import ArtifactSpec, JobSpec
from dstack.ssh.connection import close_all, known_hosts_path
from dstack.store.objects import LocalObjectStore, ObjectStore
from dstack.store.state import State

pytestmark = pytest.mark.usefixtures("ssh_pool")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    with State(tmp_path / "state.sqlite") as st:
        yield st


def add(state: State, server: SSHServer, name: str = "box", **kw) -> hosts.Host:
    return hosts.add_host(
        state.db,
        server.address,
        name=name,
        identity=str(server.key),
        accept=kw.pop("accept", lambda fp: True),
        **kw,
    )


# --- probing --------------------------------------------------------------------------------------------

NVIDIA = "gpu=0, Tesla V100-SXM2-16GB, 16160\ngpu=1, NVIDIA A100-SXM4-80GB, 81920\n"


def test_parse_probe_reads_gpus_and_the_rest() -> None:
    cap = hosts.parse_probe(
        "cpus=8\nmemory_kib=16384000\ndisk_free_kib=2048000\nos=Debian GNU/Linux 12 (bookworm)\narch=x86_64\n"
        "python=3.11.2\ndocker=1\nrsync=0\nhome=/home/alice\n" + NVIDIA
    )
    assert cap.cpus == 8 and cap.memory_mib == 16000 and cap.disk_free_mib == 2000
    assert cap.gpus == [GpuInfo(0, "Tesla V100-SXM2-16GB", 16160), GpuInfo(1, "NVIDIA A100-SXM4-80GB", 81920)]
    assert cap.docker and not cap.rsync and cap.python == "3.11.2"
    assert cap.os == "Debian GNU/Linux 12 (bookworm) (x86_64)"
    with pytest.raises(HostError, match="could not read the host's CPUs"):
        hosts.parse_probe("nonsense")


def test_probe_local_matches_this_machine() -> None:
    cap = hosts.probe_local()
    assert cap.cpus == os.cpu_count() and cap.memory_mib > 0 and cap.disk_free_mib > 0


# --- add / list / check / remove --------------------------------------------------------------------------


def test_add_host_pins_probes_and_stores(state: State, sshd: SSHServer) -> None:
    seen: list[str] = []

    def accept(fp: str) -> bool:
        seen.append(fp)
        return True

    host = add(state, sshd, accept=accept)
    assert seen and seen[0].startswith("SHA256:")
    assert (host.name, host.kind, host.hostname, host.port, host.user) == (
        "box",
        "ssh",
        "127.0.0.1",
        sshd.port,
        sshd.user,
    )
    assert host.host_key and host.host_key.startswith("ssh-ed25519 ")
    assert host.capacity is not None and host.capacity.cpus == os.cpu_count() and host.capacity.python
    assert host.capacity.rsync
    listed = hosts.list_hosts(state.db)
    assert [h.name for h in listed] == ["local", "box"]
    assert listed[1].capacity == host.capacity and listed[1].status == "ready"
    assert listed[0].kind == "local" and listed[0].capacity is not None
    with pytest.raises(UsageError, match="a host named 'box' already exists"):
        add(state, sshd)
    with pytest.raises(UsageError, match="'local' is taken"):
        add(state, sshd, name="local")


def test_add_refuses_an_unconfirmed_key(state: State, sshd: SSHServer) -> None:
    with pytest.raises(HostError, match="is not pinned"):
        add(state, sshd, accept=lambda fp: False)
    assert hosts.list_hosts(state.db, include_local=False) == []


def test_add_with_wrong_key_or_port_is_a_one_line_error(
    state: State, sshd: SSHServer, ssh_keys: dict[str, Path]
) -> None:
    with pytest.raises(HostError, match=f"cannot log in to box as {sshd.user}: key refused"):
        hosts.add_host(
            state.db, sshd.address, name="box", identity=str(ssh_keys["stranger"]), accept=lambda fp: True
        )
    with pytest.raises(HostError, match="cannot reach box at 127.0.0.1:1: connection refused"):
        hosts.add_host(state.db, f"{sshd.user}@127.0.0.1:1", name="box", accept=lambda fp: True)
    assert hosts.list_hosts(state.db, include_local=False) == []


def test_check_marks_unreachable_and_ready_again(state: State, sshd_factory: SSHDFactory) -> None:
    server = sshd_factory.loopback()
    add(state, server)
    close_all()
    server.stop()
    checked = hosts.check_host(state.db, "box")
    assert checked.status == "unreachable" and "connection refused" in (checked.last_error or "")
    server.start()
    checked = hosts.check_host(state.db, "box")
    assert checked.status == "ready" and checked.last_error is None


def test_remove_unpins_so_a_reinstalled_host_can_be_added_again(
    state: State, sshd_factory: SSHDFactory
) -> None:
    server = sshd_factory.loopback()
    add(state, server)
    close_all()
    server.new_host_key()
    checked = hosts.check_host(state.db, "box")
    assert checked.status == "unreachable" and "has changed" in (checked.last_error or "")
    assert "dstack hosts remove box" in (checked.last_error or "")
    hosts.remove_host(state.db, "box")
    assert f"{server.port}" not in known_hosts_path().read_text()
    again = add(state, server)
    assert again.status == "ready"
    with pytest.raises(NotFoundError, match="no host named 'nope'"):
        hosts.remove_host(state.db, "nope")
    with pytest.raises(UsageError, match="can't be removed"):
        hosts.remove_host(state.db, "local")


def test_enable_and_disable(state: State, sshd: SSHServer) -> None:
    add(state, sshd)
    assert hosts.set_enabled(state.db, "box", False).status == "disabled"
    assert hosts.set_enabled(state.db, "box", True).status == "ready"
    assert hosts.set_enabled(state.db, "local", False).status == "disabled"
    assert state.setting("local.enabled") == "0"
    assert hosts.get(state.db, "local").enabled is False
    assert hosts.set_enabled(state.db, "local", True).enabled
    with pytest.raises(NotFoundError, match="known hosts: local, box"):
        hosts.set_enabled(state.db, "gpu", True)


def test_host_from_ssh_config_alias(state: State, sshd: SSHServer) -> None:
    ssh_dir = Path(os.path.expanduser("~")) / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    (ssh_dir / "config").write_text(
        f"Host gpu-box\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.key}\n"
    )
    host = hosts.add_host(state.db, "gpu-box", accept=lambda fp: True)
    assert (host.name, host.hostname, host.port, host.identity_file) == (
        "gpu-box",
        "127.0.0.1",
        sshd.port,
        str(sshd.key),
    )
    close_all()
    (ssh_dir / "config").unlink()  # the row holds what the config said
    assert hosts.check_host(state.db, "gpu-box").status == "ready"


# --- the SSH runner ---------------------------------------------------------------------------------------


def make_ctx(
    tmp_path: Path,
    job_id: str,
    commands: list[str],
    artifacts: list[str] | None = None,
    deps: list[DependencyArtifacts] | None = None,
    store: ObjectStore | None = None,
) -> JobContext:
    from dstack.artifacts import manifest_from_path

    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "project" / "data").mkdir(parents=True)
        (repo / "project" / "train.py").write_text("print('training')\n")
        (repo / "project" / "data" / "big.bin").write_bytes(os.urandom(300_000))
        (repo / "README").write_text("hello\n")
    store = store or LocalObjectStore(tmp_path / "store")
    spec = JobSpec(
        workflow="train", commands=commands, artifacts=[ArtifactSpec(path=p) for p in artifacts or []]
    )
    return JobContext(
        job_id=job_id,
        run_name="run-1",
        spec=spec,
        code=manifest_from_path(repo, store),
        working_subdir="project",
        dependencies=deps or [],
        store=store,
    )


def wait_exit(runner: SSHRunner, job_id: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = runner.poll_job(job_id)
        if state.status != "running":
            return state
        time.sleep(0.05)
    raise AssertionError(f"{job_id} still running after {timeout}s")


@pytest.fixture
def runner(state: State, sshd: SSHServer, tmp_path: Path) -> SSHRunner:
    host = add(state, sshd)
    return SSHRunner.for_host(host, root=str(tmp_path / "remote"))


def test_runner_runs_a_job_and_brings_artifacts_back(runner: SSHRunner, tmp_path: Path) -> None:
    ctx = make_ctx(
        tmp_path,
        "job1",
        [
            "python3 train.py",
            "echo job=$DSTACK_JOB run=$RUN_NAME",
            "pwd",
            "mkdir -p out && echo model > out/model.txt && ln -s model.txt out/latest",
            f"echo abs > {tmp_path}/abs.txt",
        ],
        artifacts=["out", f"{tmp_path}/abs.txt", "never"],
    )
    runner.start_job(ctx)
    assert runner.last_ship is not None and runner.last_ship.objects_sent == 3
    state = wait_exit(runner, "job1")
    assert (state.status, state.exit_code) == ("exited", 0)
    log = runner.read_log("job1", 0).decode()
    assert log.splitlines()[:2] == ["training", "job=job1 run=run-1"]
    assert log.splitlines()[2] == f"{runner.root}/jobs/job1/work/project"
    assert runner.read_log("job1", 9) == log.encode()[9:]
    manifest, missing = runner.collect_artifacts("job1", ctx.spec, ctx.store)
    assert missing == ["never"]
    by_path = {e.path: e for e in manifest.entries}
    assert set(by_path) == {"out/model.txt", "out/latest", str(tmp_path / "abs.txt").lstrip("/")}
    assert by_path["out/latest"].is_symlink
    assert ctx.store.get_bytes(by_path["out/model.txt"].digest) == b"model\n"
    jd = Path(runner.job_dir("job1"))
    runner.cleanup_job("job1", keep=True)
    assert (jd / "work").exists()
    runner.cleanup_job("job1")
    assert not (jd / "work").exists() and (jd / "log").exists()

    # the second job of the same repo sends nothing; its dependency's artifacts come from the host's cache
    dep = DependencyArtifacts("train", manifest)
    ctx2 = make_ctx(tmp_path, "job2", ["cat out/model.txt", "cat ../README"], deps=[dep], store=ctx.store)
    runner.start_job(ctx2)
    assert runner.last_ship.objects_sent == 0 and runner.last_ship.bytes_sent == 0
    assert wait_exit(runner, "job2").exit_code == 0
    assert runner.read_log("job2", 0) == b"model\nhello\n"


def test_runner_reports_failure_and_stops_jobs(runner: SSHRunner, tmp_path: Path) -> None:
    runner.start_job(make_ctx(tmp_path, "bad", ["echo before", "false", "echo after"]))
    state = wait_exit(runner, "bad")
    assert (state.status, state.exit_code) == ("exited", 1)
    assert runner.read_log("bad", 0) == b"before\n"
    runner.start_job(make_ctx(tmp_path, "long", ["echo started", "sleep 600"]))
    assert runner.poll_job("long").status == "running"
    runner.stop_job("long")
    state = runner.poll_job("long")
    assert state.status in ("exited", "lost") and state.exit_code in (143, None)


def test_runner_reattaches_from_a_new_process_state(runner: SSHRunner, state: State, tmp_path: Path) -> None:
    runner.start_job(make_ctx(tmp_path, "slow", ["for i in $(seq 1 6); do echo tick $i; sleep 0.2; done"]))
    first = b""
    while not first:
        first = runner.read_log("slow", 0)
    close_all()  # the CLI exits
    again = SSHRunner.for_runner(state, "box")
    again._root = runner.root
    log = bytearray(first)
    while True:
        status = again.poll_job("slow")
        log += again.read_log("slow", len(log))
        if status.status != "running":
            log += again.read_log("slow", len(log))
            break
        time.sleep(0.05)
    assert log.decode().splitlines() == [f"tick {i}" for i in range(1, 7)]


def test_runner_polls_many_jobs_in_one_command(runner: SSHRunner, tmp_path: Path) -> None:
    runner.start_job(make_ctx(tmp_path, "quick", ["exit 3"]))
    runner.start_job(make_ctx(tmp_path, "slow", ["sleep 30"]))
    wait_exit(runner, "quick")
    states = runner.poll_jobs(["quick", "slow", "never"])
    assert (states["quick"].status, states["quick"].exit_code) == ("exited", 3)
    assert states["slow"].status == "running"
    assert states["never"].status == "lost" and "is gone from the host" in (states["never"].reason or "")
    runner.stop_job("slow")


def test_runner_probe(runner: SSHRunner) -> None:
    cap = runner.probe()
    assert isinstance(cap, Capacity) and cap.cpus > 0


# --- hosts in their own network namespaces -------------------------------------------------------------


def test_a_host_that_stops_answering_is_noticed_and_its_job_survives(
    state: State, sshd_factory: SSHDFactory, tmp_path: Path
) -> None:
    one, two = sshd_factory.netns(), sshd_factory.netns()
    assert one.host != two.host
    add(state, one, name="one")
    add(state, two, name="two")
    r1 = SSHRunner.for_runner(state, "one")
    r2 = SSHRunner.for_runner(state, "two")
    r1._root, r2._root = str(tmp_path / "r1"), str(tmp_path / "r2")
    r1.start_job(make_ctx(tmp_path, "j1", ["for i in $(seq 1 40); do echo $i; sleep 0.1; done"]))
    r2.start_job(make_ctx(tmp_path, "j2", ["echo two"]))
    assert r1.poll_job("j1").status == "running"
    one.cut()
    try:
        started = time.monotonic()
        with pytest.raises(HostError, match="one stopped answering"):
            r1.poll_job("j1")
        assert time.monotonic() - started < 30
        assert wait_exit(r2, "j2").exit_code == 0  # the other host is unaffected
        checked = hosts.check_host(state.db, "one")
        assert checked.status == "unreachable" and "cannot reach one" in (checked.last_error or "")
    finally:
        one.reconnect()
    state_after = wait_exit(r1, "j1", timeout=60)  # a fresh connection; the job went on meanwhile
    assert state_after.exit_code == 0
    assert r1.read_log("j1", 0).decode().split() == [str(i) for i in range(1, 41)]
    assert hosts.check_host(state.db, "one").status == "ready"
