"""Services the bench starts for its rows and stops after: loopback sshd hosts and a SeaweedFS S3 endpoint.

The sshd logic is the tests' own (`tests/sshd.py`); SeaweedFS is started like `tests/s3server.py` starts it,
with a larger volume size so a 1 GB artifact set fits in few volumes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    """SeaweedFS (`weed server -s3`) on free loopback ports, with `bucket` made and written to once
    (the same start as the tests' `s3_server` fixture, with bigger volumes)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from s3server import WeedError, start_weed

    base.mkdir(parents=True, exist_ok=True)
    try:
        proc, url, log = start_weed(
            base, bucket, S3_ACCESS_KEY, S3_SECRET_KEY, volume_mb=1024, timeout=timeout
        )
    except WeedError as e:
        raise ServiceError(str(e).splitlines()[0]) from e
    return S3Endpoint(url, bucket, log, proc)
