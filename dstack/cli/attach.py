"""`dstack attach RUN` (forwards and logs of a running run), `dstack ssh RUN` (a shell in its job)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from dstack.cli.following import follow_attached

if TYPE_CHECKING:
    from dstack.attach import PortEvent


def register(app: typer.Typer) -> None:
    app.command("attach", help="Re-open a running run's ports on localhost and follow its output.")(attach)
    app.command(
        "ssh",
        help="Open a shell in a running job's working directory, on its host or in its container.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(ssh)


def attach(run: str = typer.Argument(..., help="The run (name or prefix).")) -> None:
    from dstack.errors import RunError
    from dstack.store.state import ACTIVE_RUN, open_state

    with open_state() as state:
        run_ = state.run(run)
        if run_.status not in ACTIVE_RUN:
            raise RunError(f"run {run_.name} is not running (it is {run_.status})")
        follow_attached(state, run_.id)


@contextmanager
def ports_open(run_id: str) -> Iterator[None]:
    """Forwards for the run's ports while in the block; each URL is printed once it answers, with a spinner
    while one is still waiting."""
    from rich.markup import escape

    from dstack.attach import PortWatcher
    from dstack.cli import ui

    lock = threading.Lock()
    spinner: dict[str, Any] = {}
    watcher: PortWatcher | None = None

    def on_event(event: PortEvent) -> None:
        with lock:
            if event.error:
                ui.info(f"[yellow]{escape(event.workflow)}: {escape(event.error)}[/yellow]")
                return
            if event.url is None:
                if "status" not in spinner:
                    spinner["status"] = ui.err_console().status(
                        f"Waiting for {escape(event.workflow)} to answer on port {event.local_port}…"
                    )
                    spinner["status"].start()
                return
            ui.info(f"[dim]{escape(event.workflow)}:[/dim] [bold]{escape(event.url)}[/bold]")
            if watcher is not None and not watcher.waiting() and "status" in spinner:
                spinner.pop("status").stop()

    watcher = PortWatcher(run_id, on_event).start()
    try:
        yield
    finally:
        watcher.stop()
        with lock:
            if "status" in spinner:
                spinner.pop("status").stop()


def ssh(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="The run (name or prefix)."),
    workflow: str = typer.Option(None, "--job", help="The job's workflow, when the run has several."),
) -> None:
    """A shell (or `-- COMMAND`) in the job's working directory; replaces this process."""
    import os

    from dstack.shell import shell_argv
    from dstack.store.state import open_state

    with open_state() as state:
        argv = shell_argv(state, run, workflow, list(ctx.args))
    os.execvp(argv[0], argv)
