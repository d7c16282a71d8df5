"""Real `sshd` servers for tests: on loopback ports, or inside network namespaces that can be cut off.

Keys (the client's, a stranger's, each server's host key) are generated per test session. Root is needed
for namespaces; loopback servers run as whoever runs the tests (root here, so logins are as root).
"""

from __future__ import annotations

import getpass
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "dstack-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:  # up means it says its SSH banner (a bare connect can succeed against ourselves)
            with socket.create_connection((host, port), timeout=0.5) as sock:
                sock.settimeout(2)
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"sshd did not answer on {host}:{port} within {timeout}s")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class SSHServer:
    """One running sshd: where it listens and how to log in to it."""

    host: str
    port: int
    user: str
    key: Path  # the client's private key, authorized for `user`
    dir: Path
    netns: str | None = None
    veth: str | None = None  # the host-side end of the namespace's veth pair
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def start(self) -> None:
        """Start (or restart) sshd with this server's config."""
        os.makedirs("/run/sshd", exist_ok=True)
        log = self.dir / "sshd.log"
        cmd = [SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_port(self.host, self.port, self.proc, log)

    def stop(self) -> None:
        """Stop sshd (sessions it forked go on until they end)."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def new_host_key(self) -> None:
        """Replace the host key and restart: what a reinstalled host looks like."""
        self.stop()
        for path in self.dir.glob("host_ed25519*"):
            path.unlink()
        _keygen(self.dir / "host_ed25519")
        self.start()

    def cut(self) -> None:
        """Take the namespace's link down: the host stops answering, its processes go on."""
        assert self.veth, "only namespaced servers can be cut off"
        _ip("link", "set", self.veth, "down")

    def reconnect(self) -> None:
        assert self.veth
        _ip("link", "set", self.veth, "up")


class SSHDFactory:
    """Starts sshd servers that accept the session's client key; stops them all at the end."""

    def __init__(self, base: Path, client_key: Path) -> None:
        self.base = base
        self.client_key = client_key
        self.user = getpass.getuser()
        self.servers: list[SSHServer] = []
        self.namespaces: list[str] = []
        self._n = 0

    def _server_dir(self) -> Path:
        self._n += 1
        path = self.base / f"sshd{self._n}"
        path.mkdir()
        keys = path / "authorized_keys"
        keys.mkdir()
        shutil.copy(self.client_key.with_suffix(".pub"), keys / self.user)
        _keygen(path / "host_ed25519")
        return path

    def _config(
        self, path: Path, host: str, port: int, sftp: bool = True, env: dict[str, str] | None = None
    ) -> None:
        extra = "".join(f" {k}={v}" for k, v in (env or {}).items())
        (path / "sshd_config").write_text(
            f"Port {port}\nListenAddress {host}\nHostKey {path}/host_ed25519\nPidFile {path}/sshd.pid\n"
            f"AuthorizedKeysFile {path}/authorized_keys/%u\nStrictModes no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n"
            + ("Subsystem sftp internal-sftp\n" if sftp else "")
            + "AllowTcpForwarding yes\nMaxSessions 64\nMaxStartups 100\n"
            "ClientAliveInterval 0\nLogLevel ERROR\n"
            # each server is its own machine: ~/.dstack there (caches, jobs) is not the tester's
            f"SetEnv HOME={path}/home{extra}\n"
        )
        (path / "home").mkdir(exist_ok=True)

    def loopback(
        self, port: int | None = None, sftp: bool = True, env: dict[str, str] | None = None
    ) -> SSHServer:
        """An sshd on 127.0.0.1 at a free port (`sftp=False`: without the SFTP subsystem, as hardened boxes;
        `env`: more variables its sessions get)."""
        path = self._server_dir()
        port = port or _free_port()
        self._config(path, "127.0.0.1", port, sftp=sftp, env=env)
        server = SSHServer("127.0.0.1", port, self.user, self.client_key, path)
        server.start()
        self.servers.append(server)
        return server

    def netns(self) -> SSHServer:
        """An sshd in its own network namespace, reached over a veth pair at 10.200.N.2:22."""
        if os.geteuid() != 0 or not shutil.which("ip"):
            pytest.skip("network namespaces need root and iproute2 (`ip`)")
        used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        tag = f"{os.getpid() % 10000}{len(self.namespaces)}"
        while f"dstk{tag}" in existing:  # a namespace left by an earlier, killed session
            tag = f"{random.randint(0, 99999)}"
        name, veth, peer = f"dstk{tag}", f"dsv{tag}a", f"dsv{tag}b"
        for _ in range(100):
            n = random.randint(1, 250)
            if f"10.200.{n}." not in used:
                break
        try:
            _ip("netns", "add", name)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
        self.namespaces.append(name)
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", name)
        _ip("addr", "add", f"10.200.{n}.1/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"10.200.{n}.2/30", "dev", peer)
        _ip("netns", "exec", name, "ip", "link", "set", peer, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        path = self._server_dir()
        host = f"10.200.{n}.2"
        self._config(path, host, 22)
        server = SSHServer(host, 22, self.user, self.client_key, path, netns=name, veth=veth)
        server.start()
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        for name in self.namespaces:
            # processes left in the namespace (jobs) die with it
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture(scope="session", name="ssh_keys")
def ssh_keys_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Private keys generated for this session: `client` (authorized on every server) and `stranger` (not)."""
    if not shutil.which("ssh-keygen") or not Path(SSHD).exists():
        pytest.skip("openssh-server is not installed (apt-get install -y openssh-server)")
    base = tmp_path_factory.mktemp("sshkeys")
    return {"client": _keygen(base / "client"), "stranger": _keygen(base / "stranger")}


@pytest.fixture(scope="session", name="sshd_factory")
def sshd_factory_fixture(
    tmp_path_factory: pytest.TempPathFactory, ssh_keys: dict[str, Path]
) -> Iterator[SSHDFactory]:
    """Make more sshd servers (loopback or namespaced); all are stopped at the end of the session."""
    factory = SSHDFactory(tmp_path_factory.mktemp("sshd"), ssh_keys["client"])
    yield factory
    factory.close()


@pytest.fixture(scope="session", name="sshd")
def sshd_fixture(sshd_factory: SSHDFactory) -> SSHServer:
    """One sshd on a loopback port, shared by the session."""
    return sshd_factory.loopback()


@pytest.fixture(name="ssh_pool")
def ssh_pool_fixture() -> Iterator[None]:
    """Start a test with no pooled SSH connections and close the ones it opened (no leaked sockets)."""
    from dstack.ssh.connection import close_all

    close_all()
    yield
    close_all()
