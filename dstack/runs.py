"""Creating runs and stopping them.

`create_run` records the repo state and one job per workflow the run needs (reusing finished jobs with
the same key, or joining ones running now); `dstack.scheduler` then drives the run to its end.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.errors import DstackError, RepoError, RunError, UsageError
from dstack.store.state import ACTIVE_RUN, Job, Run, State

if TYPE_CHECKING:
    from dstack.backends.base import Runner
    from dstack.plans import Plan
    from dstack.settings import StorageSettings
    from dstack.store.objects import ObjectStore


PLACED = ("starting", "running", "waiting")  # what a job on a runner may be (waiting: in the runner's queue)


@dataclass
class RunRequest:
    """What `dstack run` was asked."""

    workflow: str
    cwd: Path
    overrides: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    host: str | None = None
    force: bool = False
    keep: bool = False
    grid: list[dict[str, str]] | None = None  # a sweep: one set of overrides per combination
    reproduce: str | None = None  # run again a past run, with its exact repo state and variables
    real_time_artifacts: bool = False
    origin: str | None = None  # what started it (a trigger); None: by hand
    from_commit: str | None = None  # a commit (e.g. "HEAD"): its tree only, never uncommitted work
    skip_if_reused: bool = False  # record nothing when every job would only be reused


@dataclass
class CreatedRun:
    run: Run
    jobs: list[Job]
    notices: list[str]
    recorded: bool = True


def create_run(state: State, req: RunRequest) -> CreatedRun:
    """Resolve the graph, snapshot the repo, and record the run with its jobs (reused ones done already)."""
    from dstack.plans import fingerprint, recall_plan, remember_plan

    if req.host and req.host != "local":
        if not state.host_exists(req.host):
            raise UsageError(f"no host named '{req.host}'", hint="see `dstack hosts`")
    fp = None if req.reproduce or req.from_commit else fingerprint(state, req)
    plan = recall_plan(state, fp) if fp is not None else None
    if plan is not None:  # the same inputs as a run before: its plan, without reading them again
        return _record_run(state, req, plan, None)
    plan, effective, reproduce_of = _work_out_plan(state, req)
    created = _record_run(state, effective, plan, reproduce_of)
    if fp is not None:
        remember_plan(state, req, fp, plan)
    return created


def _work_out_plan(state: State, req: RunRequest) -> tuple[Plan, RunRequest, str | None]:
    """Read `.dstack/`, snapshot the repo, resolve the graph and compute each job's key; with the
    request as run (a reproduction's is the past run's) and the run it reproduces."""
    from dstack.graph import Node, compute_keys, resolve_graph
    from dstack.plans import plan_from_nodes
    from dstack.store import open_object_store

    reproduce_of = None
    if req.reproduce:
        old = state.run(req.reproduce)
        reproduce_of = old.id
        store = open_object_store(state)
        project, repo = _past_project(state, old, store)
        req = RunRequest(
            old.workflow,
            req.cwd,
            dict(old.variables),
            list(old.args),
            host=req.host,
            force=True,
            keep=req.keep,
            grid=_grid_of(old),
            real_time_artifacts=req.real_time_artifacts,
        )
    else:
        from dstack.workflows import load_project

        project = load_project(req.cwd)
        project.check_files()  # before the snapshot, whose git would trip on a FIFO less clearly
        store = open_object_store(state, _project_store(project))
        if req.from_commit:
            project, repo = _commit_project(project.root, store, req.from_commit)
        else:
            repo = _snapshot(project.root, store)
    code_digest = repo.files.digest()
    code_name = f"code/{code_digest}"
    if not store.has_manifest(code_name):  # named by its content: there already means the same
        store.put_manifest(code_name, repo.files)

    nodes: list[Node] = []
    by_key: dict[str, Node] = {}
    for combo in req.grid or [req.overrides]:
        combo_nodes = resolve_graph(project, req.workflow, combo, req.args, state)
        compute_keys(combo_nodes, repo.files, repo.working_subdir, code_digest)
        for node in combo_nodes:
            if node.key not in by_key:  # upstream jobs a sweep's combinations share run once
                by_key[node.key] = node
                nodes.append(node)
    if req.real_time_artifacts:
        for node in nodes:
            for artifact in node.spec.artifacts:
                artifact.real_time = True
    plan = plan_from_nodes(project, repo, code_name, nodes)
    if req.from_commit:  # the project was read from the commit's tree: the run belongs to the real root
        plan.project_root = str(repo.project_root)
    return plan, req, reproduce_of


def _record_run(state: State, req: RunRequest, plan: Plan, reproduce_of: str | None) -> CreatedRun:
    """Record the planned run and its jobs; a job whose key already succeeded is reused, done at once."""
    from dstack.names import run_name, safe_id

    name = run_name(_TakenNames(state))
    now = time.time()
    run = Run(
        id=uuid.uuid4().hex,
        name=name,
        workflow=req.workflow,
        status="pending",
        project_root=plan.project_root,
        repo_root=plan.repo_root,
        working_subdir=plan.working_subdir,
        remote_url=plan.remote_url,
        branch=plan.branch,
        commit_sha=plan.commit,
        diff=plan.diff,
        untracked=list(plan.untracked),
        code_manifest=plan.code_manifest,
        variables=dict(req.overrides),
        args=req.args,
        sweep=name if req.grid and len(req.grid) > 1 else None,
        reproduce_of=reproduce_of,
        host_pin=req.host,
        force=req.force,
        keep=req.keep,
        orchestrator_pid=None,
        orchestrator_start=None,
        reason=None,
        created_at=now,
        finished_at=None,
        origin=req.origin,
    )
    jobs: list[Job] = []
    ids: dict[str, str] = {}
    status_of: dict[str, str] = {}
    notices: list[str] = []
    for i, planned in enumerate(plan.jobs):
        job_id = f"{safe_id(f'{name}-{planned.workflow}')}-{uuid.uuid4().hex[:6]}"
        ids[planned.key] = job_id
        for notice in planned.notices:
            if notice not in notices:
                notices.append(notice)
        upstream = [ids[k] for k in planned.upstream_keys] + list(planned.tag_jobs)
        reused = None if req.force else state.reusable_job(planned.key)
        if reused is not None and any(status_of[k] != "reused" for k in planned.upstream_keys):
            reused = None  # an upstream runs again, so this one must too
        status_of[planned.key] = "reused" if reused else "pending"
        job = Job(
            id=job_id,
            run_id=run.id,
            workflow=planned.workflow,
            status=status_of[planned.key],
            spec_data=_substitute_reserved(copy.deepcopy(planned.spec), name, job_id),
            key=planned.key,
            upstream=upstream,
            reused_from=(reused.reused_from or reused.id) if reused else None,
            runner=None,
            reserved=None,
            attempt=1,
            exit_code=0 if reused else None,
            reason=None,
            manifest=reused.manifest if reused else None,
            log_path=None,
            created_at=now + i * 1e-6,
            started_at=None,
            finished_at=now if reused else None,
            run_name=name,
        )
        jobs.append(job)
    if all(j.status == "reused" for j in jobs):
        run.status, run.finished_at = "done", now
        if req.skip_if_reused:
            return CreatedRun(run, jobs, notices, recorded=False)
    state.insert_run(run, jobs, join=not req.force)
    return CreatedRun(run, jobs, notices)


class _TakenNames(set):  # type: ignore[type-arg]
    """Run names in use, asked one at a time (not every name of a long history read for each run)."""

    def __init__(self, state: State) -> None:
        super().__init__()
        self.state = state

    def __bool__(self) -> bool:
        return True

    def __contains__(self, name: object) -> bool:
        return self.state.run_named(str(name))


def _snapshot(project_root: Path, store: ObjectStore) -> Any:
    from dstack.home import sub
    from dstack.repo import snapshot_repo
    from dstack.store.digests import DigestCache

    with DigestCache(sub("cache") / "digests.sqlite") as cache:
        return snapshot_repo(project_root, store, cache)


def _commit_project(project_root: Path, store: ObjectStore, rev: str) -> tuple[Any, Any]:
    """The `.dstack/` and files of one commit, checked out into a temporary folder (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    from dstack.repo import snapshot_commit
    from dstack.workflows import load_project

    tmp = Path(tempfile.mkdtemp(prefix="dstack-commit-"))
    atexit.register(shutil.rmtree, tmp, True)
    repo = snapshot_commit(project_root, store, rev, tmp)
    if not (tmp / repo.working_subdir / ".dstack").is_dir():
        raise RepoError(f"commit {(repo.commit or rev)[:12]} has no .dstack/ folder", hint="commit .dstack/")
    return load_project(tmp / repo.working_subdir), repo


def _past_project(state: State, old: Run, store: ObjectStore) -> tuple[Any, Any]:
    """The `.dstack/` and repo state of a past run, read back from the store."""
    import tempfile

    from dstack.artifacts import materialize
    from dstack.graph import load_manifest
    from dstack.repo import RepoState
    from dstack.workflows import load_project

    if not old.code_manifest:
        raise RunError(f"run {old.name} has no recorded repo state to reproduce")
    files = load_manifest(store, old.code_manifest)
    sub = "" if old.working_subdir in ("", ".") else old.working_subdir.rstrip("/") + "/"
    config = [e for e in files.entries if e.path.startswith(sub + ".dstack/")]
    tmp = Path(tempfile.mkdtemp(prefix="dstack-reproduce-"))
    materialize(config, store, tmp)
    project = load_project(tmp / (sub or "."))
    repo = RepoState(
        repo_root=Path(old.repo_root),
        project_root=Path(old.project_root),
        remote_url=old.remote_url,
        branch=old.branch,
        commit=old.commit_sha,
        diff=old.diff or "",
        untracked=old.untracked,
        files=files,
        working_subdir=old.working_subdir,
    )
    return project, repo


def _grid_of(run: Run) -> list[dict[str, str]] | None:
    from dstack.sweeps import expand_grid

    grid = expand_grid(run.variables)
    return grid if len(grid) > 1 else None


def _project_store(project: Any) -> StorageSettings | None:
    """The store the repo's `.dstack/config.yaml` names (a bucket), if any."""
    from dstack.settings import StorageSettings

    settings = getattr(project, "settings", None)
    if settings is not None and getattr(settings, "bucket", None):
        return StorageSettings(f"s3://{settings.bucket}", region=settings.region or None)
    return None


def _substitute_reserved(spec: dict[str, Any], run_name: str, job_id: str) -> dict[str, Any]:
    """`${{ run_name }}` / `${{ job_id }}` in fields other than commands (those use env vars)."""
    import re

    pattern = re.compile(r"\$\{\{\s*(run_name|job_id)\s*\}\}")

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(lambda m: run_name if m.group(1) == "run_name" else job_id, value)
        if isinstance(value, list):
            return [sub(v) for v in value]
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        return value

    commands = spec.pop("commands", [])
    spec = sub(spec)
    spec["commands"] = commands
    return spec


def stop_run(state: State, ref: str) -> Run:
    """Stop a run: end a stuck orchestrator and the running jobs' process trees, cancel the other jobs."""
    from dstack.scheduler.daemon import kill_orchestrator

    run = state.run(ref)
    if run.status not in ACTIVE_RUN:
        raise RunError(f"run {run.name} is not running (it is {run.status})")
    state.set_run(run.id, status="stopping")
    kill_orchestrator(run, only_stuck_cli=True)
    end_jobs(state, run, "stopped", "stopped by user")
    state.set_run(run.id, status="stopped", finished_at=time.time(), reason="stopped by user")
    return state.run(run.id)


def fail_run(state: State, run: Run, reason: str) -> None:
    """Fail a run nothing drives any more: end its jobs (releasing what they reserved), record the reason."""
    end_jobs(state, run, "failed", f"run failed: {reason}")
    state.set_run(run.id, status="failed", finished_at=time.time(), reason=reason)


def end_jobs(state: State, run: Run, status: str, reason: str) -> None:
    """End the run's running jobs' process trees (they become `status`) and cancel the ones not started."""
    from dstack.backends import open_runner

    runners: dict[str, Runner] = {}
    for job in state.jobs(run.id):
        if job.status in ("pending", "waiting") and not job.runner:
            state.transition(
                job.id,
                ("pending", "waiting"),
                status="cancelled",
                reason="run stopped" if status == "stopped" else reason,
                finished_at=time.time(),
            )
        elif job.status in PLACED:  # placed: its runner ends it (a Slurm job waiting in its queue too)
            state.transition(job.id, PLACED, status=status, reason=reason, finished_at=time.time())
            name = job.runner or "local"
            try:
                runner = runners.setdefault(name, open_runner(state, name))
                runner.stop_job(job.id)
                runner.cleanup_job(job.id, keep=run.keep)
            except DstackError:
                pass
    for runner in runners.values():
        runner.close()


def retry_or_fail(state: State, job: Job, reason: str, kind: str, allow_retry: bool = True) -> bool:
    """A job that ended by `kind` ("host-lost", "interruption", "error"): back to pending for another attempt
    when its `retry` allows that kind, else failed with the reason. False if it had already moved on."""
    import time

    rule = job.spec.retry
    if allow_retry and rule is not None and job.attempt <= rule.limit and kind in rule.on:
        earlier = {"attempt": job.attempt, "runner": job.runner, "log_path": job.log_path}
        if job.manifest and job.manifest.startswith(f"jobs/{job.id}/rt-"):  # its last real-time artifacts:
            earlier["resume"] = job.manifest  # the next attempt starts from them
        return state.transition(
            job.id, PLACED, status="pending", runner=None, reserved=None,
            attempt=job.attempt + 1, reason=f"attempt {job.attempt} failed ({reason}); retrying",
            attempts=[*job.attempts, earlier], log_path=None,
        )  # fmt: skip
    return state.transition(job.id, PLACED, status="failed", reason=reason, finished_at=time.time())


def resume_point(job: Job) -> tuple[int, str] | None:
    """The real-time artifacts the job's next attempt starts from: (the attempt that saved them, manifest
    name); None when the last attempt had saved none."""
    if not job.attempts or not job.attempts[-1].get("resume"):
        return None
    name = str(job.attempts[-1]["resume"])
    saved_by = min(int(a["attempt"]) for a in job.attempts if a.get("resume") == name)
    return saved_by, name
