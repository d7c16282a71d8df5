"""Repo snapshots: the exact state of a Git working tree, stored, and checked out into a job's directory."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack.errors import ArtifactError, RepoError
from dstack.repo import RepoState, checkout_files, snapshot_repo
from dstack.store.digests import DigestCache
from dstack.store.objects import LocalObjectStore


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
    }  # fmt: skip
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout


def make_repo(root: Path, files: dict[str, str], commit: bool = True) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    if commit:
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "init")
    return root


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "artifacts")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[DigestCache]:
    with DigestCache(tmp_path / "digests.sqlite") as c:
        yield c


def test_not_a_git_repo(tmp_path: Path, store: LocalObjectStore, cache: DigestCache) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(RepoError, match="is not inside a Git repository — run `git init` there"):
        snapshot_repo(plain, store, cache)


def test_snapshot_records_commit_diff_untracked_and_all_files(
    tmp_path: Path, store: LocalObjectStore, cache: DigestCache
) -> None:
    repo = make_repo(
        tmp_path / "repo",
        {
            ".gitignore": "data/\n*.log\n",
            ".dstack/workflows.yaml": "workflows: []\n",
            "train.py": "print('v1')\n",
            "gone.py": "x = 1\n",
            "src/model.py": "W = 2\n",
        },
    )
    git(repo, "remote", "add", "origin", "https://example.com/team/repo.git")
    (repo / "train.py").write_text("print('v2')\n")
    (repo / "gone.py").unlink()
    (repo / "notes.md").write_text("untracked\n")
    (repo / "data").mkdir()
    (repo / "data" / "big.bin").write_bytes(b"ignored")
    (repo / "run.log").write_text("ignored")
    (repo / "latest").symlink_to("src/model.py")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)

    state = snapshot_repo(repo, store, cache)
    assert state.repo_root == repo
    assert state.commit == git(repo, "rev-parse", "HEAD").strip()
    assert state.branch == "main"
    assert state.remote_url == "https://example.com/team/repo.git"
    assert state.working_subdir == "."
    assert "-print('v1')" in state.diff and "+print('v2')" in state.diff and "gone.py" in state.diff
    assert sorted(state.untracked) == ["latest", "notes.md", "run.sh"]
    by_path = {e.path: e for e in state.files.entries}
    assert sorted(by_path) == [
        ".dstack/workflows.yaml", ".gitignore", "latest", "notes.md", "run.sh", "src/model.py", "train.py",
    ]  # fmt: skip
    assert by_path["latest"].mode == 0o120000
    assert store.get_bytes(by_path["latest"].digest) == b"src/model.py"
    assert stat.S_IMODE(by_path["run.sh"].mode) == 0o755
    assert store.get_bytes(by_path["train.py"].digest) == b"print('v2')\n"

    restored = RepoState.from_json(state.to_json())
    assert restored == state


def test_snapshot_of_a_subdirectory_and_of_a_repo_without_commits(
    tmp_path: Path, store: LocalObjectStore, cache: DigestCache
) -> None:
    repo = make_repo(
        tmp_path / "repo", {"proj/.dstack/workflows.yaml": "workflows: []\n", "a.txt": "a"}, False
    )
    state = snapshot_repo(repo / "proj", store, cache)
    assert state.commit is None and state.diff == "" and state.branch == "main" and state.remote_url is None
    assert state.working_subdir == "proj"
    assert sorted(e.path for e in state.files.entries) == ["a.txt", "proj/.dstack/workflows.yaml"]


def test_checkout_makes_independent_copies(
    tmp_path: Path, store: LocalObjectStore, cache: DigestCache
) -> None:
    repo = make_repo(tmp_path / "repo", {"train.py": "print(1)\n", "src/m.py": "W = 1\n", "docs/x.md": "x"})
    (repo / "link").symlink_to("train.py")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    state = snapshot_repo(repo, store, cache)

    work = tmp_path / "job"
    checkout_files(state.files, store, work)
    assert (work / "train.py").read_text() == "print(1)\n"
    assert os.readlink(work / "link") == "train.py"
    assert os.access(work / "run.sh", os.X_OK)
    assert (work / "train.py").stat().st_nlink == 1
    (work / "train.py").write_text("changed by the job")  # a job may write to its files
    entry = next(e for e in state.files.entries if e.path == "train.py")
    assert store.get_bytes(entry.digest) == b"print(1)\n"

    only = tmp_path / "only"
    checkout_files(state.files, store, only, include=["src", "*.sh"])
    assert sorted(str(p.relative_to(only)) for p in only.rglob("*") if p.is_file()) == ["run.sh", "src/m.py"]


def test_checkout_refuses_an_escaping_manifest(tmp_path: Path, store: LocalObjectStore) -> None:
    from dstack.hashing import digest_bytes
    from dstack.store.objects import Manifest, ManifestEntry

    d = digest_bytes(b"x")
    store.put_bytes(b"x", d)
    evil = Manifest(entries=[ManifestEntry(path="../../.bashrc", size=1, mode=0o100644, digest=d)])
    with pytest.raises(ArtifactError, match="'../../.bashrc' would escape"):
        checkout_files(evil, store, tmp_path / "job")


def test_snapshot_of_10000_files(tmp_path: Path, store: LocalObjectStore, cache: DigestCache) -> None:
    """Not asserted (machines differ): prints how long a cold and a warm snapshot of 10,000 files take."""
    repo = tmp_path / "big"
    files = {f"pkg{i // 100}/mod{i}.py": f"X = {i}\n" for i in range(10_000)}
    make_repo(repo, files)
    old = 1_600_000_000
    for rel in files:
        os.utime(repo / rel, (old, old))  # as in a real repo: not modified this very second
    git(repo, "update-index", "-q", "--refresh")
    t0 = time.perf_counter()
    snapshot_repo(repo, store, cache)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = snapshot_repo(repo, store, cache)
    warm = time.perf_counter() - t0
    print(f"\nsnapshot of 10,000 files: cold {cold * 1000:.0f} ms, warm {warm * 1000:.0f} ms")
    assert len(state.files.entries) == 10_000
