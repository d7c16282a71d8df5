"""Watching running jobs: their state, their output mirrored here, real-time artifacts saved while they run,
metrics mirrored, hosts that stop answering; a job that ended is finished (artifacts saved or failed)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.errors import DstackError, HostError
from dstack.metrics.track import track as track_metrics
from dstack.store.state import ArtifactRow, Job

if TYPE_CHECKING:
    from dstack.backends.base import JobState, Runner
    from dstack.scheduler.loop import Orchestrator
    from dstack.store.objects import Manifest

log = logging.getLogger("dstack.orchestrator")
REAL_TIME_INTERVAL = float(os.environ.get("DSTACK_REAL_TIME_INTERVAL", "5"))
HOST_LOST_S = float(os.environ.get("DSTACK_HOST_LOST_S", "15"))  # noticed within 30 s
WATCHED = ("running", "waiting")  # a job placed on a runner: running, or waiting in the runner's own queue


def watched(job: Job) -> bool:
    """Whether the job is placed on a runner and must be watched: running, or waiting in the runner's queue
    (a `waiting` job with no runner yet waits to be placed)."""
    return job.status == "running" or (job.status == "waiting" and job.runner is not None)


def watch(orch: Orchestrator, job: Job) -> None:
    """Poll a running job; finish it when it ended (artifacts saved, or failed, or placed again if lost)."""

    runner = orch.runner(job.runner or "local")
    name = job.runner or "local"
    asked = time.monotonic()  # a host that doesn't answer is silent since we asked, not since we gave up
    try:
        if job.runner != "local" and name not in orch.unreachable_since:
            mirror_log(orch, runner, job, lost_raises=True)
        state = runner.poll_job(job.id)
    except HostError as e:
        orch.unreachable_since.setdefault(name, asked)
        lost = host_unreachable(orch, job, e)
        if lost is None:
            return
        state = lost
    else:
        if orch.unreachable_since.pop(name, None) is not None:
            mirror_log(orch, runner, job)  # back: catch up on what it printed meanwhile
    state = track_metrics(runner, job, state)  # mirror its samples; names an OOM kill (dstack.metrics)
    if state.status == "running":
        status = "waiting" if state.waiting else "running"  # waiting: in the runner's own queue (Slurm's)
        if (status, state.reason) != (job.status, job.reason):  # with why it waits (squeue's reason)
            started = {"started_at": time.time()} if job.status == "waiting" and not state.waiting else {}
            orch.state.transition(job.id, WATCHED, status=status, reason=state.reason, **started)
        if state.waiting:
            return
        sync_real_time(orch, runner, job)
        from dstack.inactivity import stop_if_idle

        stop_if_idle(orch.state, runner, job, keep=orch.run.keep)
        return
    if job.runner != "local":
        mirror_log(orch, runner, job)
    spec = job.spec
    now = time.time()
    if state.status == "exited" and state.exit_code == 0:
        try:
            manifest, missing = runner.collect_artifacts(job.id, spec, orch.store, orch.run.working_subdir)
        except DstackError as e:
            orch.fail(job, f"saving artifacts failed: {e}")
            return
        if job.runner != "local":
            mirror_log(orch, runner, job)  # what collecting added to the job's log
        manifest = with_restored(orch, job, manifest)
        name = f"jobs/{job.id}/attempt-{job.attempt}"
        orch.store.put_manifest(name, manifest)
        rows = [ArtifactRow(job.id, e.path, e.size, e.mode, e.digest) for e in manifest.entries]
        status, reason = "done", None
        if missing:
            status, reason = "failed", f"artifact path {missing[0]!r} was not created by the job"
        orch.state.save_artifact_rows(
            job.id, rows, name, status=status, exit_code=0, reason=reason, finished_at=now
        )
    elif state.status == "exited":
        reason = state.reason or f"exited with code {state.exit_code}"
        last = last_log_line(orch, job)
        if last and state.exit_code != 143:
            reason += f": {last}"
        orch.state.transition(
            job.id,
            WATCHED,
            status="failed",
            exit_code=state.exit_code,
            reason=reason,
            finished_at=now,
        )
    else:
        from dstack.runs import retry_or_fail

        retry_or_fail(orch.state, job, state.reason or "the job was lost", "host-lost")
        if (job.runner or "local") in orch.unreachable_since:
            return  # nothing to clean up on a host that doesn't answer
    try:
        runner.cleanup_job(job.id, keep=orch.run.keep)
    except DstackError as e:
        log.warning("could not clean up job %s on %s: %s", job.id, job.runner, e)


def log_of(orch: Orchestrator, job: Job) -> str:
    """The file on this machine with the output of the job's current attempt."""
    path = orch.runner(job.runner or "local").log_path(job.id)
    return str(path if path is not None else mirror_path(job))


