"""The exact state of the user's repo for a run: commit, branch, remote, diff, and every working-tree file."""

from __future__ import annotations

import fnmatch
import json
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.errors import RepoError

if TYPE_CHECKING:  # pydantic and the stores load only where a snapshot is taken or read
    from dstack.store.digests import DigestCache
    from dstack.store.objects import Manifest, ObjectStore

_GIT_ENV = {"GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}


@dataclass
class RepoState:
    """What a run was made from; `files` holds every tracked and untracked-not-ignored file, stored."""

    repo_root: Path
    project_root: Path
    remote_url: str | None
    branch: str | None
    commit: str | None  # None in a repo with no commits
    diff: str  # `git diff HEAD --binary`
    untracked: list[str] = field(default_factory=list)
    files: Manifest = field(default_factory=lambda: _manifest()())
    working_subdir: str = "."  # project_root relative to repo_root

    def to_json(self) -> str:
        """The state as JSON (for the state database)."""
        return json.dumps(
            {
                "repo_root": str(self.repo_root),
                "project_root": str(self.project_root),
                "remote_url": self.remote_url,
                "branch": self.branch,
                "commit": self.commit,
                "diff": self.diff,
                "untracked": self.untracked,
                "files": self.files.model_dump(),
                "working_subdir": self.working_subdir,
            }
        )

    @classmethod
    def from_json(cls, data: str) -> RepoState:
        """The state back from `to_json()`."""
        Manifest = _manifest()
        d = json.loads(data)
        return cls(
            repo_root=Path(d["repo_root"]),
            project_root=Path(d["project_root"]),
            remote_url=d["remote_url"],
            branch=d["branch"],
            commit=d["commit"],
            diff=d["diff"],
            untracked=d["untracked"],
            files=Manifest.model_validate(d["files"]),
            working_subdir=d["working_subdir"],
        )


def _manifest() -> type[Manifest]:
    from dstack.store.objects import Manifest

    return Manifest


def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, env={**os.environ, **_GIT_ENV}, check=False
        )
    except FileNotFoundError:
        raise RepoError(
            "git is not installed", hint="install Git and run dstack in your project's repo"
        ) from None
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise RepoError(f"`git {' '.join(args)}` failed in {cwd}: {tail[0]}")
    return proc


def _zlist(out: bytes) -> list[str]:
    return [os.fsdecode(p) for p in out.split(b"\0") if p]


def find_repo_root(project_root: Path) -> Path:
    """The top of the Git working tree holding `project_root`; RepoError if there is none."""
    if not project_root.is_dir():
        raise RepoError(f"{project_root} is not a directory")
    proc = _git(project_root, "rev-parse", "--show-toplevel", check=False)
    if proc.returncode != 0:
        raise RepoError(
            f"{project_root} is not inside a Git repository",
            hint="run `git init` there (dstack versions runs by the repo's state)",
        )
    return Path(os.fsdecode(proc.stdout.rstrip(b"\n")))


def _remote_url(repo_root: Path, branch: str | None) -> str | None:
    proc = _git(
        repo_root, "config", "-z", "--get-regexp", r"^(remote\..*\.url|branch\..*\.remote)$", check=False
    )
    values: dict[str, str] = {}
    for item in _zlist(proc.stdout):
        key, _, value = item.partition("\n")
        values[key] = value
    names = [branch and values.get(f"branch.{branch}.remote"), "origin"]
    for name in names:
        if name and f"remote.{name}.url" in values:
            return values[f"remote.{name}.url"]
    urls = [v for k, v in sorted(values.items()) if k.startswith("remote.")]
    return urls[0] if urls else None


