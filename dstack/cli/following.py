"""Following a run in the terminal (`dstack run`, `logs -f`, `attach`), without typer: the fast `dstack run`
path (`dstack.cli.entry`) uses it too."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.store.state import State


def follow_attached(state: State, run_id: str, drive: bool = False) -> None:
    """Follow the run's output with its ports open on localhost; Ctrl-C detaches (the run goes on)."""
    from dstack.attach import asks_for_ports
    from dstack.cli import ui

    if not asks_for_ports(state.jobs(run_id)):
        follow(state, run_id, drive=drive)
        return
    from dstack.cli.attach import ports_open

    try:
        with ports_open(run_id):
            follow(state, run_id, drive=drive)
    except SystemExit as e:
        if e.code == 130:  # detached with Ctrl-C
            ui.info(f"`dstack attach {state.run(run_id).name}` re-opens its ports.")
        raise


def job_labels(jobs_: list) -> dict[str, str]:  # type: ignore[type-arg]
    """A label per job: its workflow, plus the variables that tell a sweep's jobs apart."""
    labels = {}
    for job in jobs_:
        same = [j for j in jobs_ if j.workflow == job.workflow]
        if len(same) == 1:
            labels[job.id] = job.workflow
            continue
        mine = job.variables
        differing = [k for k in mine if any(j.variables.get(k) != mine[k] for j in same)]
        labels[job.id] = f"{job.workflow}[" + ",".join(f"{k}={mine[k]}" for k in differing) + "]"
    return labels


def follow(
    state: State, run_id: str, follow_output: bool = True, exit_on_failure: bool = True, drive: bool = False
) -> None:
    """Print a run's output as it comes, prefixed by job when several jobs run; exit non-zero if it failed."""
    from dstack.cli import ui
    from dstack.cli.ui import escape  # the markup ui.info renders (rich's escape costs ~10 ms to import)
    from dstack.errors import RunError
    from dstack.logs import follow_run

    jobs_ = state.jobs(run_id)
    prefix = len([j for j in jobs_ if j.status != "reused"]) > 1
    labels = job_labels(jobs_)
    width = max((len(v) for v in labels.values()), default=0)
    try:
        for event in follow_run(state, run_id, follow=follow_output, drive=drive):
            if event.kind == "status":
                quiet = ("pending", "starting") + (() if prefix else ("running", "done"))
                if event.text.startswith(quiet):
                    continue
                state_, _, why = event.text.partition(": ")
                ui.info(
                    f"[dim]{escape(labels.get(event.job_id, event.workflow))}:[/dim] "
                    f"{ui.status_markup(state_)}" + (f": {escape(why)}" if why else "")
                )
            elif prefix:
                ui.out(f"{labels.get(event.job_id, event.workflow).ljust(width)} | {event.text}")
            else:
                ui.out(event.text)
    except KeyboardInterrupt:
        run_ = state.run(run_id)
        ui.info(
            f"\nStopped following; run {run_.name} goes on. `dstack logs -f {run_.name}` re-attaches, "
            f"`dstack stop {run_.name}` stops it."
        )
        raise SystemExit(130) from None
    run_ = state.run(run_id)
    if run_.status == "done":
        if follow_output:
            ui.info(
                f"Run [bold]{run_.name}[/bold] [green]done[/green] in "
                f"{ui.duration(run_.created_at, run_.finished_at)}."
            )
    elif run_.status in ("failed", "stopped") and exit_on_failure:
        raise RunError(f"run {run_.name} {run_.status}" + (f": {run_.reason}" if run_.reason else ""))
