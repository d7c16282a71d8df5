"""The job wrapper's guarantees on an SSH host (a real sshd on this machine): secrets are not left in env.sh,
and stopping a job ends the descendants that left its process group."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_hosts import make_ctx, runner, state, wait_exit  # noqa: F401  (fixtures)
from test_reliability import job_processes

from dstack.backends.ssh import SSHRunner

pytestmark = pytest.mark.usefixtures("ssh_pool")


def test_secret_is_gone_from_env_sh_on_the_host(
    runner: SSHRunner,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_SECRET", "hunter2")
    ctx = make_ctx(tmp_path, "secret", ['echo "secret of ${#MY_SECRET} characters"', "sleep 0.3"])
    ctx.spec.passthrough_env = ["MY_SECRET"]
    runner.start_job(ctx)
    assert wait_exit(runner, "secret").exit_code == 0
    assert runner.read_log("secret", 0) == b"secret of 7 characters\n"
    jd = Path(runner.job_dir("secret"))
    assert not (jd / "env.sh").exists()
    assert [p for p in jd.rglob("*") if p.is_file() and b"hunter2" in p.read_bytes()] == []


def test_stop_on_a_host_ends_setsid_descendants(runner: SSHRunner, tmp_path: Path) -> None:  # noqa: F811
    runner.start_job(make_ctx(tmp_path, "daemon", ["setsid sleep 300 &", "wait"]))
    deadline = time.monotonic() + 10
    while not job_processes("daemon") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job_processes("daemon"), "the job's sleep never started"
    runner.stop_job("daemon")
    deadline = time.monotonic() + 10
    while job_processes("daemon") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job_processes("daemon") == [], "a descendant of the stopped job survived"
