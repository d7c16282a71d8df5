"""Hosts that talk to the S3 bucket directly (real sshd, real SeaweedFS): inputs fetched and artifacts
uploaded by the host with pre-signed URLs, the CLI's machine out of the data path (bytes over SSH are
counted by a TCP proxy in front of sshd); the SSH path when the host can't hash or can't reach the bucket."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import dstack
from s3server import ACCESS_KEY, SECRET_KEY, S3Server, s3_server  # noqa: F401  (fixture)
from sshd import SSHDFactory, SSHServer

from dstack import hosts
from dstack.backends.base import DependencyArtifacts, JobContext
from dstack.backends.ssh import SSHRunner
from dstack.specs import ArtifactSpec, JobSpec
from dstack.ssh import direct
from dstack.store.objects import ObjectStore
from dstack.store.s3 import S3ObjectStore
from dstack.store.state import State

pytestmark = pytest.mark.usefixtures("ssh_pool")

MB = 1_000_000


class CountingProxy:
    """A TCP forwarder to an sshd that counts the bytes it carries both ways: what SSH moved, measured."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bytes = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = list(self._socks)
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for s in socks:
            s.close()


def set_host_path(server: SSHServer, path: str) -> None:
    """Restart the server with PATH=`path` in its sessions: which python3 and b3sum the host has."""
    config = server.dir / "sshd_config"
    lines = [
        f"{line} PATH={path}" if line.startswith("SetEnv ") else line
        for line in config.read_text().splitlines()
    ]
    config.write_text("\n".join(lines) + "\n")
    server.stop()
    server.start()
    deadline = time.monotonic() + 20
    while True:  # sshd answers with its banner (a probe right after a restart may have hit nothing)
        if server.proc is None or server.proc.poll() is not None:
            server.start()
        try:
            with socket.create_connection((server.host, server.port), timeout=2) as probe:
                if probe.recv(8).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"sshd at {server.address} did not come back: {(server.dir / 'sshd.log').read_text()}"
            )
        time.sleep(0.1)


