"""Artifacts a careless or hostile job leaves (odd names, symlinks out, FIFOs, setuid bits), through the real
CLI, on this machine, on an SSH host (bytes over SSH) and on a host that uploads to S3 itself."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from helpers import dstack
from s3server import ACCESS_KEY, SECRET_KEY
from sshd import SSHDFactory

pytestmark = pytest.mark.usefixtures("ssh_pool")

WORKFLOWS = """\
workflows:
  - name: odd-name
    commands:
      - mkdir -p out
      - printf x > "$(printf 'out/\\xff')"
      - echo fine > out/ok
    artifacts: [out]
  - name: links
    commands:
      - mkdir -p out
      - mkfifo out/pipe
      - rmdir etcdir  # dstack made the declared folder before the job
      - ln -s /etc etcdir
      - ln -s /etc out/etc
      - ln -s ok out/rel
      - echo hi > out/ok
      - chmod 4777 out/ok
    artifacts: [out, etcdir]
  - name: through-link
    commands: ["rm -r e", "ln -s /etc e"]  # dstack made the declared path as a folder
    artifacts: [e/hostname]
"""


@pytest.fixture(params=["local", "ssh", "s3-host"])
def where(request: pytest.FixtureRequest, make_repo, sshd_factory: SSHDFactory) -> tuple[Path, list[str]]:
    """A repo and the `run` options that place its jobs: here, on an SSH host, on a host uploading to S3."""
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    if request.param == "local":
        return repo, []
    server = sshd_factory.loopback()
    if request.param == "s3-host":
        s3 = request.getfixturevalue("s3_server")
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        dstack("config", "storage", s3.new_url(), "--endpoint-url", s3.endpoint_url, "--region", "us-east-1",
               cwd=repo)  # fmt: skip
        config = server.dir / "sshd_config"  # the host's python3 has blake3: it hashes and uploads itself
        path = f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"
        config.write_text(config.read_text().replace("SetEnv ", f"SetEnv PATH={path} "))
        server.stop()
        server.start()
    dstack("hosts", "add", server.address, "--name", "box", "-i", str(server.key), "--yes", cwd=repo)
    return repo, ["--host", "box"]


def last_run(repo: Path) -> dict:
    return json.loads(dstack("runs", "--json", cwd=repo).out)[0]


def test_a_file_name_that_is_not_utf8_fails_the_job_naming_the_file(where) -> None:
    repo, opts = where
    res = dstack("run", "odd-name", *opts, cwd=repo, check=False, timeout=60)
    assert res.code == 4, res.output
    assert "'out/\\xff': its name is not valid UTF-8" in res.err
    run = last_run(repo)  # ended, not crash-looping: `runs` answers and the run is over
    assert run["status"] == "failed"
    [job] = json.loads(dstack("jobs", run["name"], "--json", cwd=repo).out)
    assert job["status"] == "failed" and "'out/\\xff': its name is not valid UTF-8" in job["reason"]


def test_symlinks_stay_links_fifos_are_noted_and_downloads_drop_setuid(where, tmp_path: Path) -> None:
    repo, opts = where
    dstack("run", "links", *opts, cwd=repo, timeout=60)
    name = last_run(repo)["name"]
    listed = {a["name"]: a for a in json.loads(dstack("artifacts", "list", name, "--json", cwd=repo).out)}
    assert set(listed) == {"etcdir", "out/etc", "out/ok", "out/rel"}  # /etc was not followed
    assert listed["etcdir"]["size"] == len("/etc")
    assert "dstack: skipped FIFO out/pipe" in dstack("logs", name, cwd=repo).out

    out = tmp_path / "out"
    res = dstack("artifacts", "download", name, "-o", str(out), cwd=repo)
    assert f"Skipped symlink etcdir -> /etc: it points outside {out}" in res.err
    assert f"Skipped symlink out/etc -> /etc: it points outside {out}" in res.err
    assert not os.path.lexists(out / "etcdir") and not os.path.lexists(out / "out" / "etc")
    assert os.readlink(out / "out" / "rel") == "ok"
    assert (out / "out" / "ok").read_text() == "hi\n"
    assert stat.S_IMODE((out / "out" / "ok").stat().st_mode) == 0o755  # no setuid, no group/other write


def test_a_declared_path_through_a_symlink_out_is_refused(where) -> None:
    repo, opts = where
    res = dstack("run", "through-link", *opts, cwd=repo, check=False, timeout=60)
    assert res.code == 4, res.output
    assert "'e/hostname' goes through a symlink out of the working directory" in res.err


def test_a_corrupt_object_names_the_file_the_run_and_the_job(make_repo, dstack_home: Path, tmp_path) -> None:
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    dstack("run", "links", cwd=repo)
    name = last_run(repo)["name"]
    [ok] = [
        a
        for a in json.loads(dstack("artifacts", "list", name, "--json", cwd=repo).out)
        if a["name"] == "out/ok"
    ]
    obj = dstack_home / "artifacts" / "objects" / ok["digest"][:2] / ok["digest"][2:]
    obj.chmod(0o644)
    obj.write_text("evil\n")
    res = dstack("artifacts", "download", name, "-o", str(tmp_path / "out"), cwd=repo, check=False)
    assert res.code == 5
    assert (
        f"run {name}, job links ({ok['job']}): artifact file 'out/ok': object {ok['digest']} is corrupt"
        in res.err
    )


def test_a_home_open_to_others_is_tightened(make_repo, dstack_home: Path) -> None:
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    dstack("runs", cwd=repo)
    dstack_home.chmod(0o755)
    (dstack_home / "state.sqlite").chmod(0o644)
    dstack("runs", cwd=repo)
    assert stat.S_IMODE(dstack_home.stat().st_mode) == 0o700
    assert stat.S_IMODE((dstack_home / "state.sqlite").stat().st_mode) == 0o600


def test_a_repo_file_whose_name_is_not_utf8_is_a_one_line_error(make_repo) -> None:
    repo = make_repo({".dstack/workflows.yaml": WORKFLOWS})
    with open(os.fsencode(repo) + b"/data-\xff.bin", "wb") as f:  # untracked: part of the run's repo state
        f.write(b"x")
    res = dstack("run", "links", cwd=repo, check=False)
    assert res.code == 5, res.output
    assert res.err.strip() == (
        "Error: can't save 'data-\\xff.bin': its name is not valid UTF-8 — rename the file (dstack keeps file"
        " names as UTF-8)"
    )