def snapshot_repo(project_root: Path, store: ObjectStore, cache: DigestCache) -> RepoState:
    """Record the repo's exact state (commit, diff, untracked files) and store every working-tree file."""
    from dstack.artifacts import SourceFile, store_files

    project_root = project_root.absolute()
    repo_root = find_repo_root(project_root)
    head = _git(repo_root, "rev-parse", "-q", "--verify", "HEAD^{commit}", check=False)
    commit = head.stdout.decode().strip() if head.returncode == 0 else None
    ref = _git(repo_root, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    branch = ref.stdout.decode().strip() if ref.returncode == 0 else None
    diff = ""
    if commit is not None:
        diff = _git(repo_root, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff").stdout.decode(
            errors="replace"
        )
    tracked = _zlist(_git(repo_root, "ls-files", "-z", "--cached").stdout)
    untracked = _zlist(_git(repo_root, "ls-files", "-z", "--others", "--exclude-standard").stdout)

    found: dict[str, SourceFile] = {}
    top = os.fspath(repo_root)
    for rel in [*tracked, *untracked]:
        if rel in found:
            continue  # unmerged paths are listed once per stage
        path = os.path.join(top, rel)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # deleted but still tracked
        if stat.S_ISLNK(st.st_mode):
            found[rel] = SourceFile(rel, path, st, os.fsencode(os.readlink(path)))
        elif stat.S_ISREG(st.st_mode):
            found[rel] = SourceFile(rel, path, st)
        # directories here are submodules: not snapshotted
    files = store_files(found.values(), store, cache, under=top).manifest
    subdir = _working_subdir(project_root, repo_root)
    return RepoState(
        repo_root=repo_root,
        project_root=project_root,
        remote_url=_remote_url(repo_root, branch),
        branch=branch,
        commit=commit,
        diff=diff,
        untracked=untracked,
        files=files,
        working_subdir=subdir or ".",
    )


def snapshot_commit(project_root: Path, store: ObjectStore, rev: str, into: Path) -> RepoState:
    """The repo as committed at `rev` only (no diff, no untracked files); its files written under `into`."""
    from dstack.artifacts import SourceFile, store_files

    project_root = project_root.absolute()
    repo_root = find_repo_root(project_root)
    head = _git(repo_root, "rev-parse", "-q", "--verify", f"{rev}^{{commit}}", check=False)
    if head.returncode != 0:
        raise RepoError(f"'{rev}' is not a commit of {repo_root}", hint="commit your work first")
    commit = head.stdout.decode().strip()
    ref = _git(repo_root, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    branch = ref.stdout.decode().strip() if ref.returncode == 0 else None
    listing = []  # (mode, blob, path) of every file; submodules (commits) are not snapshotted
    for item in _git(repo_root, "ls-tree", "-r", "-z", "--full-tree", commit).stdout.split(b"\0"):
        if item:
            meta, _, name = item.partition(b"\t")
            mode, kind, blob = meta.split()
            if kind == b"blob":
                listing.append((mode, blob, os.fsdecode(name)))
    blobs = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=repo_root,
        input=b"".join(blob + b"\n" for _, blob, _ in listing),
        capture_output=True,
        env={**os.environ, **_GIT_ENV},
        check=True,
    ).stdout
    found: list[SourceFile] = []
    pos = 0
    for mode, _, rel in listing:
        end = blobs.index(b"\n", pos)
        size = int(blobs[pos:end].split()[2])
        data = blobs[end + 1 : end + 1 + size]
        pos = end + 2 + size
        path = os.path.join(into, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if mode == b"120000":
            os.symlink(data, path)
            found.append(SourceFile(rel, path, os.lstat(path), data))
            continue
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o755 if mode == b"100755" else 0o644)
        found.append(SourceFile(rel, path, os.lstat(path)))
    subdir = _working_subdir(project_root, repo_root)
    return RepoState(
        repo_root=repo_root,
        project_root=project_root,
        remote_url=_remote_url(repo_root, branch),
        branch=branch,
        commit=commit,
        diff="",
        untracked=[],
        files=store_files(found, store, None, under=os.fspath(into)).manifest,
        working_subdir=subdir or ".",
    )


def _working_subdir(project_root: Path, repo_root: Path) -> str:
    """The project root (the folder with `.dstack/`) relative to the repo root, "." when they are one."""
    try:
        return project_root.resolve().relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        return "."


def is_included(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative to the project folder) matches one of the `include` globs.

    The one matcher of `repo: include` (the job's key, every runner's working tree, triggers, watch):
    fnmatch-style and case-sensitive, `*` crosses `/`, `**/` also matches no folder, and a folder
    includes what is under it."""
    for pattern in patterns:
        pattern = pattern.strip().removeprefix("./")
        if fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern.rstrip("/") + "/"):
            return True
        if "**/" in pattern and fnmatch.fnmatchcase(path, pattern.replace("**/", "")):
            return True
    return False


def working_tree(files: Manifest, working_subdir: str, include: list[str] | None) -> Manifest:
    """The repo files a job's working tree holds and its key covers: all of `files` (paths relative to the
    repo root), or with `include` those whose path relative to the project folder matches a glob."""
    if include is None:
        return files
    prefix = "" if working_subdir in ("", ".") else working_subdir.strip("/") + "/"
    kept = [
        e for e in files.entries if e.path.startswith(prefix) and is_included(e.path[len(prefix) :], include)
    ]
    return _manifest()(entries=kept)


def checkout_files(
    files: Manifest, store: ObjectStore, target: Path, include: list[str] | None = None
) -> None:
    """Write a repo snapshot's files (those matching `include`, if given) into a job's working dir as
    copies (jobs may change them); files already there with the right content are kept."""
    from dstack.artifacts import materialize

    materialize(list(working_tree(files, ".", include).entries), store, target)


@dataclass
class RepoFingerprint:
    """The repo's state as stat data, read the way `git status` reads it: equal only where the snapshot
    would be (same commit, branch, file list, and each file's mode, size, mtime, ctime and inode)."""

    repo_root: Path
    commit: str | None
    branch: str | None
    digest: str
    recent: list[str]  # absolute paths of files changed since `since_ns`: their stat alone can't be trusted


def repo_fingerprint(project_root: Path, since_ns: int) -> RepoFingerprint | None:
    """The repo's fingerprint from two git calls and one lstat per file; None where it can't be told
    cheaply (no repo, a reftable or other unusual HEAD): then take a full snapshot.

    Files whose mtime or ctime is `since_ns` or later are listed in `recent`: one may change again within
    its timestamp's tick and keep its stat (Git's "racily clean" entries), so only its content tells."""
    import hashlib

    proc = _git(
        project_root, "rev-parse", "--show-toplevel", "--absolute-git-dir", "--git-common-dir", check=False
    )
    lines = proc.stdout.decode(errors="surrogateescape").split("\n")
    if proc.returncode != 0 or len(lines) < 3:
        return None
    top, git_dir = lines[0], Path(lines[1])
    common = Path(lines[2]) if os.path.isabs(lines[2]) else Path(project_root, lines[2])
    head = _read_head(git_dir, common)
    if head is None:
        return None
    listing = _git(
        Path(top), "ls-files", "-z", "-t", "--cached", "--others", "--exclude-standard", check=False
    )
    if listing.returncode != 0:
        return None
    rows: list[tuple[object, ...]] = []
    recent: list[str] = []
    lstat = os.lstat
    prefix = os.fsencode(top) + b"/"
    for item in listing.stdout.split(b"\0"):
        if not item:
            continue
        tag, path = item[:1], item[2:]  # "H" tracked, "?" untracked, …
        try:
            st = lstat(prefix + path)
        except OSError:
            rows.append((tag, path))
            continue
        rows.append((tag, path, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        if st.st_mtime_ns >= since_ns or st.st_ctime_ns >= since_ns:
            recent.append(os.fsdecode(prefix + path))
    config = _stat_row(common / "config")
    material = repr((head, config, rows)).encode("utf-8", "surrogateescape")
    return RepoFingerprint(
        repo_root=Path(top),
        commit=head[0],
        branch=head[1],
        digest=hashlib.blake2b(material, digest_size=32).hexdigest(),
        recent=recent,
    )


def _stat_row(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _read_head(git_dir: Path, common: Path) -> tuple[str | None, str | None] | None:
    """(commit, branch) as .git/HEAD and the refs say; None where it takes Git to tell (reftable…)."""
    try:
        head = (git_dir / "HEAD").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if (common / "reftable").exists():
        return None
    if not head.startswith("ref: "):
        return (head, None) if _is_oid(head) else None
    ref = head[5:]
    if not ref.startswith("refs/heads/"):
        return None
    branch = ref.removeprefix("refs/heads/")
    for folder in (git_dir, common):
        try:
            oid = (folder / ref).read_text().strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            return None
        return (oid, branch) if _is_oid(oid) else None
    try:
        packed = (common / "packed-refs").read_text()
    except FileNotFoundError:
        return (None, branch)  # a branch with no commits yet
    except (OSError, UnicodeDecodeError):
        return None
    for line in packed.splitlines():
        oid, _, name = line.partition(" ")
        if name == ref:
            return (oid, branch) if _is_oid(oid) else None
    return (None, branch)


def _is_oid(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)
