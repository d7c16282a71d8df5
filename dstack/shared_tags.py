"""Tags shared through the artifact store: with an S3 bucket configured, a colleague using the same bucket
sees the tags and can depend on them. A tag's record carries its run and jobs; reading one imports it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.store.objects import ObjectStore
    from dstack.store.state import State, Tag


def publish_tag(state: State, store: ObjectStore, tag: Tag) -> None:
    """Write the tag's record (its run and its finished jobs) into the store."""
    run = state.run(tag.run_id)
    jobs = [j for j in state.jobs(run.id) if j.status in ("done", "reused") and j.manifest]
    record = {
        "name": tag.name,
        "created_at": tag.created_at,
        "run": {
            k: getattr(run, k)
            for k in (
                "id",
                "name",
                "workflow",
                "project_root",
                "repo_root",
                "working_subdir",
                "remote_url",
                "branch",
                "commit_sha",
                "diff",
                "untracked",
                "code_manifest",
                "variables",
                "args",
                "created_at",
                "finished_at",
            )
        },
        "jobs": [
            {
                "id": j.id,
                "workflow": j.workflow,
                "key": j.key,
                "manifest": j.manifest,
                "spec": j.spec_data,
                "runner": j.runner,
                "created_at": j.created_at,
                "started_at": j.started_at,
                "finished_at": j.finished_at,
            }
            for j in jobs
        ],
    }
    store.put_meta(f"tags/{tag.name}", json.dumps(record).encode())


def shared_tag_names(store: ObjectStore) -> list[str]:
    return [k.split("/", 1)[1] for k in store.list_meta("tags/")]


def import_tag(state: State, store: ObjectStore, name: str) -> bool:
    """Bring a tag from the store into the local state (with its run and jobs); False if there is none."""
    from dstack.store.state import ArtifactRow, Job, Run

    raw = store.get_meta(f"tags/{name}")
    if raw is None:
        return False
    record: dict[str, Any] = json.loads(raw)
    r = record["run"]
    if state.has_run(r["id"]):
        state.add_tag(name, r["id"], replace=True)
        return True
    run = Run(**r, status="done", reason=f"shared tag {name}")
    if state.run_named(r["name"]):
        run.name = f"{run.name}-{run.id[:6]}"
    jobs = [Job(**_job_fields(j), run_id=run.id, status="done", exit_code=0) for j in record["jobs"]]
    artifacts = {}
    for job in jobs:
        manifest = store.get_manifest(job.manifest or "")
        rows = [ArtifactRow(job.id, e.path, e.size, e.mode, e.digest) for e in manifest.entries]
        artifacts[job.id] = (rows, job.manifest or "")
    state.record_run(run, jobs, artifacts, tag=name, replace_tag=True)  # one transaction
    return True


def unpublish_tag(store: ObjectStore, name: str) -> None:
    store.delete_meta(f"tags/{name}")


def _job_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A shared tag's job record as Job fields (the record names the stored spec `spec`, as jobs do)."""
    fields = dict(record)
    fields["spec_data"] = fields.pop("spec", {})
    return fields
