"""dstack.ssh against real sshd servers: config resolution, pinning, errors, the pool, shipping, processes."""

from __future__ import annotations

import json
import os
import time
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

from dstack.errors import HostError, RemoteCommandError, UsageError
from dstack.ssh import process, transfer
from dstack.ssh.config import parse_address, resolve_target
from dstack.ssh.connection import Connection, close_all, get_connection, known_hosts_path, pinned_key

pytestmark = pytest.mark.usefixtures("ssh_pool")


def yes(seen: list[str] | None = None):
    def accept(fp: str) -> bool:
        if seen is not None:
            seen.append(fp)
        return True

    return accept


def connect(server: SSHServer, accept=None, **kw) -> Connection:
    return get_connection(
        resolve_target(server.address, identity=str(server.key), **kw), name="box", accept=accept
    )


# --- config -------------------------------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("alice@gpu-box:2222") == ("alice", "gpu-box", 2222)
    assert parse_address("gpu-box") == (None, "gpu-box", None)
    assert parse_address("bob@[::1]:22") == ("bob", "::1", 22)
    with pytest.raises(UsageError, match="port must be a number"):
        parse_address("alice@box:http")
    with pytest.raises(UsageError, match="empty user"):
        parse_address("@box")


def test_resolve_through_ssh_config(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        "Host gpu\n  HostName 10.1.2.3\n  Port 2200\n  User alice\n  IdentityFile ~/.ssh/gpu_key\n"
        "  ProxyJump bastion\nHost *\n  User carol\n"
    )
    target = resolve_target("gpu", config_path=config)
    assert (target.hostname, target.port, target.user, target.proxy_jump) == (
        "10.1.2.3",
        2200,
        "alice",
        "bastion",
    )
    assert target.identity_files == (os.path.expanduser("~/.ssh/gpu_key"),)
    typed = resolve_target("bob@gpu:22", identity="/k", config_path=config)
    assert (typed.user, typed.port, typed.identity_files[0]) == ("bob", 22, "/k")
    other = resolve_target("other", config_path=config)
    assert (other.hostname, other.user, other.port, other.proxy_jump) == ("other", "carol", 22, None)


# --- connecting and pinning ---------------------------------------------------------------------------


def test_first_connection_pins_the_key_then_reuses_one_connection(sshd: SSHServer) -> None:
    seen: list[str] = []
    conn = connect(sshd, accept=yes(seen))
    assert len(seen) == 1 and seen[0].startswith("SHA256:")
    assert pinned_key(conn.target) == conn.host_key
    assert f"[127.0.0.1]:{sshd.port}" in known_hosts_path().read_text()
    again = connect(sshd)  # no one to ask: the pinned key is enough
    assert again is conn
    transport = conn.transport
    for _ in range(5):
        assert conn.run("echo hi").stdout == "hi\n"
    assert conn.transport is transport  # no new handshake
    close_all()
    assert connect(sshd).run("echo back").stdout == "back\n"  # a new process-level connection, same pin


def test_unknown_key_is_refused_without_consent(sshd: SSHServer) -> None:
    with pytest.raises(HostError, match="is not pinned: ssh-ed25519 SHA256:") as err:
        connect(sshd)
    assert "--yes" in str(err.value)
    with pytest.raises(HostError, match="is not pinned"):
        connect(sshd, accept=lambda fp: False)
    assert not known_hosts_path().exists()


def test_changed_host_key_is_refused_with_how_to_repin(sshd_factory: SSHDFactory) -> None:
    server = sshd_factory.loopback()
    connect(server, accept=yes())
    close_all()
    server.new_host_key()
    with pytest.raises(HostError, match=r"host key of box \(127.0.0.1:\d+\) has changed") as err:
        connect(server, accept=yes())  # consent to a new key does not override a pin
    assert "dstack hosts remove box" in str(err.value)
    assert HostError.exit_code == 6