def keep_earlier_logs(orch: Orchestrator, job: Job, path: str) -> None:
    """An earlier attempt's log at the path this attempt writes to (the local runner's) is moved aside."""
    moved = False
    for earlier in job.attempts:
        if earlier.get("log_path") == path and os.path.exists(path):
            target = f"{path}.attempt-{earlier['attempt']}"
            os.replace(path, target)
            earlier["log_path"] = target
            moved = True
    if moved:
        orch.state.set_job(job.id, attempts=job.attempts)


def mirror_path(job: Job) -> Path:
    from dstack.home import sub

    name = f"{job.id}.log" if job.attempt == 1 else f"{job.id}.attempt-{job.attempt}.log"
    return sub("logs") / name


def mirror_log(orch: Orchestrator, runner: Runner, job: Job, lost_raises: bool = False) -> None:
    """Copy what the attempt printed on its host since the last call to its log here (`lost_raises`: a host
    that doesn't answer raises HostError; else it is only marked unreachable)."""
    path = mirror_path(job)
    key = f"{job.id}#{job.attempt}"  # a new attempt's log starts at 0 again
    offset = orch.log_offsets.get(key)
    if offset is None:
        offset = path.stat().st_size if path.exists() else 0
    asked = time.monotonic()
    with open(path, "ab") as f:
        while True:  # a runner hands back a bounded chunk per call
            try:
                data = runner.read_log(job.id, offset)
            except HostError:
                orch.log_offsets[key] = offset
                if lost_raises:
                    raise
                orch.unreachable_since.setdefault(job.runner or "local", asked)
                break
            except DstackError:
                break
            if not data:
                break
            f.write(data)
            offset += len(data)
    orch.log_offsets[key] = offset


def last_log_line(orch: Orchestrator, job: Job) -> str:
    """The job's last line of output (what a failure most often says), cut to 200 characters."""
    path = orch.state.job(job.id).log_path
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:200] if lines else ""


def host_unreachable(orch: Orchestrator, job: Job, error: HostError) -> JobState | None:
    """A host that stops answering for HOST_LOST_S seconds loses its jobs (None: keep waiting)."""
    from dstack.backends.base import JobState
    from dstack.capacity import host_gone

    name = job.runner or "local"
    first = orch.unreachable_since.setdefault(name, time.monotonic())
    log.warning("host %s unreachable for %.1fs: %s", name, time.monotonic() - first, error)
    if host_gone(orch.state, name):
        return None  # the instance is gone: its jobs were interrupted (and placed again if allowed)
    if time.monotonic() - first < HOST_LOST_S:
        return None
    orch.state.host_lost(name, str(error))
    return JobState("lost", reason=f"host {name} stopped answering: {error}")


def sync_real_time(orch: Orchestrator, runner: Runner, job: Job) -> None:
    """Save `real-time` (and `mount`) artifacts while the job runs, so a checkpoint outlives the host."""

    if not any(a.real_time or a.mount for a in job.spec.artifacts):
        return

    now = time.monotonic()
    if now - orch.rt_synced.get(job.id, 0.0) < REAL_TIME_INTERVAL:
        return
    orch.rt_synced[job.id] = now
    spec = job.spec.model_copy()
    spec.artifacts = [a for a in spec.artifacts if a.real_time or a.mount]
    try:
        manifest, _ = runner.collect_artifacts(job.id, spec, orch.store, orch.run.working_subdir)
    except DstackError:
        return
    manifest = with_restored(orch, job, manifest)
    if not manifest.entries:
        return
    name = f"jobs/{job.id}/rt-{manifest.digest()[:16]}"
    orch.store.put_manifest(name, manifest)
    rows = [ArtifactRow(job.id, e.path, e.size, e.mode, e.digest) for e in manifest.entries]
    orch.state.save_artifact_rows(job.id, rows, name)


def with_restored(orch: Orchestrator, job: Job, manifest: Manifest) -> Manifest:
    """A resumed attempt's artifacts: what it restored from the earlier attempt plus what it wrote (nothing
    already saved is lost, even where the attempt removed or never reached a restored file)."""
    from dstack.artifacts import overlay
    from dstack.runs import resume_point

    point = resume_point(job) if job.attempt > 1 else None
    if point is None:
        return manifest
    restored = _RESTORED.get(point[1])
    if restored is None:
        try:
            restored = _RESTORED[point[1]] = orch.store.get_manifest(point[1])
        except DstackError:  # not restored either (the attempt's log says so)
            return manifest
    return overlay(restored, manifest)


_RESTORED: dict[str, Manifest] = {}  # manifests by name (immutable): read once, not at every real-time save
