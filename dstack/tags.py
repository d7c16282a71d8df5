"""Tags: names for successful runs (`prepare:latest`), so workflows and people can reuse their outputs."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.errors import RunError, UsageError

if TYPE_CHECKING:
    from dstack.store.state import State, Tag


def add_tag(
    state: State, name: str, run_ref: str | None = None, from_path: Path | None = None, force: bool = False
) -> Tag:
    """Tag a finished run, or make a run holding `from_path`'s files and tag it."""
    from dstack.names import name_hint, name_problem
    from dstack.store.state import Job, Run

    problem = name_problem(name, "tag")
    if problem:
        raise UsageError(problem, hint=name_hint(name))
    if from_path is not None:
        from dstack.artifacts import manifest_from_path
        from dstack.store import open_object_store

        if not from_path.exists():
            raise UsageError(f"{from_path}: no such file or folder")
        store = open_object_store(state)
        manifest = manifest_from_path(from_path, store)
        now = time.time()
        run_id = uuid.uuid4().hex
        job_id = f"tag-{name}-{uuid.uuid4().hex[:6]}"
        manifest_name = f"jobs/{job_id}/attempt-1"
        store.put_manifest(manifest_name, manifest)
        folder = str(from_path.resolve().parent)
        run = Run(
            id=run_id,
            name=f"upload-{name}-{run_id[:6]}",
            workflow=name,
            status="done",
            project_root=folder,
            repo_root=folder,
            reason=f"files from {from_path}",
            created_at=now,
            finished_at=now,
        )
        job = Job(
            id=job_id,
            run_id=run_id,
            workflow=name,
            status="done",
            spec_data={"workflow": name},
            exit_code=0,
            manifest=manifest_name,
            created_at=now,
            started_at=now,
            finished_at=now,
        )
        from dstack.store.state import ArtifactRow

        rows = [ArtifactRow(job_id, e.path, e.size, e.mode, e.digest) for e in manifest.entries]
        state.record_run(run, [job], {job_id: (rows, manifest_name)}, tag=name, replace_tag=force)
    else:
        if run_ref is None:
            raise UsageError("give a run to tag, or --from PATH")
        run = state.run(run_ref)
        if run.status != "done":
            raise RunError(f"run {run.name} is {run.status}; only a successful run can be tagged")
        state.add_tag(name, run.id, replace=force)
    tag = state.tag(name)
    assert tag is not None
    from dstack.shared_tags import publish_tag
    from dstack.store import open_object_store

    publish_tag(state, open_object_store(state), tag)
    return tag


def list_tags(state: State) -> list[Tag]:
    """Tags of this state and, with a shared store, every tag in it (imported on the way)."""
    from dstack.shared_tags import import_tag, shared_tag_names
    from dstack.store import open_object_store

    store = open_object_store(state)
    local = {t.name for t in state.tags()}
    for name in shared_tag_names(store):
        if name not in local:
            import_tag(state, store, name)
    return state.tags()


def delete_tag(state: State, name: str) -> None:
    """Delete a tag here and in the shared store (the run and its artifacts stay)."""
    from dstack.shared_tags import unpublish_tag
    from dstack.store import open_object_store

    store = open_object_store(state)
    existed = store.get_meta(f"tags/{name}") is not None
    unpublish_tag(store, name)
    if state.tag(name) is not None or not existed:
        state.delete_tag(name)
