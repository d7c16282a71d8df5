"""Issue 15.5/15.6: a job's working tree holds exactly the files its key covers, on every runner, and a job
that writes into a tracked file changes neither the store nor the next job's tree.

The same workflow runs on this machine, in a container here, on an SSH host and in a container there; each
lists its working tree. (The local in-place write with `1<>` is in test_reliability.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import dstack, git
from sshd import SSHDFactory, SSHServer

INCLUDE = '["src/**", "*.cfg"]'
LIST = "find . -type f | sort; cat src/a.py"
# relative to the project folder; `*` crosses `/`; untracked files count, ignored ones don't
EXPECTED = ["./app.cfg", "./docs/x.cfg", "./src/a.py", "./src/new.py", "./src/pkg/b.py"]


@pytest.fixture(autouse=True)
def reuse_even_small_trees(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trees under 1,000 files are copied anew for each job; these tests' small ones are kept and reused."""
    monkeypatch.setenv("DSTACK_SPARE_MIN_FILES", "1")


def tree_repo(make_repo, image: str | None) -> Path:
    workflows = "workflows:\n"
    for name, img in (("tree", None), ("tree-image", image)):
        workflows += f"  - name: {name}\n"
        if img:
            workflows += f"    image: {img}\n"
        workflows += f"    depends-on: {{repo: {{include: {INCLUDE}}}}}\n    commands: [{json.dumps(LIST)}]\n"
    repo = make_repo(
        {
            ".dstack/workflows.yaml": workflows,
            ".gitignore": "*.log\n",
            "README.md": "not included\n",
            "app.cfg": "x=1\n",
            "docs/x.cfg": "y=2\n",
            "docs/guide.md": "not included\n",
            "src/a.py": "committed\n",
            "src/pkg/b.py": "B = 1\n",
        }
    )
    (repo / "src" / "a.py").write_text("dirty\n")  # uncommitted: the run takes the working copy
    (repo / "src" / "new.py").write_text("untracked\n")  # untracked, not ignored: in the repo state
    (repo / "src" / "debug.log").write_text("ignored\n")  # ignored: never in the repo state
    return repo


def listing(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("./")]


def add_host(server: SSHServer, repo: Path, name: str) -> None:
    dstack("hosts", "add", server.address, "--name", name, "-i", str(server.key), "--yes", cwd=repo)


def test_the_same_tree_on_every_runner(
    make_repo, sshd_factory: SSHDFactory, ssh_pool, python_image: str
) -> None:
    repo = tree_repo(make_repo, python_image)
    add_host(sshd_factory.loopback(env={"DOCKER_HOST": os.environ["DOCKER_HOST"]}), repo, "box")
    seen = {}
    for workflow, host in [
        ("tree", "local"),
        ("tree-image", "local"),
        ("tree", "box"),
        ("tree-image", "box"),
    ]:
        out = dstack("run", workflow, "--host", host, "--force", cwd=repo, timeout=120).out
        seen[f"{workflow} on {host}"] = (listing(out), out.splitlines()[-1])
    assert all(v == (EXPECTED, "dirty") for v in seen.values()), seen


def test_include_is_relative_to_the_project_folder(make_repo, sshd: SSHServer, ssh_pool) -> None:
    """A project in a subfolder: globs match paths under it, files outside it are never included."""
    repo = make_repo(
        {
            "top.cfg": "outside the project\n",
            "src/outside.py": "outside the project\n",
            "proj/.dstack/workflows.yaml": (
                f"workflows:\n  - name: tree\n    depends-on: {{repo: {{include: {INCLUDE}}}}}\n"
                f"    commands: [{json.dumps('find . -type f | sort')}]\n"
            ),
            "proj/app.cfg": "x=1\n",
            "proj/src/a.py": "a\n",
            "proj/notes.md": "not included\n",
        }
    )
    project = repo / "proj"
    add_host(sshd, project, "box")
    for host in ("local", "box"):
        out = dstack("run", "tree", "--host", host, "--force", cwd=project, timeout=60).out
        assert listing(out) == ["./app.cfg", "./src/a.py"], (host, out)
    (repo / "top.cfg").write_text("changed, outside the project\n")
    (project / "notes.md").write_text("changed, not included\n")
    again = dstack("run", "tree", "--host", "local", cwd=project, timeout=60)
    assert "reused" in again.out + again.err, again.out + again.err  # the key covers the same files


