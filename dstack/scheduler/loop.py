"""The scheduler's loop: drives one run — one `step` places pending jobs (`placement`), watches running ones
(`watching`) and finishes the run. A step is a pass for each runner: a host polls all its running jobs in one
round trip as it begins and sends its starts and clean-ups in one as it ends (hosts at once). It runs in
`dstack run` while that follows the run, else in a detached process (`dstack.scheduler.daemon`); killing the
CLI never stops a run."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dstack.errors import DstackError, HostError
from dstack.scheduler.placement import place
from dstack.scheduler.watching import log_of, mirror_log, watch, watched
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
        self._in_pass = False
        self.changed_at = time.monotonic()  # when a step last saw a job change status (steps come fast then)
        self._statuses: dict[str, str] = {}

    def runner(self, name: str) -> Runner:
        from dstack.backends import open_runner

        if name not in self.runners:
            self.runners[name] = open_runner(self.state, name)
            if self._in_pass:
                self.runners[name].begin_pass([])
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
        running = [j for j in jobs if watched(j)]  # running, or waiting in its runner's queue
        placing = {j.id for j in jobs if j.status in ("pending", "waiting") and not watched(j)}
        began = time.time()
        self.begin_pass(running)
        try:
            for job in running:
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
        finally:
            self.end_pass()
        jobs = self.state.jobs(run.id)
        statuses = {j.id: j.status for j in jobs}
        if statuses != self._statuses:
            self._statuses, self.changed_at = statuses, time.monotonic()
        for job in jobs:  # those started in this pass (their launch went out at its end)
            if job.id not in placing or not job.runner or (job.started_at or 0) < began:
                continue
            if job.status in ("stopped", "cancelled"):  # stopped by another process before the launch
                self.stop_late(job)
            elif job.status == "running" and job.runner != "local":  # what it printed at once
                mirror_log(self, self.runner(job.runner), job)
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

    def begin_pass(self, running: list[Job]) -> None:
        """Tell each runner a pass starts (a remote one polls all its running jobs in one round trip)."""
        ids: dict[str, list[str]] = {name: [] for name in self.runners}
        for job in running:
            ids.setdefault(job.runner or "local", []).append(job.id)
        work = []
        for name, job_ids in ids.items():
            try:
                work.append((self.runner(name), job_ids))
            except DstackError:
                continue  # (watching its jobs says why)
        self._in_pass = True
        asked = time.monotonic()
        for (runner, _), (_, error) in zip(work, _each(work, lambda r, j: r.begin_pass(j)), strict=True):
            if isinstance(error, HostError):
                self.unreachable_since.setdefault(runner.name, asked)
            elif error is not None:
                raise error

    def end_pass(self) -> None:
        """Let each runner send what it kept for the pass's end (hosts at once); fail the jobs that could not
        start."""
        self._in_pass = False
        runners = list(self.runners.values())
        for runner, (failed, error) in zip(runners, _each(runners, lambda r: r.end_pass()), strict=True):
            if error is not None:
                raise error
            for job_id, why in failed.items():
                self.state.transition(
                    job_id,
                    ("starting", "running"),
                    status="failed",
                    reason=f"could not start on {runner.name}: {why}",
                    finished_at=time.time(),
                )

    def stop_late(self, job: Job) -> None:
        """Stop a job whose launch went out after it was stopped."""
        try:
            runner = self.runner(job.runner or "local")
            runner.stop_job(job.id)
            runner.cleanup_job(job.id, keep=self.run.keep)
        except DstackError:
            pass

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


def _each(items: list[Any], do: Callable[..., Any]) -> list[tuple[Any, Exception | None]]:
    """`do(*item)` (or `do(item)`) for each item, in threads when there are several: (what each returned,
    what it raised)."""

    def one(item: Any) -> tuple[Any, Exception | None]:
        try:
            return (do(*item) if isinstance(item, tuple) else do(item)), None
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            return None, e

    if len(items) < 2:
        return [one(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(one, items))
