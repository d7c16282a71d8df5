"""Plans remembered by their exact inputs, so a re-run reads neither `.dstack/` nor every repo file again.

A plan is what `create_run` works out before it records a run: the repo state to record and, per job, its
key, spec, upstream keys, tagged inputs and notices. It is kept under a fingerprint of all it was made
from: the request, the stat data of everything under `.dstack/`, of every repo file (as `git status` reads
it) and of dstack's own code, plus HEAD and the storage setting. The tags it read are checked again on
use. The same fingerprint means the same plan; anything else, and the plan is worked out again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.graph import Node
    from dstack.repo import RepoState
    from dstack.runs import RunRequest
    from dstack.store.state import State
    from dstack.workflows import Project

FORMAT = 1  # bump when a plan's meaning changes
# a file changed this recently may change again within its timestamp's tick and keep its stat (Git's
# "racily clean" files): a plan remembers such files' content digests and checks them on use
RACY_WINDOW_NS = 2_000_000_000
MAX_RECENT = 200  # more recent files than this (a fresh checkout): remember nothing until they settle


@dataclass
class PlannedJob:
    """One job of a plan, as `create_run` records it (the spec already a JSON-able dict)."""

    workflow: str
    key: str
    upstream_keys: list[str]
    spec: dict[str, Any]
    tag_jobs: list[str] = field(default_factory=list)  # the finished jobs behind its tagged inputs
    notices: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """A run's repo state and jobs, before anything is recorded."""

    project_root: str
    repo_root: str
    working_subdir: str
    remote_url: str | None
    branch: str | None
    commit: str | None
    diff: str
    untracked: list[str]
    code_manifest: str
    jobs: list[PlannedJob]
    tags: dict[str, list[str]] = field(default_factory=dict)  # label (`prepare:latest`) -> job ids read
    recent: dict[str, str] = field(default_factory=dict)  # path -> content digest of racy files

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        d["jobs"] = [PlannedJob(**j) for j in d["jobs"]]
        return cls(**d)


@dataclass
class Fingerprint:
    """What a plan is remembered under, and the input files too recent for their stat to be trusted."""

    digest: str
    recent: list[str]


def plan_from_nodes(project: Project, repo: RepoState, code_manifest: str, nodes: list[Node]) -> Plan:
    """The plan `create_run` worked out the long way: resolved nodes with their keys."""
    tags: dict[str, list[str]] = {}
    jobs = []
    for node in nodes:
        for t in node.tag_inputs:
            tags[t.label] = [j.id for j in t.jobs]
        jobs.append(
            PlannedJob(
                workflow=node.workflow,
                key=node.key,
                upstream_keys=list(node.upstream_keys),
                spec=json.loads(json.dumps(node.spec.model_dump())),
                tag_jobs=[j.id for t in node.tag_inputs for j in t.jobs],
                notices=list(node.spec.notices),
            )
        )
    return Plan(
        project_root=str(project.root),
        repo_root=str(repo.repo_root),
        working_subdir=repo.working_subdir,
        remote_url=repo.remote_url,
        branch=repo.branch,
        commit=repo.commit,
        diff=repo.diff,
        untracked=list(repo.untracked),
        code_manifest=code_manifest,
        jobs=jobs,
        tags=tags,
    )


def fingerprint(state: State, req: RunRequest) -> Fingerprint | None:
    """The fingerprint of a request's inputs as they are now; None where it can't be told cheaply."""
    from dstack.repo import repo_fingerprint

    cwd = Path(req.cwd).resolve()
    since = time.time_ns() - RACY_WINDOW_NS
    repo = repo_fingerprint(cwd, since)
    if repo is None:
        return None
    config, config_recent = _config_stat(cwd, repo.repo_root, since)
    material = {
        "format": FORMAT,
        "dstack": _code_stat(),
        "request": [
            req.workflow,
            str(cwd),
            sorted(req.overrides.items()),
            req.args,
            req.grid,
            req.real_time_artifacts,
        ],
        "config": config,
        "repo": [repo.digest, repo.commit, repo.branch],
        "storage": state.setting("storage"),
    }
    digest = hashlib.blake2b(json.dumps(material).encode(), digest_size=32).hexdigest()
    return Fingerprint(digest, sorted({*repo.recent, *config_recent}))


