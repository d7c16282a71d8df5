"""Creating runs and driving them to the end.

`create_run` records the repo state and one job per workflow the run needs (reusing finished jobs with
the same key), then `start_orchestrator` forks a detached process that places and starts jobs, watches
them, saves their artifacts and finishes the run. The CLI only follows: killing it never stops a run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.errors import DstackError, HostError, RunError, UsageError
from dstack.store.state import ACTIVE_JOB, ACTIVE_RUN, ArtifactRow, Job, Run, State

if TYPE_CHECKING:
    from dstack.backends.base import Capacity, JobState, Runner
    from dstack.store.objects import Manifest, ObjectStore


log = logging.getLogger("dstack.orchestrator")
REAL_TIME_INTERVAL = float(os.environ.get("DSTACK_REAL_TIME_INTERVAL", "5"))
HOST_LOST_S = float(os.environ.get("DSTACK_HOST_LOST_S", "15"))  # noticed within 30 s


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
    from dstack.graph import Node, compute_keys, resolve_graph
    from dstack.names import run_name
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
    if req.host and req.host != "local":
        if state.db.execute("SELECT 1 FROM hosts WHERE name = ?", (req.host,)).fetchone() is None:
            raise UsageError(f"no host named '{req.host}'", hint="see `dstack hosts`")
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

    taken = {r[0] for r in state.db.execute("SELECT name FROM runs")}
    name = run_name(taken)
    now = time.time()
    run = Run(
        id=uuid.uuid4().hex,
        name=name,
        workflow=req.workflow,
        status="pending",
        project_root=str(project.root),
        repo_root=str(repo.repo_root),
        working_subdir=repo.working_subdir,
        remote_url=repo.remote_url,
        branch=repo.branch,
        commit_sha=repo.commit,
        diff=repo.diff,
        untracked=repo.untracked,
        code_manifest=code_name,
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
    for i, node in enumerate(nodes):
        job_id = f"{name}-{node.workflow}".replace("/", "-")[:60] + f"-{uuid.uuid4().hex[:6]}"
        ids[node.key] = job_id
        spec = node.spec
        if req.real_time_artifacts:
            for artifact in spec.artifacts:
                artifact.real_time = True
        for notice in spec.notices:
            if notice not in notices:
                notices.append(notice)
        upstream = [ids[k] for k in node.upstream_keys] + [j.id for t in node.tag_inputs for j in t.jobs]
        reused = None if req.force else state.reusable_job(node.key)
        if reused is not None and any(status_of[k] != "reused" for k in node.upstream_keys):
            reused = None  # an upstream runs again, so this one must too
        status_of[node.key] = "reused" if reused else "pending"
        job = Job(
            id=job_id,
            run_id=run.id,
            workflow=node.workflow,
            status=status_of[node.key],
            spec=_substitute_reserved(spec.model_dump(), name, job_id),
            key=node.key,
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


# -- the orchestrator ------------------------------------------------------------------------------------


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (guards against a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def orchestrator_alive(run: Run) -> bool:
    from dstack.backends.local import process_alive

    if run.orchestrator_pid is None:
        return False
    if not process_alive(run.orchestrator_pid):
        return False
    start = process_start(run.orchestrator_pid)
    return start is None or run.orchestrator_start is None or start == run.orchestrator_start


def start_orchestrator(state: State, run: Run) -> None:
    """Fork a detached orchestrator for the run (double fork: it outlives the CLI)."""
    from dstack.home import sub

    log = sub("runs") / f"{run.id}.log"
    expect = run.orchestrator_pid
    sys.stdout.flush()
    sys.stderr.flush()
    with state.closed_for_fork():
        pid = os.fork()
        if pid:
            os.waitpid(pid, 0)
            return
        _orchestrator_child(run.id, log, expect)


def _orchestrator_child(run_id: str, log: Path, expect: int | None) -> None:
    """The forked child: detach, send output to the run's orchestrator log, drive the run, exit."""
    try:  # first child
        os.setsid()
        if os.fork():
            os._exit(0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        logging.basicConfig(
            stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        code = 0
        try:
            orchestrate(run_id, expect)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    except BaseException:
        os._exit(1)


class Orchestrator:
    """Drives one run: places pending jobs, watches running ones, finishes the run."""

    def __init__(self, state: State, run: Run) -> None:
        from dstack.store import open_object_store

        self.state = state
        self.run = run
        self.store: ObjectStore = open_object_store(state)
        self.runners: dict[str, Runner] = {}
        self._local_capacity: Capacity | None = None
        self._code: Manifest | None = None
        self._log_offsets: dict[str, int] = {}
        self._rt_synced: dict[str, float] = {}
        self._unreachable_since: dict[str, float] = {}

    def runner(self, name: str) -> Runner:
        from dstack.runners import open_runner

        if name not in self.runners:
            self.runners[name] = open_runner(self.state, name)
        return self.runners[name]

    @property
    def local_capacity(self) -> Capacity:
        if self._local_capacity is None:
            from dstack.backends.local import LocalRunner

            self._local_capacity = LocalRunner().probe()
        return self._local_capacity

    @property
    def code(self) -> Manifest:
        if self._code is None:
            from dstack.graph import load_manifest

            self._code = load_manifest(self.store, self.run.code_manifest)
        return self._code

    def step(self) -> bool:
        """One pass over the run's jobs; True when the run is finished."""
        run = self.state.run(self.run.id)
        if run.status not in ACTIVE_RUN:
            return True
        from dstack.backends import ec2

        ec2.reap_idle(self.state)
        jobs = self.state.jobs(run.id)
        by_id = {j.id: j for j in jobs}
        for job in jobs:
            if job.status == "running":
                self.watch(job)
        for job in jobs:
            if job.status in ("pending", "waiting"):
                ups = [by_id.get(u) or self.state.job(u) for u in job.upstream]
                bad = [u for u in ups if u.status in ("failed", "stopped", "cancelled")]
                if bad:
                    self.state.transition(
                        job.id,
                        ("pending", "waiting"),
                        status="cancelled",
                        reason=f"upstream job {bad[0].workflow} {bad[0].status}",
                        finished_at=time.time(),
                    )
                elif all(u.status in ("done", "reused") for u in ups):
                    self.place(job, ups)
        jobs = self.state.jobs(run.id)
        if any(j.status in ACTIVE_JOB for j in jobs):
            if run.status == "pending" and any(j.status in ("starting", "running") for j in jobs):
                self.state.set_run(run.id, status="running")
            return False
        failed = [j for j in jobs if j.status not in ("done", "reused")]
        status = "failed" if failed else "done"
        if run.status == "stopping":
            status = "stopped"
        reason = None
        if failed and status == "failed":
            first = failed[0]
            reason = f"job {first.workflow} {first.status}" + (f": {first.reason}" if first.reason else "")
        self.state.set_run(run.id, status=status, finished_at=time.time(), reason=reason)
        return True

    def place(self, job: Job, upstream: list[Job]) -> None:
        """Start the job on a runner with room for it, or mark it waiting (or failed if none ever fits)."""
        from dstack.placement import reserve, shortfall
        from dstack.runners import available_slots
        from dstack.specs import JobSpec

        spec = JobSpec.model_validate(job.spec)
        slots = available_slots(self.state, self.local_capacity)
        pin = self.run.host_pin or ("local" if spec.resources.local else None)
        if pin:
            slots = [s for s in slots if s.name == pin]
            if not slots:
                self._fail(job, f"runner '{pin}' is not available (disabled, unreachable or removed)")
                return
        reasons = {s.name: shortfall(s.capacity, spec) for s in slots}
        fitting = [s for s in slots if reasons[s.name] is None]
        if not fitting:
            why = "; ".join(f"{n}: not enough {r}" for n, r in reasons.items()) or "no runner is enabled"
            from dstack.backends import ec2

            if not pin and ec2.configured(self.state):
                try:
                    launched = ec2.launch_for(self.state, spec)
                except DstackError as e:
                    self._fail(job, f"no runner fits this job and launching one failed: {e}")
                    return
                if launched is not None:
                    self.state.set_job(job.id, status="waiting", reason=f"launched {launched} for it")
                    return
                why += f"; ec2: {ec2.why_not(self.state, spec)}"
            self._fail(job, f"no runner could ever fit this job — {why}")
            return
        chosen = None
        with self.state.transaction():
            for slot in fitting:
                held = self.state.reservations(slot.name)
                reserved = reserve(slot.capacity, held, spec)
                if reserved is not None:
                    chosen = slot
                    self.state.set_job(job.id, status="starting", runner=slot.name, reserved=reserved)
                    break
        if chosen is None:
            if job.status != "waiting":
                self.state.set_job(
                    job.id, status="waiting", reason="no runner has " + _wants(spec) + " free now"
                )
            return
        self.start(job, spec, chosen.name, reserved or {}, upstream)

    def start(
        self, job: Job, spec: Any, runner_name: str, reserved: dict[str, Any], upstream: list[Job]
    ) -> None:
        from dstack.backends.base import DependencyArtifacts, JobContext
        from dstack.graph import load_manifest

        deps = []
        for up in upstream:
            deps.append(DependencyArtifacts(up.workflow, load_manifest(self.store, up.manifest)))
        ports = _free_ports(spec.ports.count) + list(spec.ports.fixed)
        ctx = JobContext(
            job_id=job.id,
            run_name=self.run.name,
            spec=spec,
            code=self.code,
            working_subdir=self.run.working_subdir,
            dependencies=deps,
            store=self.store,
            gpu_indexes=list(reserved.get("gpus", [])),
            ports=ports,
        )
        runner = self.runner(runner_name)
        try:
            runner.start_job(ctx)
        except DstackError as e:
            self._fail(job, f"could not start on {runner_name}: {e}")
            return
        log_path = getattr(runner, "log_path", None)
        local_log = str(log_path(job.id)) if log_path else str(self._mirror_path(job.id))
        if not self.state.transition(
            job.id, ("starting",), status="running", started_at=time.time(), reason=None, log_path=local_log
        ):
            runner.stop_job(job.id)  # stopped while it was starting
            runner.cleanup_job(job.id, keep=self.run.keep)

    def _mirror_path(self, job_id: str) -> Path:
        from dstack.home import sub

        return sub("logs") / f"{job_id}.log"

    def watch(self, job: Job) -> None:
        from dstack.specs import JobSpec

        runner = self.runner(job.runner or "local")
        name = job.runner or "local"
        if job.runner != "local" and name not in self._unreachable_since:
            self._mirror_log(runner, job)
        try:
            state = runner.poll_job(job.id)
        except HostError as e:
            lost = self._host_unreachable(job, e)
            if lost is None:
                return
            state = lost
        else:
            if self._unreachable_since.pop(name, None) is not None:
                self._mirror_log(runner, job)  # back: catch up on what it printed meanwhile
        if state.status == "running":
            self._sync_real_time(runner, job)
            return
        if job.runner != "local":
            self._mirror_log(runner, job)
        spec = JobSpec.model_validate(job.spec)
        now = time.time()
        if state.status == "exited" and state.exit_code == 0:
            try:
                manifest, missing = runner.collect_artifacts(
                    job.id, spec, self.store, self.run.working_subdir
                )
            except DstackError as e:
                self._fail(job, f"saving artifacts failed: {e}")
                return
            name = f"jobs/{job.id}/attempt-{job.attempt}"
            self.store.put_manifest(name, manifest)
            rows = [ArtifactRow(job.id, e.path, e.size, e.mode, e.digest) for e in manifest.entries]
            status, reason = "done", None
            if missing:
                status, reason = "failed", f"artifact path {missing[0]!r} was not created by the job"
            self.state.save_artifact_rows(
                job.id, rows, name, status=status, exit_code=0, reason=reason, finished_at=now
            )
        elif state.status == "exited":
            reason = state.reason or f"exited with code {state.exit_code}"
            last = self._last_log_line(job)
            if last and state.exit_code != 143:
                reason += f": {last}"
            self.state.transition(
                job.id,
                ("running",),
                status="failed",
                exit_code=state.exit_code,
                reason=reason,
                finished_at=now,
            )
        else:
            self._retry_or_fail(job, spec, state.reason or "the job was lost", "host-lost")
        runner.cleanup_job(job.id, keep=self.run.keep)

    def _last_log_line(self, job: Job) -> str:
        """The job's last line of output (what a failure most often says), cut to 200 characters."""
        path = self.state.job(job.id).log_path
        if not path:
            return ""
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4096))
                lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:200] if lines else ""

    def _host_unreachable(self, job: Job, error: HostError) -> JobState | None:
        """A host that stops answering for HOST_LOST_S seconds loses its jobs (None: keep waiting)."""
        from dstack.backends import ec2
        from dstack.backends.base import JobState

        name = job.runner or "local"
        first = self._unreachable_since.setdefault(name, time.monotonic())
        log.warning("host %s unreachable for %.1fs: %s", name, time.monotonic() - first, error)
        if ec2.configured(self.state) and ec2.check_host(self.state, name) is not None:
            return None  # the instance is gone: its jobs were interrupted (and placed again if allowed)
        if time.monotonic() - first < HOST_LOST_S:
            return None
        self.state.db.execute(
            "UPDATE hosts SET status = 'unreachable', last_error = ? WHERE name = ?", (str(error), name)
        )
        return JobState("lost", reason=f"host {name} stopped answering: {error}")

    def _sync_real_time(self, runner: Runner, job: Job) -> None:
        """Save `real-time` (and `mount`) artifacts while the job runs, so a checkpoint outlives the host."""
        from dstack.specs import JobSpec

        if not any(a.get("real_time") or a.get("mount") for a in job.spec.get("artifacts", [])):
            return
        now = time.monotonic()
        if now - self._rt_synced.get(job.id, 0.0) < REAL_TIME_INTERVAL:
            return
        self._rt_synced[job.id] = now
        spec = JobSpec.model_validate(job.spec)
        spec.artifacts = [a for a in spec.artifacts if a.real_time or a.mount]
        try:
            manifest, _ = runner.collect_artifacts(job.id, spec, self.store, self.run.working_subdir)
        except DstackError:
            return
        if not manifest.entries:
            return
        name = f"jobs/{job.id}/rt-{manifest.digest()[:16]}"
        self.store.put_manifest(name, manifest)
        rows = [ArtifactRow(job.id, e.path, e.size, e.mode, e.digest) for e in manifest.entries]
        self.state.save_artifact_rows(job.id, rows, name)

    def _retry_or_fail(self, job: Job, spec: Any, reason: str, kind: str) -> None:
        retry = spec.retry
        if retry is not None and job.attempt <= retry.limit and kind in retry.on:
            self.state.transition(
                job.id,
                ("running", "starting"),
                status="pending",
                runner=None,
                reserved=None,
                attempt=job.attempt + 1,
                reason=f"attempt {job.attempt} failed ({reason}); retrying",
            )
            return
        self.state.transition(
            job.id, ("running", "starting"), status="failed", reason=reason, finished_at=time.time()
        )

    def _fail(self, job: Job, reason: str) -> None:
        self.state.transition(
            job.id,
            ("pending", "waiting", "starting", "running"),
            status="failed",
            reason=reason,
            finished_at=time.time(),
        )

    def _mirror_log(self, runner: Runner, job: Job) -> None:
        path = self._mirror_path(job.id)
        offset = self._log_offsets.get(job.id)
        if offset is None:
            offset = path.stat().st_size if path.exists() else 0
        with open(path, "ab") as f:
            while True:  # a runner hands back a bounded chunk per call
                try:
                    data = runner.read_log(job.id, offset)
                except HostError:
                    self._unreachable_since.setdefault(job.runner or "local", time.monotonic())
                    break
                except DstackError:
                    break
                if not data:
                    break
                f.write(data)
                offset += len(data)
        self._log_offsets[job.id] = offset

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()


