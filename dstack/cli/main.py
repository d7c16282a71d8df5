"""`dstack`: the command line. Each command parses its arguments, calls the core and renders the result."""

from __future__ import annotations

import typer

from dstack.cli import attach as attach_cli
from dstack.cli import cleanup as cleanup_cli
from dstack.cli import dashboard as dashboard_cli
from dstack.cli import metrics as metrics_cli
from dstack.cli import project as project_cli
from dstack.cli import run as run_cli
from dstack.cli import runs as runs_cli
from dstack.cli import triggers as triggers_cli
from dstack.cli.apps import LazyGroup, new_app
from dstack.cli.entry import DEBUG, guarded

app = new_app(
    help="Run ML workflows as code on this machine, your GPU boxes over SSH, or cloud GPUs.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=LazyGroup,
)


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


def main(logging_: bool = True) -> None:
    """Entry point: run the app; a DstackError is one red line and its exit code (traceback with --debug)."""
    guarded(app, logging_=logging_)
