"""A real Slurm cluster for tests: slurmctld here, two slurmd nodes in their own network + UTS namespaces,
and a loopback sshd as the login node (it shares this machine's filesystem, as a cluster's NFS home would).

`tests/slurm_cluster.sh` does the work; the session fixture starts it once and always tears it down.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sshd import SSHDFactory, SSHServer

SCRIPT = Path(__file__).with_name("slurm_cluster.sh")
RUN_DIR = Path("/run/dstack-test-slurm")
CONF = RUN_DIR / "slurm.conf"
NODES = ("dstksl1", "dstksl2")
NODE_ADDRS = ("10.203.0.11", "10.203.0.12")
START_TIMEOUT_S = 90


@dataclass
class SlurmCluster:
    """The running test cluster: its config, its nodes, and the login node's sshd."""

    conf: Path
    nodes: tuple[str, ...]
    login: SSHServer

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30) -> str:
        """A Slurm command run here (as on the login node); its stdout."""
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, check=True, env=self.env()
        ).stdout

    def queue(self) -> list[str]:
        """What `squeue` lists now: `<id> <name> <state>` lines."""
        return [line for line in self.run("squeue", "-h", "-o", "%i %j %T").splitlines() if line.strip()]

    def wait_queue_empty(self, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := self.queue()) and time.monotonic() < deadline:
            time.sleep(0.3)
        return left


def _script(*args: str, timeout: float) -> tuple[int, str]:
    """Run the cluster script: (exit code, output). Output goes to a file: the daemons it starts keep
    whatever they inherit open, so a pipe would never reach EOF."""
    import tempfile

    with tempfile.TemporaryFile() as out:
        proc = subprocess.run(
            ["bash", str(SCRIPT), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
        out.seek(0)
        return proc.returncode, out.read().decode(errors="replace")


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(sshd_factory: SSHDFactory) -> Iterator[SlurmCluster]:
    """Start the cluster (2 nodes, 2 CPUs each) for the session; stop everything it started afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("the Slurm cluster needs root and iproute2 (`ip`) for its network namespaces")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "iptables") if not shutil.which(b)]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: apt-get install -y slurmctld slurmd slurm-client munge")
    probe = subprocess.run(["ip", "netns", "add", "dstkslprobe"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", "dstkslprobe"], capture_output=True, timeout=10)
    RUN_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open("/run/dstack-test-slurm.lock", "w") as lock:
        deadline = time.monotonic() + 120  # another test session has the cluster: wait for it
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another test session holds the Slurm cluster for over 120 s")
                time.sleep(0.5)
        _script("down", timeout=60)  # whatever a killed session left
        try:
            code, out = _script("up", "2", "2", timeout=START_TIMEOUT_S)
            if code != 0:
                log = (RUN_DIR / "slurmctld.log").read_text()[-1500:] if CONF.exists() else ""
                pytest.fail(f"the Slurm cluster did not start: {out}{log}")
            # the login node's `python` is the tests' interpreter (numpy, scikit-learn), as on a real cluster's
            # module-loaded PATH; sbatch passes the environment on to the jobs
            path = f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
            login = sshd_factory.loopback(env={"SLURM_CONF": str(CONF), "PATH": path})
            yield SlurmCluster(CONF, NODES, login)
        finally:
            code, out = _script("down", timeout=60)
            assert code == 0, out
