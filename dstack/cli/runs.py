"""`dstack runs` (`ps`), `dstack jobs`, `dstack logs`, `dstack stop`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from dstack.store.state import State


def register(app: typer.Typer) -> None:
    app.command("runs", help="List runs, newest first.")(runs)
    app.command("ps", help="List runs (same as `dstack runs`).", hidden=True)(runs)
    app.command("jobs", help="List the jobs of a run (or of the latest runs).")(jobs)
    app.command("logs", help="Show a run's output; -f follows it to its end.")(logs)
    app.command("stop", help="Stop a run: end its running jobs, cancel the rest.")(stop)


def runs(
    limit: int = typer.Option(20, "-n", "--limit", help="How many runs."),
    all_: bool = typer.Option(False, "-a", "--all", help="All runs."),
    sweep: str = typer.Option(None, "--sweep", help="Only the runs of this sweep."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    from dstack.cli import ui
    from dstack.runs import repair
    from dstack.store.state import open_state

    with open_state() as state:
        repair(state)
        items = state.runs(limit=None if all_ else limit, sweep=sweep)
        if as_json:
            ui.print_json([
                {"name": r.name, "id": r.id, "workflow": r.workflow, "status": r.status,
                 "reason": r.reason, "commit": r.commit_sha, "branch": r.branch, "variables": r.variables,
                 "sweep": r.sweep, "created_at": r.created_at, "finished_at": r.finished_at,
                 "jobs": [{"name": j.workflow, "id": j.id, "status": j.status} for j in state.jobs(r.id)]}
                for r in items])
            return
        rows = []
        for r in items:
            jobs_ = state.jobs(r.id)
            summary = " ".join(f"{j.workflow}:{j.status}" for j in jobs_) if len(jobs_) > 1 else ""
            variables = " ".join(f"{k}={v}" for k, v in r.variables.items())
            rows.append([r.name, r.workflow, ui.status(r.status), variables, summary,
                         ui.ago(r.created_at), ui.duration(r.created_at, r.finished_at)])
        if not rows:
            ui.info("No runs yet. Try `dstack run WORKFLOW` in a repo with `.dstack/workflows.yaml`.")
            return
        ui.table(["Run", "Workflow", "Status", "Variables", "Jobs", "Submitted", "Took"], rows)


def jobs(
    run: str = typer.Argument(None, help="Run name or prefix (default: the latest runs)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    from dstack.cli import ui
    from dstack.runs import repair
    from dstack.store.state import open_state

    with open_state() as state:
        repair(state)
        if run:
            items = state.jobs(state.run(run).id)
        else:
            items = [j for r in state.runs(limit=10) for j in state.jobs(r.id)]
        if as_json:
            ui.print_json([
                {"name": j.workflow, "id": j.id, "run": j.run_name, "status": j.status, "reason": j.reason,
                 "runner": j.runner, "exit_code": j.exit_code, "reused_from": j.reused_from, "key": j.key,
                 "started_at": j.started_at, "finished_at": j.finished_at} for j in items])
            return
        rows = [[j.id, j.run_name, j.workflow, ui.status(j.status), j.runner or "",
                 j.reason or (f"reused {j.reused_from}" if j.reused_from else ""),
                 ui.duration(j.started_at, j.finished_at)] for j in items]
        ui.table(["Job", "Run", "Workflow", "Status", "Runner", "Reason", "Took"], rows)


def logs(
    run: str = typer.Argument(..., help="Run name or prefix."),
    follow_: bool = typer.Option(False, "-f", "--follow", help="Follow the output until the run ends."),
) -> None:
    from dstack.runs import repair
    from dstack.store.state import open_state

    with open_state() as state:
        repair(state)
        run_ = state.run(run)
        follow(state, run_.id, follow_output=follow_, exit_on_failure=follow_)


def stop(run: str = typer.Argument(..., help="Run name or prefix.")) -> None:
    from dstack.cli import ui
    from dstack.runs import stop_run
    from dstack.store.state import open_state

    with open_state() as state:
        stopped = stop_run(state, run)
        ui.info(f"Stopped run [bold]{stopped.name}[/bold].")


def follow(state: State, run_id: str, follow_output: bool = True, exit_on_failure: bool = True) -> None:
    """Print a run's output as it comes, prefixed by job when several jobs run; exit non-zero if it failed."""
    from dstack.cli import ui
    from dstack.errors import RunError
    from dstack.runs import follow_run

    jobs_ = state.jobs(run_id)
    prefix = len([j for j in jobs_ if j.status != "reused"]) > 1
    width = max((len(j.workflow) for j in jobs_), default=0)
    try:
        for event in follow_run(state, run_id, follow=follow_output):
            if event.kind == "status":
                if event.text.startswith(("running", "done")) and not prefix:
                    continue
                ui.info(f"[dim]{event.workflow}:[/dim] {ui.status(event.text.split(':')[0])}"
                        + (":" + event.text.split(":", 1)[1] if ":" in event.text else ""))
            elif prefix:
                ui.out(f"{event.workflow.ljust(width)} | {event.text}")
            else:
                ui.out(event.text)
    except KeyboardInterrupt:
        run_ = state.run(run_id)
        ui.info(f"\nStopped following; run {run_.name} goes on. `dstack logs -f {run_.name}` re-attaches, "
                f"`dstack stop {run_.name}` stops it.")
        raise typer.Exit(130) from None
    run_ = state.run(run_id)
    if run_.status == "done":
        if follow_output:
            ui.info(f"Run [bold]{run_.name}[/bold] [green]done[/green] in "
                    f"{ui.duration(run_.created_at, run_.finished_at)}.")
    elif run_.status in ("failed", "stopped") and exit_on_failure:
        raise RunError(f"run {run_.name} {run_.status}" + (f": {run_.reason}" if run_.reason else ""))
