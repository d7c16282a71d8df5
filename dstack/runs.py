"""Creating runs and stopping them.

`create_run` records the repo state and one job per workflow the run needs (reusing finished jobs with
the same key); `dstack.orchestrator` then drives the run to its end in a detached process.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.errors import DstackError, RunError, UsageError
from dstack.store.state import ACTIVE_RUN, Job, Run, State

if TYPE_CHECKING:
    from dstack.backends.base import Runner
    from dstack.plans import Plan
    from dstack.store.objects import ObjectStore


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


@dataclass
class CreatedRun:
    run: Run
    jobs: list[Job]
    notices: list[str]


def create_run(state: State, req: RunRequest) -> CreatedRun:
    """Resolve the graph, snapshot the repo, and record the run with its jobs (reused ones done already)."""
    from dstack.plans import fingerprint, recall_plan, remember_plan

    if req.host and req.host != "local":
        if state.db.execute("SELECT 1 FROM hosts WHERE name = ?", (req.host,)).fetchone() is None:
            raise UsageError(f"no host named '{req.host}'", hint="see `dstack hosts`")
    fp = None if req.reproduce else fingerprint(state, req)
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
        store = open_object_store(state, _project_store(project))
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
    return plan_from_nodes(project, repo, code_name, nodes), req, reproduce_of


def _record_run(state: State, req: RunRequest, plan: Plan, reproduce_of: str | None) -> CreatedRun:
    """Record the planned run and its jobs; a job whose key already succeeded is reused, done at once."""
    from dstack.names import run_name

    taken = {r[0] for r in state.db.execute("SELECT name FROM runs")}
    name = run_name(taken)
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
    )
    jobs: list[Job] = []
    ids: dict[str, str] = {}
    status_of: dict[str, str] = {}
    notices: list[str] = []
    for i, planned in enumerate(plan.jobs):
        job_id = f"{name}-{planned.workflow}".replace("/", "-")[:60] + f"-{uuid.uuid4().hex[:6]}"
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
            spec=_substitute_reserved(copy.deepcopy(planned.spec), name, job_id),
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
    state.insert_run(run, jobs)
    return CreatedRun(run, jobs, notices)


def _snapshot(project_root: Path, store: ObjectStore) -> Any:
    from dstack.home import sub
    from dstack.repo import snapshot_repo
    from dstack.store.digests import DigestCache

    with DigestCache(sub("cache") / "digests.sqlite") as cache:
        return snapshot_repo(project_root, store, cache)


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


def _project_store(project: Any) -> dict[str, str]:
    settings = getattr(project, "settings", None)
    if settings is not None and getattr(settings, "bucket", None):
        return {"url": f"s3://{settings.bucket}", "region": settings.region or ""}
    return {}


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
    """Stop a run: end its running jobs' process trees, cancel the rest."""
    run = state.run(ref)
    if run.status not in ACTIVE_RUN:
        raise RunError(f"run {run.name} is not running (it is {run.status})")
    state.set_run(run.id, status="stopping")
    from dstack.runners import open_runner

    runners: dict[str, Runner] = {}
    for job in state.jobs(run.id):
        if job.status in ("pending", "waiting"):
            state.transition(
                job.id,
                ("pending", "waiting"),
                status="cancelled",
                reason="run stopped",
                finished_at=time.time(),
            )
        elif job.status in ("starting", "running"):
            state.transition(
                job.id,
                ("starting", "running"),
                status="stopped",
                reason="stopped by user",
                finished_at=time.time(),
            )
            name = job.runner or "local"
            runner = runners.setdefault(name, open_runner(state, name))
            try:
                runner.stop_job(job.id)
                runner.cleanup_job(job.id, keep=run.keep)
            except DstackError:
                pass
    for runner in runners.values():
        runner.close()
    state.set_run(run.id, status="stopped", finished_at=time.time(), reason="stopped by user")
    return state.run(run.id)


def retry_or_fail(state: State, job: Job, reason: str, kind: str, allow_retry: bool = True) -> bool:
    """A job that ended by `kind` ("host-lost", "interruption", "error"): back to pending for another attempt
    when its `retry` allows that kind, else failed with the reason. False if it had already moved on."""
    import time

    from dstack.specs import JobSpec

    rule = JobSpec.model_validate(job.spec).retry
    if allow_retry and rule is not None and job.attempt <= rule.limit and kind in rule.on:
        return state.transition(
            job.id, ("starting", "running"), status="pending", runner=None, reserved=None,
            attempt=job.attempt + 1, reason=f"attempt {job.attempt} failed ({reason}); retrying",
        )  # fmt: skip
    return state.transition(
        job.id, ("starting", "running"), status="failed", reason=reason, finished_at=time.time()
    )
