"""`dstack`: the command line. Each command parses its arguments, calls the core and renders the result."""

from __future__ import annotations

import os
import sys

import typer

from dstack.cli import LazyGroup, new_app
from dstack.cli import attach as attach_cli
from dstack.cli import cleanup as cleanup_cli
from dstack.cli import dashboard as dashboard_cli
from dstack.cli import metrics as metrics_cli
from dstack.cli import project as project_cli
from dstack.cli import run as run_cli
from dstack.cli import runs as runs_cli
from dstack.cli import triggers as triggers_cli

app = new_app(
    help="Run ML workflows as code on this machine, your GPU boxes over SSH, or cloud GPUs.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=LazyGroup,
)
DEBUG = {"on": bool(os.environ.get("DSTACK_DEBUG"))}


def _version(value: bool) -> None:
    if value:
        from dstack import __version__

        print(f"dstack {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run ML workflows as code on this machine, your GPU boxes over SSH, or cloud GPUs."""
    if debug:
        DEBUG["on"] = True


run_cli.register(app)
runs_cli.register(app)
project_cli.register(app)
metrics_cli.register(app)
dashboard_cli.register(app)
# groups built only when used (see LazyGroup); `app.add_typer(...)` works too, built at every start
LazyGroup.lazy.update(
    artifacts="dstack.cli.artifacts:app",
    tags="dstack.cli.tags:app",
    hosts="dstack.cli.hosts:app",
    config="dstack.cli.config:app",
)
cleanup_cli.register(app)
attach_cli.register(app)
triggers_cli.register(app)  # `triggers` and the top-level `watch`


def main() -> None:
    """Entry point: run the app; a DstackError is one red line and its exit code (traceback with --debug)."""
    from dstack.errors import DstackError

    if "--debug" in sys.argv[1:]:
        DEBUG["on"] = True
    _configure_logging(DEBUG["on"])
    try:
        app()
    except DstackError as e:
        from dstack.cli import ui

        if DEBUG["on"]:
            import traceback

            traceback.print_exc()
        ui.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("\nInterrupted\n")
        sys.exit(130)
    except OSError as e:  # a full disk under DSTACK_HOME is one line, like any DstackError
        if e.errno != 28:  # ENOSPC
            raise
        from dstack.cli import ui
        from dstack.store.disk import disk_error

        ui.error(str(disk_error(e)))
        sys.exit(7)


def _configure_logging(debug: bool) -> None:
    """Library loggers (paramiko, urllib3, botocore, docker) stay off the terminal, unless --debug."""
    import logging

    if not debug:
        # Records no handler takes fall to `lastResort`, which prints them: make it drop them instead.
        # Root gets no handler, so a process that configures logging later (the orchestrator) still logs.
        logging.lastResort = logging.NullHandler()
