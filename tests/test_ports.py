"""Ports of jobs reached on localhost: free ports on the runner, forwards through the host's SSH connection
(real sshd in its own network namespace, so only a forward can reach its 127.0.0.1), `attach`, `ssh`,
containers publishing on 127.0.0.1 only, and `inactivity:`."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import dstack
from sshd import SSHDFactory, SSHServer

SERVE = 'python3 -m http.server --bind "${DSTACK_BIND:-127.0.0.1}" "$PORT_0"'
URL = re.compile(r"^web: (http://localhost:(\d+))(\S*)")  # the CLI's line, not the job's


class Cli:
    """`dstack ARGS` running in the background; its stderr lines are read as they come."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dstack", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 30) -> re.Match[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            m = rx.search(line)
            if m:
                return m
        pytest.fail(f"no {rx.pattern!r} within {timeout}s; output:\n" + "\n".join(self.seen))

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(15)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def repo_with(make_repo, body: str, files: dict[str, str] | None = None) -> Path:
    return make_repo({".dstack/workflows.yaml": "workflows:\n" + body, **(files or {})})


def last_run(repo: Path) -> dict:
    return json.loads(dstack("runs", "--json", cwd=repo).out)[0]


def job_row(repo: Path, run: str) -> dict:
    from dstack.store.state import open_state

    with open_state() as state:
        job = state.jobs(state.run(run).id)[0]
        reserved = job.reserved.to_json() if job.reserved is not None else None
        return {"status": job.status, "reason": job.reason, "reserved": reserved, "runner": job.runner}


def wait_status(repo: Path, run: str, statuses: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = job_row(repo, run)
        if row["status"] in statuses:
            return row
        time.sleep(0.2)
    pytest.fail(f"job of {run} not in {statuses} within {timeout}s: {row}")


def stop_runs(repo: Path) -> None:
    """Stop what a test left running (also when it failed half-way)."""
    for run in json.loads(dstack("runs", "--json", cwd=repo).out):
        if run["status"] in ("pending", "running"):
            dstack("stop", run["name"], cwd=repo, check=False)


def add_host(server: SSHServer, repo: Path, name: str) -> None:
    dstack("hosts", "add", server.address, "--name", name, "-i", str(server.key), "--yes", cwd=repo)


WEB = f"""\
  - name: web
    ports: 1
    commands:
      - echo hello > index.html
      - {SERVE}
"""


def test_local_port_url_attach_after_kill(make_repo) -> None:
    """On this machine: the URL is printed once the server answers; `attach` after the CLI was killed."""
    repo = repo_with(make_repo, WEB)
    cli = Cli("run", "web", cwd=repo)
    try:
        m = cli.wait_for(URL)
        assert get(m.group(1) + "/index.html") == (200, "hello\n")
        run = last_run(repo)["name"]
        port = job_row(repo, run)["reserved"]["ports"][0]
        assert int(m.group(2)) == port  # no forward: the job's own port
    finally:
        cli.kill()
    assert job_row(repo, run)["status"] == "running"  # killing the CLI never stops the job
    again = Cli("attach", run, cwd=repo)
    try:
        m2 = again.wait_for(URL)
        assert get(m2.group(1) + "/index.html")[0] == 200
        assert again.interrupt() == 130  # Ctrl-C detaches
        again.wait_for(f"`dstack attach {run}` re-opens its ports.")
    finally:
        again.kill()
    assert job_row(repo, run)["status"] == "running"
    dstack("stop", run, cwd=repo)
    res = dstack("attach", run, cwd=repo, check=False)
    assert res.code == 4 and f"run {run} is not running (it is stopped)" in res.err


def test_fixed_port_is_never_given_to_two_jobs(make_repo) -> None:
    from dstack.ports import PORT_RANGE, parse_tcp_table, read_local_tcp_table

    taken = {p for p, _ in parse_tcp_table(read_local_tcp_table())}
    port = next(p for p in range(PORT_RANGE[1], PORT_RANGE[1] + 500) if p not in taken)
    repo = repo_with(make_repo, f"  - name: fixed\n    ports: [{port}]\n    commands: [sleep 30]\n")
    dstack("run", "fixed", "-d", cwd=repo)
    first = last_run(repo)["name"]
    wait_status(repo, first, ("running",))
    dstack("run", "fixed", "-d", "--force", cwd=repo)
    second = last_run(repo)["name"]
    row = wait_status(repo, second, ("waiting",))
    assert job_row(repo, first)["reserved"]["ports"] == [port]
    assert row["reserved"] is None
    dstack("stop", first, cwd=repo)
    assert wait_status(repo, second, ("running",))["reserved"]["ports"] == [port]
    dstack("stop", second, cwd=repo)


def test_inactivity_stops_an_idle_job(make_repo) -> None:
    repo = repo_with(make_repo, WEB.replace("    ports: 1\n", "    ports: 1\n    inactivity: 3s\n"))
    res = dstack("run", "web", "-d", cwd=repo)
    run = last_run(repo)["name"]
    assert f"`dstack attach {run}` opens its ports on localhost." in res.err
    row = wait_status(repo, run, ("stopped",), timeout=30)
    assert row["reason"] == "stopped after 3s without connections"
    deadline = time.monotonic() + 10
    while last_run(repo)["status"] in ("running", "pending") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last_run(repo)["status"] == "stopped"  # stopped, not failed
    assert "stopped after 3s without connections" in (last_run(repo)["reason"] or "")
    assert "stopped after 3s without connections" in dstack("jobs", run, cwd=repo).out


def test_inactivity_must_be_a_duration(make_repo) -> None:
    repo = repo_with(make_repo, "  - name: w\n    inactivity: soon\n    commands: [true]\n")
    res = dstack("run", "w", cwd=repo, check=False)
    assert res.code == 2
    assert "workflows.yaml:3: 'inactivity' 'soon' is not a duration" in res.err


def test_container_port_is_published_on_loopback_only(make_repo, python_image: str) -> None:
    body = f"  - name: web\n    image: {python_image}\n    ports: 1\n    commands:\n      - {SERVE}\n"
    repo = repo_with(make_repo, body)
    cli = Cli("run", "web", cwd=repo)
    try:
        m = cli.wait_for(URL, timeout=60)
        assert get(m.group(1) + "/")[0] == 200
        run = last_run(repo)
        name = "dstack-" + run["jobs"][0]["id"]
        ports = json.loads(
            subprocess.run(
                ["docker", "inspect", "-f", "{{json .HostConfig.PortBindings}}", name],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        )
        assert [b["HostIp"] for v in ports.values() for b in v] == ["127.0.0.1"]
        assert (
            dstack("ssh", run["name"], "--", "pwd", cwd=repo).out.strip() == "/workflow"
        )  # in the container
    finally:
        cli.kill()
        stop_runs(repo)


def test_container_port_on_an_ssh_host(
    sshd_factory: SSHDFactory, make_repo, python_image: str, ssh_pool
) -> None:
    """A loopback sshd host shares this machine's ports, so the forward takes another local port: a URL
    whose port is not the container's proves the request went over SSH to the host's published port."""
    server = sshd_factory.loopback(env={"DOCKER_HOST": os.environ["DOCKER_HOST"]})  # the test's engine
    body = f"  - name: web\n    image: {python_image}\n    ports: 1\n    commands:\n      - {SERVE}\n"
    repo = repo_with(make_repo, body)
    add_host(server, repo, "dock")
    cli = Cli("run", "web", "--host", "dock", cwd=repo)
    try:
        m = cli.wait_for(URL, timeout=60)
        run = last_run(repo)["name"]
        assert int(m.group(2)) != job_row(repo, run)["reserved"]["ports"][0]
        assert get(m.group(1) + "/")[0] == 200
    finally:
        cli.kill()
        stop_runs(repo)


@pytest.fixture
def netns_host(sshd_factory: SSHDFactory, make_repo, ssh_pool) -> tuple[SSHServer, Path]:
    server = sshd_factory.netns()
    repo = repo_with(make_repo, WEB)
    add_host(server, repo, "box")
    return server, repo


def _session_pids(server: SSHServer) -> list[int]:
    """sshd's per-connection processes (children of the listening sshd)."""
    assert server.proc is not None
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server.proc.pid:
            pids.append(int(stat.parent.name))
    return pids


def test_forward_through_ssh_to_a_host_in_its_own_namespace(netns_host) -> None:
    """The server listens on the namespace's 127.0.0.1: only the forward can reach it from here; a dropped
    SSH connection (sshd's session killed, or the link cut for a while) comes back by itself."""
    server, repo = netns_host
    cli = Cli("run", "web", "--host", "box", cwd=repo)
    try:
        m = cli.wait_for(URL, timeout=60)
        url = m.group(1)
        assert get(url + "/index.html") == (200, "hello\n")
        run = last_run(repo)["name"]
        row = job_row(repo, run)
        assert row["runner"] == "box" and row["reserved"]["ports"] == [int(m.group(2))]

        for pid in _session_pids(server):  # every SSH connection to the host drops
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert get(url + "/index.html") == (200, "hello\n")

        server.cut()
        time.sleep(1)
        server.reconnect()
        assert get(url + "/index.html", timeout=30) == (200, "hello\n")

        res = dstack("ssh", run, "--", "pwd", cwd=repo)
        assert res.out.strip().endswith(f"/jobs/{run_job(repo, run)}/work")
        assert (Path(res.out.strip()) / "index.html").read_text() == "hello\n"  # same filesystem here
    finally:
        cli.kill()
        stop_runs(repo)


def run_job(repo: Path, run: str) -> str:
    return json.loads(dstack("runs", "--json", cwd=repo).out)[0]["jobs"][0]["id"]


def test_ssh_on_the_local_runner(make_repo) -> None:
    repo = repo_with(
        make_repo, "  - name: w\n    working_dir: sub\n    commands: [sleep 30]\n", {"sub/f": "x"}
    )
    dstack("run", "w", "-d", cwd=repo)
    run = last_run(repo)["name"]
    wait_status(repo, run, ("running",))
    res = dstack("ssh", run, "--", "sh", "-c", 'pwd; echo "$DSTACK_RUN"; cat f', cwd=repo)
    lines = res.out.split()
    assert lines[0].endswith("/work/sub") and lines[1:] == [run, "x"]
    dstack("stop", run, cwd=repo)
    res = dstack("ssh", run, cwd=repo, check=False)
    assert res.code == 4 and f"run {run} has no running job" in res.err


def test_tcp_table_sees_listeners_and_connections() -> None:
    import socket

    from dstack.ports import established, parse_tcp_table, read_local_tcp_table

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert (port, "0A") in parse_tcp_table(read_local_tcp_table())
        assert established(read_local_tcp_table(), [port]) == 0
        with socket.create_connection(("127.0.0.1", port)):
            peer, _ = srv.accept()
            with peer:
                assert established(read_local_tcp_table(), [port]) == 1  # the server's end, not the client's


def test_forward_listens_on_loopback_only(sshd: SSHServer, ssh_pool) -> None:
    import socket

    from dstack.ssh.config import SSHTarget
    from dstack.ssh.connection import get_connection
    from dstack.ssh.forward import Forward

    target = SSHTarget(sshd.host, sshd.host, sshd.port, sshd.user, (str(sshd.key),))
    get_connection(target, accept=lambda fp: True)
    with socket.socket() as srv:  # a server on the host's 127.0.0.1 (this machine: a loopback sshd)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        fwd = Forward(target, srv.getsockname()[1])
        try:
            assert fwd.local_port != srv.getsockname()[1]  # the same machine: another port, never a loop
            assert fwd._sock.getsockname()[0] == "127.0.0.1"
            with socket.create_connection(("127.0.0.1", fwd.local_port), timeout=10) as c:
                peer, _ = srv.accept()
                with peer:
                    c.sendall(b"ping")
                    assert peer.recv(4) == b"ping"
                    peer.sendall(b"pong")
                    assert c.recv(4) == b"pong"
        finally:
            fwd.close()


def test_a_host_that_refuses_forwarding_is_named(sshd_factory: SSHDFactory, make_repo, ssh_pool) -> None:
    server = sshd_factory.loopback()
    config = server.dir / "sshd_config"
    config.write_text(config.read_text().replace("AllowTcpForwarding yes", "AllowTcpForwarding no"))
    server.stop()
    server.start()
    repo = repo_with(make_repo, WEB)
    add_host(server, repo, "strict")
    cli = Cli("run", "web", "--host", "strict", cwd=repo)
    try:
        cli.wait_for(r"^web: sshd on strict refuses port forwarding: set `AllowTcpForwarding yes` there$")
    finally:
        cli.kill()
        stop_runs(repo)


def test_a_held_connection_keeps_an_environment_running(make_repo) -> None:
    import socket

    repo = repo_with(make_repo, WEB.replace("    ports: 1\n", "    ports: 1\n    inactivity: 3s\n"))
    cli = Cli("run", "web", cwd=repo)
    try:
        m = cli.wait_for(URL)
        run = last_run(repo)["name"]
        with socket.create_connection(("127.0.0.1", int(m.group(2))), timeout=10):
            time.sleep(6)  # twice the limit, with a connection open all along
            assert job_row(repo, run)["status"] == "running"
        assert wait_status(repo, run, ("stopped",), timeout=20)["reason"] == (
            "stopped after 3s without connections"
        )
    finally:
        cli.kill()


def test_inactivity_forms_and_the_dev_environment_default(make_repo) -> None:
    from dstack.workflows import load_project

    repo = repo_with(
        make_repo,
        "  - name: lab\n    provider: lab\n"
        "  - name: lab-on\n    provider: lab\n    inactivity: off\n"
        "  - name: job\n    ports: 1\n    inactivity: 90m\n    commands: [true]\n"
        "  - name: plain\n    commands: [true]\n",
    )
    project = load_project(repo)
    assert project.job_spec("lab").inactivity_s == 3600  # dev environments stop after an idle hour
    assert project.job_spec("lab-on").inactivity_s == 0
    assert project.job_spec("job").inactivity_s == 90 * 60
    assert project.job_spec("plain").inactivity_s is None


def test_counted_ports_held_by_a_job_go_to_no_other(make_repo, monkeypatch: pytest.MonkeyPatch) -> None:
    """With two ports to choose from, two jobs that listen on neither still get one each: the first one's
    port is held in the state, not just in use on the host."""
    from dstack.ports import parse_tcp_table, read_local_tcp_table

    taken = {p for p, _ in parse_tcp_table(read_local_tcp_table())}
    lo = next(p for p in range(40000, 41000) if p not in taken and p + 1 not in taken)
    monkeypatch.setenv("DSTACK_PORT_RANGE", f"{lo}-{lo + 1}")
    repo = repo_with(make_repo, "  - name: idle\n    ports: 1\n    commands: [sleep 30]\n")
    names = []
    for _ in range(2):
        dstack("run", "idle", "-d", "--force", cwd=repo)
        names.append(last_run(repo)["name"])
    try:
        got = [wait_status(repo, n, ("running",))["reserved"]["ports"] for n in names]
        assert sorted(p for ports in got for p in ports) == [lo, lo + 1]
    finally:
        stop_runs(repo)
