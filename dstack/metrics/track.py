"""The orchestrator's side: mirror a job's new samples from its runner, and name an out-of-memory kill."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from dstack.errors import DstackError

if TYPE_CHECKING:
    from dstack.backends.base import JobState, Runner
    from dstack.store.state import Job

log = logging.getLogger("dstack.metrics")
MIRROR_EVERY_S = float(os.environ.get("DSTACK_METRICS_MIRROR_S", "2"))
_mirrored: dict[str, float] = {}


def track(runner: Runner, job: Job, state: JobState) -> JobState:
    """Mirror the job's samples (every few seconds while it runs, once more when it ends); the state of a job
    the kernel killed for memory comes back with a reason that says so, with its peak memory."""
    from dstack.backends.base import JobState

    if state.status == "lost":
        return state
    now = time.monotonic()
    if state.status == "running" and now - _mirrored.get(job.id, 0.0) < MIRROR_EVERY_S:
        return state
    _mirrored[job.id] = now
    mirror(runner, job.id)
    if state.status != "exited":
        return state
    _mirrored.pop(job.id, None)
    reason = oom_reason(job, state.exit_code)
    if reason is None:
        return state
    return JobState(state.status, exit_code=state.exit_code, reason=reason)


def mirror(runner: Runner, job_id: str) -> None:
    """Read what the runner's `metrics` file gained since last time into the job's local files."""
    from dstack.metrics.store import ingest, load_totals

    totals = load_totals(job_id)
    offset = totals.offset if totals else 0
    for _ in range(64):  # a runner hands back a bounded chunk per call
        try:
            data = runner.read_metrics(job_id, offset)
        except DstackError as e:
            log.info("no metrics from %s for %s: %s", runner.name, job_id, e)
            return
        used = ingest(job_id, data) if data else 0
        if not used:
            return
        offset += used


def oom_reason(job: Job, exit_code: int | None) -> str | None:
    """'ran out of memory …' when the job was killed (exit 137) and its cgroup counted an OOM kill, or its
    peak memory came within 10% of its limit; None otherwise."""
    from dstack.metrics.store import load_totals
    from dstack.metrics.summary import human_bytes

    if exit_code not in (137, -9):
        return None
    totals = load_totals(job.id)
    if totals is None or "mem" not in totals.series:
        return None
    peak = int(max(totals.series["mem"].peak, totals.mem_peak))
    wanted = job.spec.resources.memory_mib
    limits = [x for x in (totals.limit, (wanted or 0) * 1024 * 1024) if x]
    if not limits and len(totals.host) >= 3:
        limits.append(int(totals.host[2]))
    limit = min(limits) if limits else 0
    killed = totals.oom_last is not None and totals.oom_last > (totals.oom_first or 0)
    if not killed and not (limit and peak >= 0.9 * limit):
        return None
    of = f" of its {human_bytes(limit)} limit" if limit else ""
    return f"ran out of memory (killed by the kernel, exit 137); peak memory {human_bytes(peak)}{of}"