def test_wrong_key_user_and_port_are_one_line_errors(sshd: SSHServer, ssh_keys: dict[str, Path]) -> None:
    connect(sshd, accept=yes())
    close_all()
    wrong_key = resolve_target(sshd.address, identity=str(ssh_keys["stranger"]))
    with pytest.raises(HostError, match=f"cannot log in to box as {sshd.user}: key refused") as err:
        get_connection(wrong_key, name="box")
    assert "\n" not in str(err.value) and "-i KEY" in str(err.value)
    wrong_user = resolve_target(f"nobody@127.0.0.1:{sshd.port}", identity=str(sshd.key))
    with pytest.raises(HostError, match="cannot log in to box as nobody: key refused"):
        get_connection(wrong_user, name="box")
    closed = resolve_target(f"root@127.0.0.1:{_closed_port()}", identity=str(sshd.key))
    started = time.monotonic()
    with pytest.raises(HostError, match=r"cannot reach box at 127.0.0.1:\d+: connection refused"):
        get_connection(closed, name="box")
    assert time.monotonic() - started < 5


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_failed_command_carries_host_command_code_and_output(sshd: SSHServer) -> None:
    conn = connect(sshd, accept=yes())
    with pytest.raises(RemoteCommandError) as err:
        conn.run("echo one; echo two >&2; exit 3")
    assert (err.value.host, err.value.command, err.value.returncode) == (
        "box",
        "echo one; echo two >&2; exit 3",
        3,
    )
    assert "one" in err.value.output and "two" in err.value.output
    assert "exited with 3" in str(err.value)
    result = conn.run("exit 4", check=False)
    assert result.exit_code == 4 and not result.ok
    assert conn.run("cat", input=b"x" * 300_000).stdout == "x" * 300_000


def test_proxy_jump_from_ssh_config(sshd_factory: SSHDFactory, sshd: SSHServer) -> None:
    target_server = sshd_factory.loopback()
    ssh_dir = Path(os.path.expanduser("~")) / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    (ssh_dir / "config").write_text(
        f"Host jump\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.key}\n"
        f"Host inner\n  HostName 127.0.0.1\n  Port {target_server.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.key}\n  ProxyJump jump\n"
    )
    target = resolve_target("inner")
    assert target.proxy_jump == "jump"
    conn = get_connection(target, name="inner", accept=yes())
    assert conn.run("echo via jump").stdout == "via jump\n"
    assert len(known_hosts_path().read_text().splitlines()) == 2  # both keys pinned


# --- shipping files -----------------------------------------------------------------------------------


def _store_tree(tmp_path: Path):
    from dstack.artifacts import manifest_from_path
    from dstack.store.objects import LocalObjectStore

    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "train.py").write_text("print('hi')\n")
    (src / "pkg" / "data.bin").write_bytes(os.urandom(200_000))
    (src / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "run.sh").chmod(0o755)
    (src / "same.txt").write_text("print('hi')\n")  # same content as train.py: one object
    os.symlink("pkg/data.bin", src / "link")
    (src / "with space.txt").write_text("spaces\n")
    store = LocalObjectStore(tmp_path / "store")
    return store, manifest_from_path(src, store), src


@pytest.mark.parametrize("use_python", [True, False], ids=["python3", "sh"])
def test_ship_sends_only_what_the_host_lacks(sshd: SSHServer, tmp_path: Path, use_python: bool) -> None:
    store, manifest, src = _store_tree(tmp_path)
    conn = connect(sshd, accept=yes())
    root = str(tmp_path / "remote")
    placed = transfer.place(manifest.entries, "work")
    first = transfer.ship(conn, root, f"{root}/jobs/1", placed, store, use_python=use_python)
    assert first.objects_sent == 5 and first.bytes_sent > 200_000
    work = Path(root) / "jobs/1/work"
    for name in ("train.py", "pkg/data.bin", "same.txt", "with space.txt"):
        assert (work / name).read_bytes() == (src / name).read_bytes()
    assert os.access(work / "run.sh", os.X_OK) and not os.access(work / "train.py", os.X_OK)
    assert os.readlink(work / "link") == "pkg/data.bin"
    second = transfer.ship(conn, root, f"{root}/jobs/2", placed, store, use_python=use_python)
    assert (second.objects_sent, second.bytes_sent) == (0, 0)
    assert (Path(root) / "jobs/2/work/pkg/data.bin").read_bytes() == (src / "pkg/data.bin").read_bytes()


