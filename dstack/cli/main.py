"""`dstack`: the command line. Each command parses its arguments, calls the core and renders the result."""

from __future__ import annotations

import os
import sys

import typer

from dstack.cli import artifacts as artifacts_cli
from dstack.cli import attach as attach_cli
from dstack.cli import config as config_cli
from dstack.cli import hosts as hosts_cli
from dstack.cli import new_app
from dstack.cli import project as project_cli
from dstack.cli import run as run_cli
from dstack.cli import runs as runs_cli
from dstack.cli import tags as tags_cli
from dstack.cli import triggers as triggers_cli

app = new_app(
    help="Run ML workflows as code on this machine, your GPU boxes over SSH, or cloud GPUs.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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
app.add_typer(artifacts_cli.app, name="artifacts")
app.add_typer(tags_cli.app, name="tags")
app.add_typer(hosts_cli.app, name="hosts")
app.add_typer(config_cli.app, name="config")
triggers_cli.register(app)
attach_cli.register(app)


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


def _configure_logging(debug: bool) -> None:
    """Library loggers (paramiko, urllib3, botocore, docker) stay off the terminal, unless --debug."""
    import logging

    if not debug:
        # Records no handler takes fall to `lastResort`, which prints them: make it drop them instead.
        # Root gets no handler, so a process that configures logging later (the orchestrator) still logs.
        logging.lastResort = logging.NullHandler()
