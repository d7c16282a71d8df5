"""A run's results: its jobs' artifacts, listed and downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.errors import ArtifactError

if TYPE_CHECKING:
    from dstack.artifacts import OnProgress
    from dstack.store.state import ArtifactRow, Run, State


@dataclass
class RunArtifact:
    workflow: str
    job_id: str
    path: str
    size: int
    digest: str


def artifact_source(state: State, job_id: str) -> str:
    """The job whose artifacts a job has (a reused job points at the original)."""
    job = state.job(job_id)
    return job.reused_from or job.id


def list_artifacts(state: State, run: Run) -> list[RunArtifact]:
    """Every artifact file of every job of the run."""
    result = []
    for job in state.jobs(run.id):
        rows: list[ArtifactRow] = state.artifact_rows(job.reused_from or job.id)
        result += [RunArtifact(job.workflow, job.id, r.path, r.size, r.digest) for r in rows]
    return result


def download_artifacts(
    state: State,
    run: Run,
    target: Path,
    path: str | None = None,
    on_progress: OnProgress | None = None,
    on_skip: Callable[[str], None] | None = None,
) -> list[Path]:
    """Restore the run's artifacts (or those under `path`) into `target`, every digest checked.

    Symlinks that would point outside `target` are not made; `on_skip` hears about each.
    """
    from dstack.artifacts import BadObjectError, restore_artifacts, select_entries
    from dstack.gc import check_not_deleted
    from dstack.store import open_object_store
    from dstack.store.objects import Manifest

    check_not_deleted(run)
    store = open_object_store(state)
    latest: dict[str, object] = {}  # a path saved by several jobs: the later job's file wins
    owner: dict[str, str] = {}
    for job in state.jobs(run.id):
        if job.manifest:
            for e in store.get_manifest(job.manifest).entries:
                latest[e.path], owner[e.path] = e, f"{job.workflow} ({job.id})"
    merged = Manifest(entries=list(latest.values()))  # type: ignore[arg-type]
    if not merged.entries:
        raise ArtifactError(f"run {run.name} has no artifacts", hint="declare `artifacts:` in the workflow")
    select_entries(merged, path)  # NotFoundError naming the path if nothing is under it
    target.mkdir(parents=True, exist_ok=True)
    try:
        return restore_artifacts(merged, store, target, path, on_progress, on_skip or (lambda _: None))
    except BadObjectError as e:
        where = f"run {run.name}, job {owner.get(e.path, '?')}: "
        raise BadObjectError(e.path, e.error, where) from e


@dataclass
class Comparison:
    """How a job's artifacts compare with the same workflow's in another run."""

    workflow: str
    identical: bool
    changed: list[str]


def compare_runs(state: State, run: Run, other: Run) -> list[Comparison]:
    """Per workflow (and variables), whether the two runs' artifacts are byte for byte the same."""

    def files(r: Run) -> dict[tuple[str, str], dict[str, str]]:
        result: dict[tuple[str, str], dict[str, str]] = {}
        for job in state.jobs(r.id):
            key = (job.workflow, repr(sorted(job.variables.items())))
            result[key] = {a.path: a.digest for a in state.artifact_rows(job.reused_from or job.id)}
        return result

    mine, theirs = files(run), files(other)
    out = []
    for key, digests in mine.items():
        before = theirs.get(key, {})
        changed = sorted(p for p in set(digests) | set(before) if digests.get(p) != before.get(p))
        out.append(Comparison(key[0], not changed, changed))
    return out
