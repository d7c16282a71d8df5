"""The scheduler's loop: drives one run — one `step` places pending jobs (`placement`), watches running ones
(`watching`) and finishes the run. It runs in `dstack run` while that follows the run, else in a detached
process (`dstack.scheduler.daemon`); killing the CLI never stops a run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dstack.errors import DstackError
from dstack.scheduler.placement import place
from dstack.scheduler.watching import log_of, watch, watched
from dstack.store.state import ACTIVE_JOB, ACTIVE_RUN, Job, Run, State

if TYPE_CHECKING:
    from dstack.backends.base import Capacity, Runner
    from dstack.store.objects import Manifest, ObjectStore


class Orchestrator:
    """Drives one run: places pending jobs, watches running ones, finishes the run."""

    def __init__(self, state: State, run: Run) -> None:
        from dstack.store import open_object_store

        self.state = state
        self.run = run
        self.store: ObjectStore = open_object_store(state)
        self.runners: dict[str, Runner] = {}
        self._local_capacity: Capacity | None = None
        self.docker_asked = self.gpus_asked = False
        self._code: Manifest | None = None
        self.log_offsets: dict[str, int] = {}
        self.rt_synced: dict[str, float] = {}
        self.unreachable_since: dict[str, float] = {}

    def runner(self, name: str) -> Runner:
        from dstack.backends import open_runner

        if name not in self.runners:
            self.runners[name] = open_runner(self.state, name)
        return self.runners[name]

    @property
    def local_capacity(self) -> Capacity:
        if self._local_capacity is None:
            from dstack.backends.local import LocalRunner

            # Docker and GPUs are asked about when a job needs them: a plain job starts without the wait
            self._local_capacity = LocalRunner().probe(docker=False, gpus=False)
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
        from dstack import capacity

        capacity.reap_idle(self.state)  # (a source's code is loaded only where it launched hosts)
        jobs = self.state.jobs(run.id)
        by_id = {j.id: j for j in jobs}
        for job in jobs:
            if watched(job):  # running, or waiting in its runner's queue
                watch(self, job)
        for job in jobs:
            if watched(job):  # placed (waiting in its runner's queue, say): never placed again
                continue
            if job.status in ("pending", "waiting") and job.joins and self.join(job):
                continue
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
                    place(self, job, ups)
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
        if failed and all(j.status == "stopped" for j in failed):  # e.g. stopped for inactivity
            status = "stopped"
            reason = "; ".join(f"job {j.workflow}: {j.reason}" for j in failed if j.reason) or None
        if failed and status == "failed":
            first = failed[0]
            reason = f"job {first.workflow} {first.status}" + (f": {first.reason}" if first.reason else "")
        self.state.set_run(run.id, status=status, finished_at=time.time(), reason=reason)
        return True

    def resume(self) -> None:
        """Jobs a dead orchestrator left `starting`: running if their process started, else pending again."""
        for job in self.state.jobs(self.run.id, statuses=("starting",)):
            try:
                started = self.runner(job.runner or "local").poll_job(job.id).status != "lost"
            except DstackError:
                started = False
            if started:
                self.state.transition(
                    job.id,
                    ("starting",),
                    status="running",
                    started_at=time.time(),
                    log_path=log_of(self, job),
                )
            else:
                self.state.transition(job.id, ("starting",), status="pending", runner=None, reserved=None)

    def join(self, job: Job) -> bool:
        """A job joined to another run's job with the same key: reuse its result once it is done, wait while
        it runs. False when that job failed (this one then runs itself)."""
        target = self.state.job(job.joins or "")
        if target.status in ("done", "reused") and target.manifest:
            self.state.transition(
                job.id,
                ("pending", "waiting"),
                status="reused",
                reused_from=target.reused_from or target.id,
                manifest=target.manifest,
                exit_code=0,
                reason=None,
                log_path=target.log_path,
                finished_at=time.time(),
            )
            return True
        if target.status in ACTIVE_JOB:
            why = f"joined job {target.id} of run {target.run_name} (same inputs): waiting for it"
            if job.reason != why or job.log_path != target.log_path:  # its output is this job's too
                self.state.set_job(job.id, status="waiting", reason=why, log_path=target.log_path)
            return True
        self.state.set_job(job.id, joins=None, reason=None)
        return False

    def fail(self, job: Job, reason: str) -> None:
        self.state.transition(
            job.id,
            ("pending", "waiting", "starting", "running"),
            status="failed",
            reason=reason,
            finished_at=time.time(),
        )

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
