"""`dstack runs`: the listing of runs, without typer, so the fast path (`dstack.cli.entry`) and the typer
command print the very same thing."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.store.state import Run, State


def list_runs(limit: int = 20, all_: bool = False, sweep: str | None = None, as_json: bool = False) -> None:
    """The newest `limit` runs (all, deleted too, with `all_`) or one sweep's jobs, as a table or JSON."""
    from dstack.cli import repair_runs as repair
    from dstack.store.state import open_state

    with open_state() as state:
        repair(state)
        if sweep:
            sweep_table(state, sweep, as_json)
            return
        _render_runs(state, state.runs(limit=None if all_ else limit, include_deleted=all_), as_json)


def _render_runs(state: State, items: list[Run], as_json: bool) -> None:
    """Runs as JSON or a table (with their jobs, read from `state`)."""
    from dstack.cli import ui

    jobs_of = state.jobs

    if as_json:
        ui.print_json(
            [
                {
                    "name": r.name,
                    "id": r.id,
                    "workflow": r.workflow,
                    "status": r.status,
                    "reason": r.reason,
                    "origin": r.origin or "manual",
                    "commit": r.commit_sha,
                    "branch": r.branch,
                    "variables": r.variables,
                    "sweep": r.sweep,
                    "created_at": r.created_at,
                    "finished_at": r.finished_at,
                    "deleted_at": r.deleted_at,
                    "jobs": [{"name": j.workflow, "id": j.id, "status": j.status} for j in jobs_of(r.id)],
                }
                for r in items
            ]
        )
        return
    rows = []
    for r in items:
        jobs_ = jobs_of(r.id)
        summary = ", ".join(f"{j.workflow} {j.status}" for j in jobs_ if j.status != r.status)
        variables = " ".join(f"{k}={v}" for k, v in r.variables.items())
        rows.append(
            [
                r.name,
                r.workflow,
                ui.status(r.status) if r.deleted_at is None else ui.status(f"{r.status}, deleted"),
                origin_label(r.origin),
                variables,
                summary,
                ui.ago(r.created_at),
                ui.duration(r.created_at, r.finished_at),
            ]
        )
    if not rows:
        ui.info("No runs yet. Try `dstack run WORKFLOW` in a repo with `.dstack/workflows.yaml`.")
        return
    ui.table(["Run", "Workflow", "Status", "Started by", "Variables", "Jobs", "Submitted", "Took"], rows)


def origin_label(origin: str | None) -> str:
    """What started a run, short: manual, commit 1a2b3c4d, schedule 0 3 * * *, watch."""
    if not origin:
        return "manual"
    kind, _, rest = origin.partition(" ")
    return f"commit {rest[:8]}" if kind == "commit" else origin


def sweep_table(state: State, sweep: str, as_json: bool) -> None:
    """Each combination of a sweep with its status."""
    from dstack.cli import ui

    run_ = state.run(sweep)
    swept = [k for k, v in run_.variables.items() if "," in v]
    items = [j for j in state.jobs(run_.id) if j.workflow == run_.workflow]
    if as_json:
        ui.print_json(
            [
                {
                    "name": j.workflow,
                    "id": j.id,
                    "status": j.status,
                    "reason": j.reason,
                    "variables": j.variables,
                }
                for j in items
            ]
        )
        return
    rows = [
        [
            *(str(j.variables.get(k, "")) for k in swept),
            ui.status(j.status),
            j.runner or "",
            j.reason or "",
            ui.duration(j.started_at, j.finished_at),
        ]
        for j in items
    ]
    ui.table(
        [*swept, "Status", "Runner", "Reason", "Took"], rows, title=f"Sweep {run_.name} ({run_.workflow})"
    )
