"""moto's server mode as the AWS API: started once per session; each test gets a reset account.

boto3 honours `AWS_ENDPOINT_URL`, so dstack's own clients talk to it unchanged. Launched instances do not
exist as machines here: tests map them to a local sshd (see `DSTACK_EC2_SSH_OVERRIDE` in dstack.backends.ec2).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class MotoServer:
    """A running `moto_server`."""

    url: str
    log: Path

    def reset(self) -> None:
        """Forget every resource (a fresh account)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def ec2(self, region: str = "us-east-1"):  # type: ignore[no-untyped-def]
        """A boto3 EC2 client for assertions (close it: it holds a socket)."""
        import boto3

        return boto3.client(
            "ec2", region_name=region, endpoint_url=self.url,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", name="moto_server")
def moto_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """`moto_server -H 127.0.0.1 -p PORT` for the session; skipped only when moto[server] is missing."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start (exit {proc.poll()}):\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield MotoServer(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(name="moto_account")
def moto_account_fixture(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """A reset moto account reached through AWS_ENDPOINT_URL, with dummy credentials and no ~/.aws."""
    import os

    moto_server.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server