def test_place_refuses_paths_that_escape() -> None:
    from dstack.errors import ArtifactError
    from dstack.store.objects import ManifestEntry

    bad = ManifestEntry(path="../etc/passwd", size=1, mode=0o100644, digest="a" * 64)
    with pytest.raises(ArtifactError, match="escape"):
        transfer.place([bad], "work")


def test_download_paths(sshd: SSHServer, tmp_path: Path) -> None:
    conn = connect(sshd, accept=yes())
    remote = tmp_path / "remote"
    (remote / "out").mkdir(parents=True)
    (remote / "out" / "model.bin").write_bytes(b"weights")
    (tmp_path / "abs.txt").write_text("absolute")
    dest = tmp_path / "dest"
    missing = transfer.download_paths(conn, str(remote), ["out", str(tmp_path / "abs.txt"), "nope"], dest)
    assert missing == ["nope"]
    assert (dest / "out" / "model.bin").read_bytes() == b"weights"
    assert (dest / str(tmp_path / "abs.txt").lstrip("/")).read_text() == "absolute"


# --- detached processes -------------------------------------------------------------------------------


def _job_dir(tmp_path: Path, script: str) -> Path:
    from dstack.backends.script import RUN_SH

    jd = tmp_path / "job"
    jd.mkdir()
    (jd / "run.sh").write_text(RUN_SH)
    (jd / "job.sh").write_text(script)
    return jd


