"""The orchestrator: a detached process per run that places and starts jobs, watches them, saves their
artifacts and finishes the run. The CLI only follows: killing it never stops a run."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.errors import DstackError, HostError
from dstack.store.state import ACTIVE_JOB, ACTIVE_RUN, ArtifactRow, Job, Run, State

if TYPE_CHECKING:
    from dstack.backends.base import Capacity, JobState, Runner
    from dstack.store.objects import Manifest, ObjectStore

log = logging.getLogger("dstack.orchestrator")
REAL_TIME_INTERVAL = float(os.environ.get("DSTACK_REAL_TIME_INTERVAL", "5"))
HOST_LOST_S = float(os.environ.get("DSTACK_HOST_LOST_S", "15"))  # noticed within 30 s


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
            if state.reason != job.reason:  # what the runner says of it (Slurm: why it waits in its queue)
                self.state.transition(job.id, ("running",), reason=state.reason)
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
