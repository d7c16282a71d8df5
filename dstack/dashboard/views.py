"""What the dashboard's pages show, as JSON-able data read from the state (reads only, never a lock)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.store.state import Job, Run, State

MAX_LOG_CHUNK = 256 * 1024


def runs_view(state: State) -> list[dict[str, Any]]:
    """Every run, newest first, with its tags (the page filters by workflow, tag and status)."""
    from dstack.store.dashboard import run_summaries

    return [dict(r.__dict__) for r in run_summaries(state.db)]


def _job(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "workflow": job.workflow,
        "status": job.status,
        "upstream": job.upstream,
        "runner": job.runner,
        "exit_code": job.exit_code,
        "reason": job.reason,
        "reused_from": job.reused_from,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "has_log": bool(job.log_path),
    }


def run_view(state: State, ref: str) -> dict[str, Any]:
    """A run: its jobs (the DAG), artifacts with sizes, variables, tags and lineage."""
    from dstack.errors import DstackError
    from dstack.lineage import run_lineage

    run: Run = state.run(ref)
    jobs = state.jobs(run.id)
    artifacts = {
        j.id: [{"path": a.path, "size": a.size} for a in state.artifact_rows(j.reused_from or j.id)]
        for j in jobs
    }
    try:
        lineage = [n.to_dict() for n in run_lineage(state, run.name)]
    except DstackError:
        lineage = []
    return {
        "name": run.name,
        "workflow": run.workflow,
        "status": run.status,
        "reason": run.reason,
        "branch": run.branch,
        "commit": run.commit_sha,
        "variables": run.variables,
        "args": run.args,
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "tags": [t.name for t in state.tags() if t.run_id == run.id],
        "jobs": [_job(j) for j in jobs],
        "artifacts": artifacts,
        "lineage": lineage,
    }


def log_chunk(state: State, job_id: str, offset: int) -> tuple[bytes, int]:
    """The job's output from `offset` on (at most MAX_LOG_CHUNK bytes) and the offset after it."""
    job = state.job(job_id)
    if not job.log_path:
        return b"", offset
    try:
        with open(job.log_path, "rb") as f:
            f.seek(max(offset, 0))
            data = f.read(MAX_LOG_CHUNK)
    except OSError:
        return b"", offset
    return data, offset + len(data)


def metrics_view(state: State, ref: str) -> list[dict[str, Any]]:
    from dstack.metrics.summary import run_metrics

    return [m.to_json() for m in run_metrics(state, ref)]


def hosts_view(state: State) -> list[dict[str, Any]]:
    """Each runner: capacity, status, utilization now, and its jobs."""
    from dstack.hosts import list_hosts
    from dstack.metrics.summary import host_usage

    usage = host_usage(state)
    busy: dict[str, list[str]] = {}
    for job in state.jobs(statuses=("starting", "running")):
        for name in (job.runner or "local").split("+"):  # a multi-node job is on each of its hosts
            busy.setdefault(name, []).append(f"{job.run_name}/{job.workflow}")
    rows = []
    for h in list_hosts(state.db):
        cap = h.capacity
        u = usage.get(h.name)
        rows.append(
            {
                "name": h.name,
                "kind": h.kind,
                "status": h.status if h.enabled else "disabled",
                "address": h.address or h.hostname or "",
                "cpus": cap.cpus if cap else None,
                "memory_mib": cap.memory_mib if cap else None,
                "gpus": [f"{g.name} ({g.memory_mib // 1024} GB)" for g in cap.gpus] if cap else [],
                "usage": u.to_json() if u else None,
                "jobs": busy.get(h.name, []),
                "last_error": h.last_error,
            }
        )
    return rows


def tags_view(state: State) -> list[dict[str, Any]]:
    from dstack.tags import list_tags

    return [
        {"name": t.name, "run": t.run_name, "workflows": t.workflows, "created_at": t.created_at}
        for t in list_tags(state)
    ]


def artifact_file(state: State, job_id: str, path: str) -> tuple[str, int, str]:
    """(object digest, size, file name) of one saved artifact file of a job."""
    from dstack.errors import NotFoundError

    job = state.job(job_id)
    for row in state.artifact_rows(job.reused_from or job.id):
        if row.path == path:
            return row.digest, row.size, os.path.basename(path)
    raise NotFoundError(f"job {job_id} has no artifact file {path!r}")
