"""The orchestrator: drives one run — places and starts jobs, watches them, saves their artifacts and
finishes the run. It runs in `dstack run` while that follows the run, else in a detached process started
by `dstack.supervisor`; killing the CLI never stops a run."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.errors import DstackError, HostError
from dstack.metrics.track import track as track_metrics
from dstack.store.state import ACTIVE_JOB, ACTIVE_RUN, ArtifactRow, Job, Run, State

if TYPE_CHECKING:
    from dstack.backends.base import Capacity, JobState, Runner
    from dstack.store.objects import Manifest, ObjectStore

log = logging.getLogger("dstack.orchestrator")
REAL_TIME_INTERVAL = float(os.environ.get("DSTACK_REAL_TIME_INTERVAL", "5"))
HOST_LOST_S = float(os.environ.get("DSTACK_HOST_LOST_S", "15"))  # noticed within 30 s


class Orchestrator:
    """Drives one run: places pending jobs, watches running ones, finishes the run."""

    def __init__(self, state: State, run: Run) -> None:
        from dstack.store import open_object_store

        self.state = state
        self.run = run
        self.store: ObjectStore = open_object_store(state)
        self.runners: dict[str, Runner] = {}
        self._local_capacity: Capacity | None = None
        self._docker_asked = self._gpus_asked = False
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
            if job.status == "running":
                self.watch(job)
        for job in jobs:
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

    def resume(self) -> None:
        """Jobs a dead orchestrator left `starting`: running if their process started, else pending again."""
        for job in self.state.jobs(self.run.id, statuses=("starting",)):
            try:
                started = self.runner(job.runner or "local").poll_job(job.id).status != "lost"
            except DstackError:
                started = False
            if started:
                self.state.transition(
                    job.id, ("starting",), status="running", started_at=time.time(), log_path=self.log_of(job)
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

    def place(self, job: Job, upstream: list[Job]) -> None:
        """Start the job on a runner with room for it, or mark it waiting (or failed if none ever fits)."""
        from dstack.placement import reserve, shortfall
        from dstack.runners import available_slots
        from dstack.specs import JobSpec

        spec = JobSpec.model_validate(job.spec)
        if spec.image and not self._docker_asked:
            from dstack.backends.local import docker_answers

            self.local_capacity.docker, self._docker_asked = docker_answers(), True
        if spec.resources.gpu.count and not self._gpus_asked:
            from dstack.backends.local import local_gpus

            self.local_capacity.gpus, self._gpus_asked = local_gpus(), True
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
            from dstack.capacity import configured_sources

            for source in [] if pin else configured_sources(self.state):
                try:
                    launched = source.launch(self.state, spec)
                except DstackError as e:
                    self._fail(job, f"no runner fits this job and launching one failed: {e}")
                    return
                if launched is not None:
                    self.state.set_job(job.id, status="waiting", reason=f"launched {launched} for it")
                    return
                why += f"; {source.kind}: {source.why_not(self.state, spec)}"
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
            repo=self.run.repo_root,
        )
        runner = self.runner(runner_name)
        job.runner = runner_name
        local_log = self.log_of(job)
        self._keep_earlier_logs(job, local_log)
        try:
            runner.start_job(ctx)
        except (DstackError, OSError) as e:  # OSError: e.g. no space left for the job's files
            self._fail(job, f"could not start on {runner_name}: {e}")
            return
        if not self.state.transition(
            job.id, ("starting",), status="running", started_at=time.time(), reason=None, log_path=local_log
        ):
            runner.stop_job(job.id)  # stopped while it was starting
            runner.cleanup_job(job.id, keep=self.run.keep)

    def log_of(self, job: Job) -> str:
        """The file on this machine with the output of the job's current attempt."""
        path = self.runner(job.runner or "local").log_path(job.id)
        return str(path if path is not None else self._mirror_path(job))

    def _keep_earlier_logs(self, job: Job, path: str) -> None:
        """An earlier attempt's log at the path this attempt writes to (the local runner's) is moved aside."""
        moved = False
        for earlier in job.attempts:
            if earlier.get("log_path") == path and os.path.exists(path):
                target = f"{path}.attempt-{earlier['attempt']}"
                os.replace(path, target)
                earlier["log_path"] = target
                moved = True
        if moved:
            self.state.set_job(job.id, attempts=job.attempts)

    def _mirror_path(self, job: Job) -> Path:
        from dstack.home import sub

        name = f"{job.id}.log" if job.attempt == 1 else f"{job.id}.attempt-{job.attempt}.log"
        return sub("logs") / name

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
        state = track_metrics(runner, job, state)  # mirror its samples; names an OOM kill (dstack.metrics)
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
            if job.runner != "local":
                self._mirror_log(runner, job)  # what collecting added to the job's log
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
            from dstack.runs import retry_or_fail

            retry_or_fail(self.state, job, state.reason or "the job was lost", "host-lost")
            if (job.runner or "local") in self._unreachable_since:
                return  # nothing to clean up on a host that doesn't answer
        try:
            runner.cleanup_job(job.id, keep=self.run.keep)
        except DstackError as e:
            log.warning("could not clean up job %s on %s: %s", job.id, job.runner, e)

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
        from dstack.backends.base import JobState
        from dstack.capacity import host_gone

        name = job.runner or "local"
        first = self._unreachable_since.setdefault(name, time.monotonic())
        log.warning("host %s unreachable for %.1fs: %s", name, time.monotonic() - first, error)
        if host_gone(self.state, name):
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

    def _fail(self, job: Job, reason: str) -> None:
        self.state.transition(
            job.id,
            ("pending", "waiting", "starting", "running"),
            status="failed",
            reason=reason,
            finished_at=time.time(),
        )

    def _mirror_log(self, runner: Runner, job: Job) -> None:
        """Copy what the attempt printed on its host since the last call to its log here."""
        path = self._mirror_path(job)
        key = f"{job.id}#{job.attempt}"  # a new attempt's log starts at 0 again
        offset = self._log_offsets.get(key)
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
        self._log_offsets[key] = offset

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()


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
