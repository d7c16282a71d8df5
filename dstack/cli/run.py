"""`dstack run WORKFLOW [--var value ...] [ARGS ...]`."""

from __future__ import annotations

from pathlib import Path

import typer

RUN_HELP = """Run a workflow of the repo in the current directory (and what it depends on).

Variables of the workflow are passed as `--name value`; other arguments reach the job as `${{ run.args }}`.
`dstack run --help` lists the workflows; `dstack run WORKFLOW --help` lists its variables."""


def register(app: typer.Typer) -> None:
    app.command(
        "run",
        help=RUN_HELP,
        add_help_option=False,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(run)


def run(
    ctx: typer.Context,
    workflow: str = typer.Argument(None, help="The workflow to run."),
    detach: bool = typer.Option(False, "-d", "--detach", help="Return at once; the run goes on."),
    host: str = typer.Option(None, "--host", help="Run every job of the run on this runner."),
    force: bool = typer.Option(False, "--force", help="Never reuse earlier jobs."),
    keep: bool = typer.Option(False, "--keep", help="Keep the jobs' working directories."),
    reproduce: str = typer.Option(
        None,
        "--reproduce",
        metavar="RUN",
        help="Run a past run again with its exact repo state and variables.",
    ),
    real_time: bool = typer.Option(
        False, "--real-time-artifacts", help="Save every artifact while the job runs, not only at its end."
    ),
    show_help: bool = typer.Option(False, "-h", "--help", help="Show workflows or a workflow's variables."),
) -> None:

    extra = list(ctx.args)
    if show_help or "--help" in extra or "-h" in extra or not (workflow or reproduce):
        _print_help(ctx, workflow)
        return
    import sys

    if "--" in sys.argv[1:]:  # click swallows `--`: what follows it are the run's own arguments
        after = sys.argv[sys.argv.index("--") + 1 :]
        if after and extra[-len(after) :] == after:
            extra = [*extra[: len(extra) - len(after)], "--", *after]
    from dstack.cli.launch import launch, parse_variables

    overrides, args = parse_variables(extra)
    launch(workflow, overrides, args, detach, host, force, keep, reproduce, real_time)


def _print_help(ctx: typer.Context, workflow: str | None) -> None:
    """`run --help`: the help and the workflows (a file that can't be read is an error after them);
    `run W --help`: W's help and variables, or only W's one-line error when W is refused."""
    from dstack.cli import ui
    from dstack.errors import ConfigError, DstackError, UsageError

    try:
        from dstack.workflows import load_project

        project = load_project(Path.cwd())
    except DstackError as e:  # no repo here: the plain help is all we can show
        if workflow:
            raise
        ui.out(ctx.get_help())
        ui.out(f"\n(no workflows: {e})")
        return
    if not workflow:
        from rich.text import Text

        from dstack.workflows.checkcache import workflow_problems

        ui.out(ctx.get_help())
        rows: list[list[object]] = []
        unreadable: str | None = None
        for name, error in workflow_problems(project).items():
            helptext = project.help(name) or ""
            rows.append([name, Text(f"broken: {error}", style="red") if error else helptext])
            if error and ": not valid YAML" in error:  # variables.yaml or providers.yaml
                unreadable = unreadable or error
        ui.out("")
        ui.table(["Workflow", "Help"], rows, title=f"Workflows in {project.root}")
        if project.load_errors():
            raise project.load_errors()[0]
        if unreadable:
            raise ConfigError(unreadable)
        return
    if workflow not in project.names():
        if project.load_errors():
            raise project.load_errors()[0]
        raise UsageError(f"no workflow named '{workflow}'", hint="see `dstack run --help`")
    problem = project.error(workflow)
    if problem:
        raise problem
    ui.out(ctx.get_help())
    ui.out("")
    if project.help(workflow):
        ui.out(f"{workflow}: {project.help(workflow)}")
    variables = project.variables(workflow)
    if variables:
        ui.table(
            ["Variable", "Default"],
            [[f"--{k}", v] for k, v in variables.items()],
            title=f"Variables of {workflow}",
        )
    else:
        ui.out(f"Workflow {workflow} has no variables.")