def hashing_host(factory: SSHDFactory, netns: bool = False) -> SSHServer:
    """A host whose python3 has the `blake3` module (the interpreter running the tests)."""
    server = factory.netns() if netns else factory.loopback()
    set_host_path(server, f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin")
    return server


def plain_host(factory: SSHDFactory, tmp_path: Path, b3sum: bool = False) -> SSHServer:
    """A host whose python3 lacks `blake3` (a bare venv first on PATH), with or without `b3sum`."""
    if b3sum and not shutil.which("b3sum"):
        pytest.skip("b3sum is not installed (apt-get install -y b3sum)")
    venv = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    tools = tmp_path / "tools"
    tools.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith("python") or (name == "b3sum" and not b3sum) or (tools / name).exists():
                continue
            (tools / name).symlink_to(os.path.join(folder, name))
    server = factory.loopback()
    set_host_path(server, f"{venv}/bin:{tools}")
    return server


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture
def store(s3_server: S3Server, s3_env: None) -> S3ObjectStore:  # noqa: F811
    return S3ObjectStore(s3_server.new_url(), endpoint_url=s3_server.endpoint_url, region="us-east-1")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    with State(tmp_path / "state.sqlite") as st:
        yield st


@pytest.fixture
def proxies() -> Iterator[list[CountingProxy]]:
    made: list[CountingProxy] = []
    yield made
    from dstack.ssh.connection import close_all

    close_all()
    for proxy in made:
        proxy.close()


def runner_via_proxy(
    state: State, server: SSHServer, name: str, root: Path, proxies: list[CountingProxy]
) -> tuple[SSHRunner, CountingProxy]:
    proxy = CountingProxy((server.host, server.port))
    proxies.append(proxy)
    host = hosts.add_host(
        state.db, f"{server.user}@127.0.0.1:{proxy.port}", name=name, identity=str(server.key),
        accept=lambda fp: True,
    )  # fmt: skip
    return SSHRunner.for_host(host, root=str(root)), proxy


def make_ctx(
    tmp_path: Path,
    job_id: str,
    commands: list[str],
    store: ObjectStore,
    artifacts: list[str] | None = None,
    deps: list[DependencyArtifacts] | None = None,
) -> JobContext:
    from dstack.artifacts import manifest_from_path

    repo = tmp_path / "repo"
    if not repo.exists():
        (repo / "project").mkdir(parents=True)
        (repo / "project" / "train.py").write_text("print('training')\n")
        (repo / "project" / "weights.bin").write_bytes(os.urandom(2 * MB))
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


def wait_exit(runner: SSHRunner, job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = runner.poll_job(job_id)
        if state.status != "running":
            assert (state.status, state.exit_code) == ("exited", 0), runner.read_log(job_id, 0)
            return
        time.sleep(0.05)
    raise AssertionError(f"{job_id} still running after {timeout}s")


MAKE_OUTPUTS = [
    "python3 train.py",
    "mkdir -p out && head -c 3000000 /dev/urandom > out/model.bin && echo small > out/note.txt",
    "ln -s note.txt out/latest && chmod 755 out/note.txt && touch out/empty",
]


def test_host_fetches_inputs_and_uploads_artifacts_itself(
    state: State,
    store: S3ObjectStore,
    sshd_factory: SSHDFactory,
    tmp_path: Path,
    proxies: list[CountingProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dstack.backends.ssh")
    one, proxy_one = runner_via_proxy(state, hashing_host(sshd_factory), "one", tmp_path / "r1", proxies)
    absolute = f"{tmp_path}/abs.txt"
    ctx = make_ctx(
        tmp_path,
        "job1",
        [*MAKE_OUTPUTS, f"echo abs > {absolute}"],
        store,
        artifacts=["out", absolute, "never"],
    )
    before = proxy_one.bytes
    one.start_job(ctx)
    ship = one.last_ship
    assert ship is not None and (ship.objects_sent, ship.bytes_sent) == (0, 0)
    assert ship.objects_fetched == 2 and ship.bytes_fetched >= 2 * MB
    wait_exit(one, "job1")
    log = one.read_log("job1", 0).decode().splitlines()
    assert log[0] == f"dstack: inputs: 2 objects (2.0 MB) fetched by one from {store.url} directly"
    assert log[1] == "training"

    manifest, missing = one.collect_artifacts("job1", ctx.spec, store)
    assert missing == ["never"]
    result = one.last_collect
    assert result is not None and (result.path, result.hasher) == ("s3", "python-blake3")
    assert (result.files, result.objects_put, result.objects_over_ssh) == (5, 5, 0)
    assert result.bytes_put >= 3 * MB
    assert (
        "one: artifacts: 5 files hashed with python-blake3, 5 new objects (3.0 MB) uploaded by the host "
        f"to {store.url}" in caplog.messages
    )
    # code in, 3 MB out: SSH carried only lists, scripts and the log
    assert proxy_one.bytes - before < MB, proxy_one.bytes - before
    by_path = {e.path: e for e in manifest.entries}
    assert set(by_path) == {"out/model.bin", "out/note.txt", "out/latest", "out/empty", absolute.lstrip("/")}
    assert by_path["out/latest"].is_symlink and by_path["out/note.txt"].mode == 0o100755
    # a fresh store (no cache, another client) reads them back with BLAKE3 checked: keys match content
    fresh = S3ObjectStore(store.url, endpoint_url=store.endpoint_url, region="us-east-1")
    assert fresh.get_bytes(by_path["out/note.txt"].digest) == b"small\n"
    assert fresh.get_bytes(by_path["out/latest"].digest) == b"note.txt"
    assert fresh.get_bytes(by_path["out/empty"].digest) == b""
    out = tmp_path / "model.bin"
    fresh.get_file(by_path["out/model.bin"].digest, out)
    assert out.stat().st_size == 3 * MB

    # a second host runs the downstream job: its inputs come from the bucket, not through this machine
    two, proxy_two = runner_via_proxy(state, hashing_host(sshd_factory), "two", tmp_path / "r2", proxies)
    ctx2 = make_ctx(
        tmp_path, "job2", ["cmp out/model.bin weights.bin || true", "cat out/latest", "wc -c < out/model.bin"],
        store, deps=[DependencyArtifacts("train", manifest)],
    )  # fmt: skip
    before = proxy_two.bytes
    two.start_job(ctx2)
    assert two.last_ship is not None and two.last_ship.objects_sent == 0
    assert two.last_ship.objects_fetched == 7 and two.last_ship.bytes_fetched >= 5 * MB
    wait_exit(two, "job2")
    assert two.read_log("job2", 0).decode().splitlines()[-2:] == ["small", "3000000"]
    assert proxy_two.bytes - before < MB

    # the same job again on `one`: everything is in its cache, nothing moves
    one.start_job(make_ctx(tmp_path, "job3", ["true"], store, deps=[DependencyArtifacts("train", manifest)]))
    assert (one.last_ship.objects_fetched, one.last_ship.objects_sent) == (0, 0)  # type: ignore[union-attr]
    wait_exit(one, "job3")
    assert one.read_log("job3", 0).decode().startswith("dstack: inputs: all in one's cache")


def test_host_without_a_hasher_fetches_directly_and_saves_over_ssh(
    state: State,
    store: S3ObjectStore,
    sshd_factory: SSHDFactory,
    tmp_path: Path,
    proxies: list[CountingProxy],
) -> None:
    runner, proxy = runner_via_proxy(
        state, plain_host(sshd_factory, tmp_path), "plain", tmp_path / "r", proxies
    )
    ctx = make_ctx(tmp_path, "job1", MAKE_OUTPUTS, store, artifacts=["out"])
    runner.start_job(ctx)
    assert runner.last_ship is not None and runner.last_ship.objects_fetched == 2  # size-checked only
    wait_exit(runner, "job1")
    before = proxy.bytes
    manifest, _ = runner.collect_artifacts("job1", ctx.spec, store)
    assert runner.last_collect is not None and runner.last_collect.path == "ssh"
    assert "no BLAKE3 hasher on the host" in runner.last_collect.reason
    assert proxy.bytes - before > 3 * MB  # the files came over SSH, and went to the bucket from here
    digest = next(e.digest for e in manifest.entries if e.path == "out/note.txt")
    assert store.get_bytes(digest) == b"small\n"


def test_host_with_b3sum_uploads_itself(
    state: State,
    store: S3ObjectStore,
    sshd_factory: SSHDFactory,
    tmp_path: Path,
    proxies: list[CountingProxy],
) -> None:
    server = plain_host(sshd_factory, tmp_path, b3sum=True)
    runner, proxy = runner_via_proxy(state, server, "b3", tmp_path / "r", proxies)
    ctx = make_ctx(tmp_path, "job1", MAKE_OUTPUTS, store, artifacts=["out"])
    runner.start_job(ctx)
    wait_exit(runner, "job1")
    before = proxy.bytes
    manifest, _ = runner.collect_artifacts("job1", ctx.spec, store)
    result = runner.last_collect
    assert result is not None and (result.path, result.hasher, result.objects_put) == ("s3", "b3sum", 4)
    assert proxy.bytes - before < MB
    fresh = S3ObjectStore(store.url, endpoint_url=store.endpoint_url, region="us-east-1")
    for entry in manifest.entries:
        assert len(fresh.get_bytes(entry.digest)) == entry.size  # BLAKE3 checked against b3sum's name


def test_host_that_cannot_reach_the_bucket_uses_ssh_both_ways(
    state: State,
    store: S3ObjectStore,
    sshd_factory: SSHDFactory,
    tmp_path: Path,
    proxies: list[CountingProxy],
) -> None:
    # in its own network namespace the host's 127.0.0.1 is not the bucket's
    server = hashing_host(sshd_factory, netns=True)
    runner, _ = runner_via_proxy(state, server, "island", tmp_path / "r", proxies)
    ctx = make_ctx(tmp_path, "job1", MAKE_OUTPUTS, store, artifacts=["out"])
    runner.start_job(ctx)
    ship = runner.last_ship
    assert ship is not None and (ship.objects_fetched, ship.objects_sent) == (0, 2)
    wait_exit(runner, "job1")
    first = runner.read_log("job1", 0).decode().splitlines()[0]
    assert first.startswith("dstack: inputs: 0 objects (0 B) fetched by island") and "sent over SSH" in first
    assert "can't reach the bucket" in first
    manifest, _ = runner.collect_artifacts("job1", ctx.spec, store)
    result = runner.last_collect
    assert result is not None and result.objects_put == 0 and result.objects_over_ssh == 4
    assert "can't reach the bucket" in result.reason
    for entry in manifest.entries:  # brought over SSH from the host's cache, digests checked here
        assert store.has(entry.digest)
    # the next job doesn't try the bucket again
    runner.start_job(make_ctx(tmp_path, "job2", ["true"], store))
    assert "can't reach the bucket" in (runner._no_fetch or "")


def test_a_corrupt_object_in_the_bucket_never_enters_the_host_cache(
    state: State,
    store: S3ObjectStore,
    sshd_factory: SSHDFactory,
    tmp_path: Path,
    proxies: list[CountingProxy],
) -> None:
    from dstack.errors import ArtifactError

    runner, _ = runner_via_proxy(state, hashing_host(sshd_factory), "one", tmp_path / "r", proxies)
    ctx = make_ctx(tmp_path, "job1", ["true"], store)
    entry = next(e for e in ctx.code.entries if e.path.endswith("train.py"))
    body = b"print('evil')\n"[: entry.size].ljust(entry.size, b"#")  # same size: only BLAKE3 tells
    store.client.put_object(Bucket=store.bucket, Key=store.object_key(entry.digest), Body=body)
    with pytest.raises(ArtifactError, match=f"object {entry.digest} is corrupt"):
        runner.start_job(ctx)  # the host refused it; over SSH the CLI refuses it too
    objects = tmp_path / "r" / "objects"
    assert not (objects / entry.digest).exists()
    assert not [p for p in objects.iterdir() if p.name.startswith(".") and p.is_file()]  # no part files


def test_presigned_put_refuses_other_content_and_overwrites(store: S3ObjectStore, tmp_path: Path) -> None:
    import base64
    import hashlib
    import urllib.error
    import urllib.request

    from dstack.hashing import digest_bytes

    data = b"the real content"
    digest, sha = digest_bytes(data), base64.b64encode(hashlib.sha256(data).digest()).decode()
    url = direct._presigned_put(store, digest, sha, 60)
    headers = {"If-None-Match": "*", "x-amz-checksum-sha256": sha}

    def put(body: bytes) -> int:
        request = urllib.request.Request(url, data=body, method="PUT", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            e.close()
            return int(e.code)

    assert put(b"something else") == 400 and not store.has(digest)
    assert put(data) == 200
    assert put(data) == 412  # never overwritten
    assert store.get_bytes(digest) == data


# --- the whole journey through the CLI ---------------------------------------------------------------------

PIPELINE = """\
workflows:
  - name: prepare
    commands: ["mkdir -p data", "echo 'rows: 3' > data/set.yaml", "head -c 3000000 /dev/urandom > data/big.bin"]
    artifacts: [data]
  - name: report
    depends-on: [prepare]
    commands: ["cat data/set.yaml", "wc -c < data/big.bin | tee report.txt"]
    artifacts: [report.txt]
"""


def test_pipeline_on_hosts_with_an_s3_store(
    make_repo,
    s3_server: S3Server,  # noqa: F811
    sshd_factory: SSHDFactory,
    tmp_path: Path,
    proxies: list[CountingProxy],
    s3_env: None,
) -> None:
    url = s3_server.new_url()
    repo = make_repo({".dstack/workflows.yaml": PIPELINE})
    dstack(
        "config", "storage", url, "--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1", cwd=repo
    )
    by_name: dict[str, CountingProxy] = {}
    for name in ("one", "two"):
        server = hashing_host(sshd_factory)
        proxy = CountingProxy((server.host, server.port))
        proxies.append(proxy)
        by_name[name] = proxy
        dstack("hosts", "add", f"{server.user}@127.0.0.1:{proxy.port}", "--name", name, "-i", str(server.key),
               "--yes", cwd=repo)  # fmt: skip
    dstack("hosts", "disable", "local", cwd=repo)

    before = by_name["one"].bytes
    dstack("run", "prepare", "--host", "one", cwd=repo, timeout=90)
    assert by_name["one"].bytes - before < MB  # its 3 MB went from `one` to the bucket
    before = by_name["two"].bytes
    res = dstack("run", "report", "--host", "two", cwd=repo, timeout=90)
    assert "rows: 3" in res.out and "3000000" in res.out
    assert by_name["two"].bytes - before < MB  # prepare's 3 MB reached `two` from the bucket
    runs = json.loads(dstack("runs", "--json", cwd=repo).out)
    report_run = runs[0]["name"]
    logs = dstack("logs", report_run, cwd=repo).out
    assert "fetched by two from " + url in logs
    jobs = {j["name"]: j for j in json.loads(dstack("jobs", report_run, "--json", cwd=repo).out)}
    assert jobs["report"]["runner"] == "two" and jobs["report"]["status"] == "done"

    # a colleague with another DSTACK_HOME downloads what the hosts uploaded
    dstack("tags", "add", "shared", report_run, cwd=repo)
    colleague = {"DSTACK_HOME": str(tmp_path / "colleague-home")}
    clone = make_repo({".dstack/workflows.yaml": PIPELINE}, name="clone")
    dstack("config", "storage", url, "--endpoint-url", s3_server.endpoint_url, "--region", "us-east-1",
           cwd=clone, env=colleague)  # fmt: skip
    tags = json.loads(dstack("tags", "list", "--json", cwd=clone, env=colleague).out)
    out = tmp_path / "downloaded"
    dstack("artifacts", "download", tags[0]["run"], "-o", str(out), cwd=clone, env=colleague)
    assert (out / "data/set.yaml").read_text() == "rows: 3\n"
    assert (out / "data/big.bin").stat().st_size == 3 * MB
    assert (out / "report.txt").read_text() == "3000000\n"


def test_objects_over_one_put_go_up_from_the_host_in_presigned_parts(
    state: State,
    store: S3ObjectStore,
    sshd_factory: SSHDFactory,
    tmp_path: Path,
    proxies: list[CountingProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # S3's one-PUT limit is 5 GiB: here 6 MB stands for it, with 5 MiB parts (S3's smallest)
    monkeypatch.setattr(direct, "MAX_PUT_BYTES", 6 * MB)
    monkeypatch.setattr(direct, "PART_BYTES", 5 * 1024 * 1024)
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    one, proxy = runner_via_proxy(state, hashing_host(sshd_factory), "one", tmp_path / "r1", proxies)
    ctx = make_ctx(
        tmp_path, "job1", ["mkdir -p out && head -c 12000000 /dev/urandom > out/huge.bin && echo s > out/s"],
        store, artifacts=["out"],
    )  # fmt: skip
    one.start_job(ctx)
    wait_exit(one, "job1")
    before = proxy.bytes
    manifest, _ = one.collect_artifacts("job1", ctx.spec, store)
    result = one.last_collect
    assert result is not None and (result.objects_put, result.objects_over_ssh) == (2, 0)
    assert result.bytes_put >= 12 * MB
    assert proxy.bytes - before < MB  # the 12 MB went host -> bucket, not over SSH
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("CompleteMultipartUpload") == 1
    huge = next(e for e in manifest.entries if e.path == "out/huge.bin")
    fresh = S3ObjectStore(store.url, endpoint_url=store.endpoint_url, region="us-east-1")
    out = tmp_path / "huge.bin"
    fresh.get_file(huge.digest, out)  # BLAKE3 checked: the parts were put together in order
    assert out.stat().st_size == 12_000_000