def recall_plan(state: State, fp: Fingerprint) -> Plan | None:
    """The plan remembered under `fp`, if the tags it read still name the same jobs."""
    from dstack.store.plans import read_plan

    text = read_plan(fp.digest)
    if text is None:
        return None
    try:
        plan = Plan.from_json(text)
    except (ValueError, TypeError, KeyError):
        return None  # written by another version: work it out again
    for label, job_ids in plan.tags.items():
        if _tag_jobs(state, label) != job_ids:
            return None
    for path, digest in plan.recent.items():
        if _content_digest(path) != digest:
            return None
    return plan


def remember_plan(state: State, req: RunRequest, fp: Fingerprint, plan: Plan) -> None:
    """Keep `plan` under `fp` (with the content of its recent files), unless an input changed while the
    plan was worked out."""
    if len(fp.recent) > MAX_RECENT:
        return
    plan.recent = {path: _content_digest(path) for path in fp.recent}
    again = fingerprint(state, req)
    if again is None or again.digest != fp.digest:
        return
    from dstack.store.plans import write_plan

    write_plan(fp.digest, plan.to_json())


def _tag_jobs(state: State, label: str) -> list[str] | None:
    """The job ids a `W:tag` / `:tag` input resolves to now (as `dstack.graph.resolve_tag` picks them)."""
    workflow, _, name = label.rpartition(":")
    tag = state.tag(name)
    if tag is None:
        return None
    jobs = [j for j in state.jobs(tag.run_id) if j.status in ("done", "reused") and j.manifest]
    return [j.id for j in jobs if not workflow or j.workflow == workflow]


def _config_stat(cwd: Path, repo_root: Path, since_ns: int) -> tuple[list[object], list[str]]:
    """Stat rows of everything under each `.dstack/` from `cwd` up to the repo root (ignored files too),
    and the files changed since `since_ns`."""
    rows: list[object] = []
    recent: list[str] = []
    for folder in (cwd, *cwd.parents):
        top = folder / ".dstack"
        for path, st in _walk(os.fspath(top)):
            rows.append((path, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            if st.st_mtime_ns >= since_ns or st.st_ctime_ns >= since_ns:
                recent.append(path)
        if folder == repo_root or not str(folder).startswith(str(repo_root)):
            break
    return rows, recent


def _content_digest(path: str) -> str:
    """What a file holds ("" for a folder or nothing): its digest, or a symlink's target's."""
    import stat

    from dstack.hashing import digest_bytes, digest_file

    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return "link:" + digest_bytes(os.fsencode(os.readlink(path)))
        if stat.S_ISREG(st.st_mode):
            return digest_file(Path(path))
    except OSError:
        pass
    return ""


def _walk(top: str) -> list[tuple[str, os.stat_result]]:
    try:
        found = [(top, os.lstat(top))]
    except OSError:
        return []
    try:
        with os.scandir(top) as it:
            entries = sorted(it, key=lambda e: e.name)
    except NotADirectoryError:
        return found
    except OSError:
        return found
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            found += _walk(entry.path)
        else:
            try:
                found.append((entry.path, os.stat(entry.path)))  # followed: the reader follows links
            except OSError:
                found.append((entry.path, entry.stat(follow_symlinks=False)))
    return found


_CODE: list[object] = []


def _code_stat() -> list[object]:
    """dstack's own source files and the interpreter's import paths, as stat data (once per process)."""
    if not _CODE:
        package = os.path.dirname(os.path.abspath(__file__))
        files = [(p, st.st_size, st.st_mtime_ns) for p, st in _walk(package) if p.endswith(".py")]
        paths = []
        for p in sys.path:
            try:
                paths.append((p, os.stat(p or ".").st_mtime_ns))  # a package installed or removed
            except OSError:
                paths.append((p, 0))
        _CODE.extend([sys.executable, sys.version, files, paths])
    return _CODE