def _wait(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_detached_process_streams_log_and_survives_the_connection(sshd: SSHServer, tmp_path: Path) -> None:
    jd = _job_dir(tmp_path, "for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done\nexit 7\n")
    conn = connect(sshd, accept=yes())
    pid = process.launch(conn, str(jd))
    assert pid > 0 and (jd / "pid").read_text().strip() == str(pid)
    assert process.poll(conn, str(jd)).status == "running"
    first = _wait(lambda: process.read_file(conn, str(jd / "log"), 0))
    assert first.startswith(b"line 1\n")
    close_all()  # the CLI goes away; the job does not
    conn = connect(sshd)
    state = process.poll(conn, str(jd))
    assert state.status == "running" or state.exit_code == 7
    log = bytearray()
    state = process.poll(conn, str(jd))
    while True:  # stream from where we were: no line lost
        log += process.read_file(conn, str(jd / "log"), len(log))
        if state.status != "running":
            log += process.read_file(conn, str(jd / "log"), len(log))
            break
        time.sleep(0.1)
        state = process.poll(conn, str(jd))
    assert log.decode().splitlines() == [f"line {i}" for i in range(1, 6)]
    assert (state.status, state.exit_code) == ("exited", 7)


def test_stop_kills_the_whole_process_tree(sshd: SSHServer, tmp_path: Path) -> None:
    jd = _job_dir(tmp_path, "sleep 1000 &\necho $! > child\nbash -c 'sleep 1001' &\nwait\n")
    conn = connect(sshd, accept=yes())
    pid = process.launch(conn, str(jd))
    child = int(_wait(lambda: (jd / "child").exists() and (jd / "child").read_text().strip()))
    assert _alive(child) and _alive(pid)
    started = time.monotonic()
    process.stop(conn, str(jd))
    assert time.monotonic() - started < 5
    _wait(lambda: not _alive(child) and not _alive(pid), 5)
    state = process.poll(conn, str(jd))
    # the wrapper may live to record the signal (143), or die with its job
    assert state.exit_code in (143, None) and state.status in ("exited", "lost"), state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_poll_of_a_missing_directory_is_lost(sshd: SSHServer, tmp_path: Path) -> None:
    conn = connect(sshd, accept=yes())
    state = process.poll(conn, str(tmp_path / "nothing"))
    assert state.status == "lost" and "is gone from the host" in (state.reason or "")
    assert process.read_file(conn, str(tmp_path / "nothing/log"), 0) == b""


def test_one_connection_serves_many_threads(sshd: SSHServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    conn = connect(sshd, accept=yes())
    errors: list[str] = []

    def echo(i: int) -> str:
        try:
            return conn.run(f"echo {i}").stdout
        except Exception as exc:
            import traceback

            errors.append("".join(traceback.format_exception(exc)))
            raise

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(echo, i) for i in range(40)]
    assert not errors, errors[0]
    outputs = [f.result() for f in futures]
    assert outputs == [f"{i}\n" for i in range(40)]
    assert connect(sshd) is conn


def test_commands_that_end_before_their_input_keep_the_connection(sshd: SSHServer) -> None:
    """OpenSSH drops the whole connection on DATA or EOF for a channel it already freed: a command that exits
    before it reads its input, or at once with none, must never make dstack send either after its CLOSE."""
    from concurrent.futures import ThreadPoolExecutor

    conn = connect(sshd, accept=yes())
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(
            pool.map(lambda i: conn.run("exit 0", input=b"x" * (i % 3) * 70000).exit_code, range(60))
        )
    assert codes == [0] * 60
    assert conn.is_alive() and connect(sshd) is conn


def test_a_stream_into_a_failing_command_reports_it(sshd: SSHServer) -> None:
    conn = connect(sshd, accept=yes())

    def write(stdin) -> None:
        for _ in range(200):
            stdin.write(b"x" * 65536)

    with pytest.raises(RemoteCommandError, match="exited with 5: nope"):
        conn.run_with_writer("echo nope; exit 5", write)
    assert conn.is_alive() and conn.run("echo still").stdout == "still\n"


# --- hosts that behave oddly ----------------------------------------------------------------------------


def test_a_host_that_accepts_then_resets_is_one_line_error(make_repo) -> None:
    import socket
    import threading

    from helpers import dstack

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def reset_all() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            client.close()

    thread = threading.Thread(target=reset_all, daemon=True)
    thread.start()
    try:
        res = dstack("hosts", "add", f"root@127.0.0.1:{port}", "--yes", cwd=make_repo(), check=False)
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)
    assert res.code == 6
    assert res.err.strip().splitlines() == [res.err.strip()], res.err  # one line, no paramiko traceback
    assert res.err.startswith(f"Error: cannot reach 127.0.0.1 at 127.0.0.1:{port}: no SSH banner")
    assert "MaxStartups" in res.err and "Traceback" not in res.err and "Exception" not in res.err


def test_logs_come_over_exec_where_sshd_has_no_sftp(sshd_factory: SSHDFactory, make_repo, tmp_path) -> None:
    from helpers import dstack

    server = sshd_factory.loopback(sftp=False)
    conn = connect(server, accept=yes())
    (tmp_path / "log").write_bytes(b"0123456789" * 3)
    assert process.read_file(conn, str(tmp_path / "log"), 5, limit=7) == b"5678901"
    assert process.read_file(conn, str(tmp_path / "log"), 30) == b""
    assert process.read_file(conn, str(tmp_path / "nope"), 0) == b""
    assert conn.has_sftp is False and conn.is_alive()
    close_all()

    repo = make_repo(
        {".dstack/workflows.yaml": "workflows:\n  - name: hi\n    commands: [echo one, echo two]\n"}
    )
    dstack("hosts", "add", server.address, "--name", "hard", "-i", str(server.key), "--yes", cwd=repo)
    res = dstack("run", "hi", "--host", "hard", cwd=repo, timeout=60)
    assert "one" in res.out and "two" in res.out
    assert (
        "two" in dstack("logs", json.loads(dstack("runs", "--json", cwd=repo).out)[0]["name"], cwd=repo).out
    )
