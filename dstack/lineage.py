"""Lineage: the tree of jobs, repo states, variables and inputs that made a result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dstack.errors import NotFoundError

if TYPE_CHECKING:
    from dstack.store.state import Job, State


@dataclass
class LineageNode:
    """One job in a result's history, with the jobs and tags it took its inputs from."""

    workflow: str
    job_id: str
    run: str
    status: str
    variables: dict[str, str]
    commit: str | None
    branch: str | None
    diff_summary: str
    untracked: int
    runner: str | None
    image: str | None
    reused_from: str | None
    artifacts: list[dict[str, Any]]
    tags: list[str]
    origin: str | None = None  # what started the run that made it: None by hand, "commit SHA", …
    upstream: list[LineageNode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["upstream"] = [u.to_dict() for u in self.upstream]
        return d


def diff_summary(diff: str | None) -> str:
    """`3 files changed, +10 -2` for a unified diff ('clean' when empty)."""
    if not diff:
        return "clean"
    files = added = removed = 0
    for line in diff.splitlines():
        if line.startswith("diff --git"):
            files += 1
        elif line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return f"{files} file{'s' if files != 1 else ''} changed, +{added} -{removed}"


def job_lineage(state: State, job: Job, seen: set[str] | None = None) -> LineageNode:
    """The lineage of one job, down to raw inputs and tags."""
    seen = seen if seen is not None else set()
    origin = state.job(job.reused_from) if job.reused_from else job
    run = state.run(origin.run_id)
    tags = [t.name for t in state.tags() if t.run_id == origin.run_id]
    rows = state.artifact_rows(origin.id)
    node = LineageNode(
        workflow=job.workflow,
        job_id=job.id,
        run=state.run(job.run_id).name,
        status=job.status,
        variables=origin.variables,
        commit=run.commit_sha,
        branch=run.branch,
        diff_summary=diff_summary(run.diff),
        untracked=len(run.untracked),
        runner=origin.runner,
        image=origin.spec_data.get("image"),
        reused_from=job.reused_from,
        artifacts=[{"path": r.path, "size": r.size, "digest": r.digest} for r in rows],
        tags=tags,
        origin=run.origin,
    )
    seen.add(job.id)
    for up_id in job.upstream:
        if up_id in seen:
            continue
        node.upstream.append(job_lineage(state, state.job(up_id), seen))
    return node


def run_lineage(state: State, run_ref: str, path: str | None = None) -> list[LineageNode]:
    """The lineage of a run's final jobs (those nothing else in the run depends on), or of one artifact."""
    run = state.run(run_ref)
    jobs = state.jobs(run.id)
    if path is not None:
        wanted = path.strip("/")
        makers = [
            j
            for j in jobs
            if any(
                r.path == wanted or r.path.startswith(wanted + "/")
                for r in state.artifact_rows(j.reused_from or j.id)
            )
        ]
        if not makers:
            raise NotFoundError(
                f"run {run.name} has no artifact '{path}'", hint=f"see `dstack artifacts list {run.name}`"
            )
        return [job_lineage(state, makers[-1])]
    needed = {u for j in jobs for u in j.upstream}
    return [job_lineage(state, j) for j in jobs if j.id not in needed]