SCRIBBLE = """\
workflows:
  - name: show
    commands: ["cat data.txt", "cat keep.txt", "ls", "stat -c %a src/s.py"]
  - name: scribble
    commands:
      - echo changed > data.txt
      - rm keep.txt
      - mkdir -p out && echo new > out/new.txt && echo new > extra.txt
      - chmod 600 src/s.py
      - cat data.txt
"""


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_a_job_that_overwrites_a_tracked_file_changes_nothing_else(
    make_repo, where: str, request: pytest.FixtureRequest
) -> None:
    repo = make_repo(
        {
            ".dstack/workflows.yaml": SCRIBBLE,
            "data.txt": "original\n",
            "keep.txt": "kept\n",
            "src/s.py": "s\n",
        }
    )
    host = "local"
    if where == "ssh":
        server: SSHServer = request.getfixturevalue("sshd")
        request.getfixturevalue("ssh_pool")
        add_host(server, repo, "box")
        host = "box"
    run = ("--host", host)
    fresh = dstack("run", "show", *run, cwd=repo).out.splitlines()
    assert fresh[:5] == ["original", "kept", "data.txt", "keep.txt", "src"], fresh
    for _ in range(2):  # the second round gets the trees the first one handed back
        assert dstack("run", "scribble", *run, "--force", cwd=repo).out.splitlines()[-1] == "changed"
        assert dstack("run", "show", *run, "--force", cwd=repo).out.splitlines() == fresh
    home = Path(os.environ["DSTACK_HOME"])
    stored = [p for p in home.glob("artifacts/objects/*/*") if p.read_bytes() == b"original\n"]
    assert stored, "the store lost the tracked file's content"
    if where == "ssh":
        cached = [p for p in server.dir.glob("home/.dstack/objects/*") if p.read_bytes() == b"original\n"]
        assert cached, "the host's cache lost the tracked file's content"
    else:
        pristine = list(home.glob("checkouts/*/data.txt"))
        assert [p.read_text() for p in pristine] == ["original\n"]
    # a committed change reaches the next job through the same trees
    (repo / "data.txt").write_text("second\n")
    git(repo, "commit", "-qam", "second")
    assert dstack("run", "show", *run, cwd=repo).out.splitlines()[0] == "second"


def test_one_matcher_for_key_and_tree() -> None:
    """The globs' meaning, pinned: relative to the project folder, `*` crosses `/`, `**/` may match no
    folder, a folder includes what is under it, `[]` is no file; the key covers exactly the tree."""
    from dstack.graph import filter_code
    from dstack.repo import working_tree
    from dstack.store.objects import Manifest, ManifestEntry

    paths = ["p/a.py", "p/src/b.py", "p/src/deep/c.py", "p/docs/x.cfg", "p/README.md", "top.py", "q/src/d.py"]
    files = Manifest(entries=[ManifestEntry(path=p, digest="0" * 64, size=1, mode=0o644) for p in paths])

    def picked(include: list[str] | None) -> list[str]:
        tree = [e.path for e in working_tree(files, "p", include).entries]
        assert [e.path for e in filter_code(files, "p", include).entries] == tree
        return tree

    assert picked(None) == paths
    assert picked([]) == []
    assert picked(["**/*.py"]) == ["p/a.py", "p/src/b.py", "p/src/deep/c.py"]
    assert picked(["*.py"]) == ["p/a.py", "p/src/b.py", "p/src/deep/c.py"]
    assert picked(["./src", "*.cfg"]) == ["p/src/b.py", "p/src/deep/c.py", "p/docs/x.cfg"]
    assert picked(["src/**"]) == ["p/src/b.py", "p/src/deep/c.py"]
    assert picked(["README.MD"]) == []  # case-sensitive


STRAY = """\
workflows:
  - name: leaves-a-process
    commands: ["(sleep 1.5; echo late > data.txt) > /dev/null 2>&1 &"]
  - name: show
    commands: ["sleep 3", "cat data.txt"]
"""


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_a_tree_whose_job_left_a_process_is_not_reused(
    make_repo, where: str, request: pytest.FixtureRequest
) -> None:
    """Its process may still write there: the next job must not get that tree."""
    repo = make_repo({".dstack/workflows.yaml": STRAY, "data.txt": "original\n"})
    host = "local"
    if where == "ssh":
        request.getfixturevalue("ssh_pool")
        add_host(request.getfixturevalue("sshd"), repo, "box")
        host = "box"
    dstack("run", "show", "--host", host, cwd=repo)  # a tree for the repo's pool
    dstack("run", "leaves-a-process", "--host", host, cwd=repo)
    assert dstack("run", "show", "--host", host, "--force", cwd=repo).out.splitlines() == ["original"]


def test_a_finished_jobs_tree_is_handed_back_on_an_ssh_host(make_repo, sshd: SSHServer, ssh_pool) -> None:
    """The scheduler pass that cleans up after a job hands its tree back as a spare, never just removes it."""
    repo = make_repo(
        {".dstack/workflows.yaml": "workflows:\n  - name: hi\n    commands: [echo hi]\n", "data.txt": "x\n"}
    )
    add_host(sshd, repo, "box")
    dstack("run", "hi", "--host", "box", cwd=repo)
    root = sshd.dir / "home" / ".dstack"
    assert not list(root.glob("jobs/*/work"))  # cleaned up
    assert [p for p in root.glob("checkouts/*/*") if p.is_dir()]  # as a spare tree of the repo's pool
