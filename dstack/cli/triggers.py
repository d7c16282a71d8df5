"""`dstack triggers [install|uninstall]`, `dstack watch W`, and the hidden commands hooks and cron call."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dstack.cli.apps import new_app

app = new_app(
    help="Runs started by commits (Git hooks), schedules (crontab) and file changes (`dstack watch`).",
    invoke_without_command=True,
)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="triggers")
    root.command("watch", help="Run a workflow whenever the files it reads change; Ctrl-C ends it.")(watch)


@app.callback()
def triggers(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")
) -> None:
    """List the project's triggers, what is installed for them, and when each last fired."""
    if ctx.invoked_subcommand is not None:
        return
    from dstack.store.state import open_state
    from dstack.triggers.install import status

    with open_state() as state:
        _show(status(state, Path.cwd()), as_json)


@app.command("install")
def install(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Install the Git hooks and crontab entries the project's triggers need (existing hooks still run)."""
    from dstack.store.state import open_state
    from dstack.triggers.install import install as install_triggers

    with open_state() as state:
        _show(install_triggers(state, Path.cwd()), as_json)


@app.command("uninstall")
def uninstall(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Remove the project's hooks and crontab entries, putting back exactly what was there before."""
    from dstack.store.state import open_state
    from dstack.triggers.install import uninstall as uninstall_triggers

    with open_state() as state:
        _show(uninstall_triggers(state, Path.cwd()), as_json)


def _show(result: object, as_json: bool) -> None:
    from dstack.cli import ui
    from dstack.triggers.install import TriggersStatus

    assert isinstance(result, TriggersStatus)
    if as_json:
        ui.print_json(result.to_json())
        return
    rows = [
        [
            t["workflow"],
            t["trigger"],
            "" if t["installed"] is None else ("yes" if t["installed"] else "no"),
            ui.ago(t["last_fired"]),
            t["last_run"] or "",
            t["last_outcome"] or "",
        ]
        for t in result.triggers
    ]
    if rows:
        ui.table(["Workflow", "Trigger", "Installed", "Last fired", "Run", "Outcome"], rows)
    else:
        ui.info("No workflow in .dstack/ has triggers.")
    ui.out("")
    for h in result.hooks:
        chained = " (runs the hook that was there first)" if h.chained else ""
        ui.out(f"hook {h.name}: {h.state}{chained} — {h.path}")
    ui.out(f"schedules: {result.schedules_in}")
    for e in result.schedules:
        ui.out(f"  {e.line}")


def _log(text: str) -> None:
    from dstack.cli import ui

    ui.out(time.strftime("%Y-%m-%dT%H:%M:%S%z ") + text)


@app.command("hook", hidden=True)
def hook(
    name: str = typer.Argument(..., help="post-commit or post-merge"),
    commit: str = typer.Option("", "--commit"),
    before: str = typer.Option("", "--before"),
    rebasing: bool = typer.Option(False, "--rebasing"),
) -> None:
    """Run by dstack's Git hooks (already in the background): start the runs a commit triggers."""
    import os

    from dstack.errors import DstackError
    from dstack.store.state import open_state
    from dstack.triggers.fire import on_commit

    try:
        os.setsid()  # out of the terminal's process group: a Ctrl-C there doesn't end us
    except OSError:
        pass
    where = f"{name} {commit[:12] or '?'}:"
    if rebasing:
        _log(f"{where} made by a rebase: no runs started (run the workflow by hand if it needs one)")
        return
    try:
        with open_state() as state:
            fired = 0
            for trigger, fire, matched in on_commit(state, Path.cwd(), commit or "HEAD", before or None):
                if fire is None:
                    continue
                fired += 1
                run = f" run {fire.run_name}" if fire.run_name else ""
                _log(f"{where} {trigger.workflow}:{run} {fire.outcome} ({len(matched)} matching file(s))")
            if not fired:
                _log(f"{where} no trigger matched the changed files")
    except DstackError as e:
        _log(f"{where} no runs started: {e}")
    except Exception as e:  # a hook must never fail a commit, whatever happens
        _log(f"{where} no runs started: dstack failed: {type(e).__name__}: {e}")


@app.command("scheduled", hidden=True)
def scheduled(workflow: str = typer.Argument(...), schedule: str = typer.Option("", "--schedule")) -> None:
    """Run by the crontab entries `dstack triggers install` writes: run W from the committed HEAD."""
    from dstack.errors import DstackError
    from dstack.store.state import open_state
    from dstack.triggers.fire import on_schedule

    try:
        with open_state() as state:
            fire = on_schedule(state, Path.cwd(), workflow, schedule)
        run = f" run {fire.run_name}" if fire.run_name else ""
        _log(f"schedule {schedule} {workflow}:{run} {fire.outcome}")
    except DstackError as e:
        _log(f"schedule {schedule} {workflow}: no run started: {e}")


def watch(workflow: str = typer.Argument(..., help="The workflow to run on each change.")) -> None:
    from dstack.cli import ui
    from dstack.store.state import open_state
    from dstack.triggers.watch import watch as watch_workflow

    with open_state() as state:
        last = None
        try:
            for event in watch_workflow(state, Path.cwd(), workflow):
                last = event.run_name or last
                if event.kind == "watching":
                    ui.info(f"Watching {event.text}. Ctrl-C ends it.")
                elif event.kind == "started":
                    ui.info(f"Run [bold]{event.run_name}[/bold] started (`dstack logs -f {event.run_name}`).")
                elif event.kind == "failed":
                    ui.info(f"[red]{event.text}[/red]")
                else:
                    ui.info(event.text)
        except KeyboardInterrupt:
            tail = f"; run {last} goes on (`dstack stop {last}` stops it)" if last else ""
            ui.info(f"\nStopped watching{tail}.")
            raise typer.Exit(130) from None
