"""Fixtures every test file uses: a throwaway DSTACK_HOME and HOME, real Git repos, the CLI in-process."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from dockerd import busybox_image, docker_engine, ml_image, python_image  # noqa: F401  (fixtures)
from helpers import DstackCliRunner, init_repo
from s3server import s3_server, s3_url  # noqa: F401  (one SeaweedFS for the whole session)
from slurm import slurm_cluster_fixture  # noqa: F401  (a real Slurm cluster, started once)
from sshd import ssh_keys_fixture, ssh_pool_fixture, sshd_factory_fixture, sshd_fixture  # noqa: F401

MakeRepo = Callable[..., Path]


@pytest.fixture(autouse=True)
def dstack_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `DSTACK_HOME` (not created yet) and a fresh, empty `HOME` for every test."""
    base = tmp_path_factory.mktemp("env")
    home = base / "dstack-home"
    user_home = base / "home"
    user_home.mkdir()
    for key in list(os.environ):
        if key.startswith("DSTACK_") or key.startswith("AWS_") or key in ("FORCE_COLOR", "TTY_COMPATIBLE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DSTACK_HOME", str(home))
    monkeypatch.setenv("HOME", str(user_home))
    # `python` in job commands is the interpreter running the tests (it has numpy/scikit-learn).
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    # Wide, stable rich output for assertions.
    monkeypatch.setenv("COLUMNS", "200")
    # Never reach a real AWS account or the instance-metadata endpoint from a test.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return home


@pytest.fixture
def make_repo(tmp_path: Path) -> MakeRepo:
    """Factory: `make_repo(files, commit=True, name=None) -> Path`, a real Git repo under tmp_path."""
    count = 0

    def make(files: dict[str, str] | None = None, commit: bool = True, name: str | None = None) -> Path:
        nonlocal count
        count += 1
        repo = tmp_path / (name or ("repo" if count == 1 else f"repo{count}"))
        return init_repo(repo, files, commit=commit)

    return make


@pytest.fixture
def cli_runner() -> DstackCliRunner:
    """typer's CliRunner for `dstack.cli.main.app`: `cli_runner.run("runs", "--json", cwd=repo)`."""
    return DstackCliRunner()