def orchestrate(run_id: str, expect_pid: int | None = None) -> None:
    """Drive a run to its end (runs in the detached orchestrator process)."""
    from dstack.store.state import open_state

    state = open_state()
    try:
        me = os.getpid()
        if not state.claim_orchestrator(run_id, me, process_start(me), expect_pid):
            return
        orch = Orchestrator(state, state.run(run_id))
        started = time.monotonic()
        try:
            while not orch.step():
                time.sleep(0.02 if time.monotonic() - started < 3 else 0.2)
        finally:
            orch.close()
    finally:
        state.close()


def repair(state: State) -> list[Run]:
    """Give every unfinished run whose orchestrator died a new one; returns those runs."""
    resumed = []
    for run in state.runs(active_only=True):
        if run.orchestrator_pid is not None and not orchestrator_alive(run):
            start_orchestrator(state, run)
            resumed.append(run)
        elif run.orchestrator_pid is None and time.time() - run.created_at > 10:
            start_orchestrator(state, run)
            resumed.append(run)
    return resumed


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


def _wants(spec: Any) -> str:
    res = spec.resources
    parts = [f"{res.cpu or 1:g} CPU"]
    if res.memory_mib:
        parts.append(f"{res.memory_mib} MiB memory")
    if res.gpu.count:
        parts.append(f"{res.gpu.count} {res.gpu.name or ''} GPU".replace("  ", " "))
    return ", ".join(parts)


