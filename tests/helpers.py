"""Helpers every test uses: real Git repos in tmp dirs and the real CLI run as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
# Debian's chromium, headless, on a machine with no network: no background connections, no sandbox (root)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Result:
    """What a CLI invocation left: its exit code, stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        """stdout and stderr together, for assertions that don't care which."""
        return self.out + self.err

    def describe(self, args: tuple[str, ...] | list[str]) -> str:
        """A readable account of the invocation for assertion messages."""
        streams = f"--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"
        return f"`dstack {' '.join(args)}` exited with {self.code}\n{streams}"


def write(repo: Path, path: str, text: str) -> Path:
    """Write `text` to `repo/path`, creating parent folders; returns the file's path."""
    target = repo / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def git(repo: Path, *args: str) -> str:
    """Run a git command in `repo` and return its stdout; fails the test on a non-zero exit."""
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def init_repo(repo: Path, files: dict[str, str] | None = None, commit: bool = True) -> Path:
    """Make `repo` a Git repo (branch main, local identity), write `files` into it and commit them."""
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "dstack tests")
    git(repo, "config", "user.email", "tests@dstack.invalid")
    git(repo, "config", "commit.gpgsign", "false")
    for path, text in (files or {}).items():
        write(repo, path, text)
    if commit:
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "--allow-empty", "-m", "initial")
    return repo


def copy_example(name: str, dest: Path, commit: bool = True) -> Path:
    """Copy `examples/<name>` to `dest` (without outputs of earlier runs) and make it a committed Git repo."""
    shutil.copytree(
        EXAMPLES / name,
        dest,
        ignore=shutil.ignore_patterns("__pycache__", "data", "model", "eval", ".git"),
    )
    return init_repo(dest, commit=commit)


def dstack(
    *args: str,
    cwd: Path | str | None = None,
    input: str | None = None,
    timeout: float = 60,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> Result:
    """Run the real CLI (`python -m dstack ARGS`) with the test's environment, bounded by `timeout` seconds.

    With `check=True` a non-zero exit fails the test, showing both output streams.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dstack", *args],
            cwd=cwd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(
            f"`dstack {' '.join(args)}` did not finish in {timeout}s\n"
            f"--- stdout ---\n{out}\n--- stderr ---\n{err}"
        )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    if check and result.code != 0:
        pytest.fail(result.describe(args))
    return result


@contextmanager
def _chdir(path: Path | str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


class DstackCliRunner(CliRunner):
    """typer's CliRunner plus `run(*args)` that invokes `dstack.cli.main.app` in-process."""

    def run(
        self, *args: str, cwd: Path | str | None = None, input: str | None = None, check: bool = True
    ) -> Result:
        """Invoke the app with `args` (in `cwd`); with `check=True` a non-zero exit fails the test."""
        from dstack.cli.main import app

        with _chdir(cwd):
            res = self.invoke(app, list(args), input=input, catch_exceptions=True)
        result = Result(res.exit_code, res.stdout, res.stderr)
        if check and res.exit_code != 0:
            detail = result.describe(args)
            if res.exception is not None and not isinstance(res.exception, SystemExit):
                import traceback

                detail += "\n--- exception ---\n" + "".join(traceback.format_exception(res.exception))
            pytest.fail(detail)
        return result


def git_repo_with(root: Path, files: dict[str, str]) -> Path:
    """A real Git repo (not committed) holding `files`, their text dedented."""
    import textwrap

    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True, timeout=30)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root