def _free_ports(count: int) -> list[int]:
    import socket

    ports, socks = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        socks.append(s)
    for s in socks:
        s.close()
    return ports


# -- following a run ------------------------------------------------------------------------------------


@dataclass
class LogEvent:
    """A line of a job's output, or a change of a job's status."""

    workflow: str
    job_id: str
    text: str
    kind: str = "log"  # "log" | "status"


def follow_run(state: State, run_id: str, follow: bool = True, poll: float = 0.05) -> Iterator[LogEvent]:
    """Yield the run's output (and status changes) from the start; with `follow`, until the run ends."""
    offsets: dict[str, int] = {}
    partial: dict[str, bytes] = {}
    seen: dict[str, str] = {}
    while True:
        run = state.run(run_id)
        done = run.status not in ACTIVE_RUN
        if not done and follow and not orchestrator_alive(run) and run.orchestrator_pid is not None:
            start_orchestrator(state, run)
        for job in state.jobs(run_id):
            label = job.status if not job.reason else f"{job.status}: {job.reason}"
            if seen.get(job.id) != label:
                seen[job.id] = label
                yield LogEvent(job.workflow, job.id, label, "status")
            if not job.log_path:
                continue
            try:
                with open(job.log_path, "rb") as f:
                    f.seek(offsets.get(job.id, 0))
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            offsets[job.id] = offsets.get(job.id, 0) + len(data)
            data = partial.pop(job.id, b"") + data
            lines = data.split(b"\n")
            if lines[-1]:
                partial[job.id] = lines[-1]
            for line in lines[:-1]:
                yield LogEvent(job.workflow, job.id, line.decode(errors="replace"))
        if done or not follow:
            for job_id, rest in partial.items():
                job = state.job(job_id)
                yield LogEvent(job.workflow, job_id, rest.decode(errors="replace"))
            return
        time.sleep(poll)
