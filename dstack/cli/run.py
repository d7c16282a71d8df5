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
    from dstack.cli import ui

    extra = list(ctx.args)
    if show_help or "--help" in extra or "-h" in extra or not (workflow or reproduce):
        _print_help(ctx, workflow)
        return
    import sys

    if "--" in sys.argv[1:]:  # click swallows `--`: what follows it are the run's own arguments
        after = sys.argv[sys.argv.index("--") + 1 :]
        if after and extra[-len(after) :] == after:
            extra = [*extra[: len(extra) - len(after)], "--", *after]
    if host:  # connect to it while the run is planned
        from dstack.backends.ssh import warm_up

        warm_up(host)
    overrides, args = parse_variables(extra)
    from dstack.runs import RunRequest, create_run
    from dstack.store.state import open_state
    from dstack.sweeps import expand_grid

    if reproduce and workflow:
        args = [workflow, *args] if workflow else args
    grid = expand_grid(overrides)
    request = RunRequest(
        workflow or "",
        Path.cwd(),
        grid[0] if len(grid) == 1 else overrides,
        args,
        host=host,
        force=force,
        keep=keep,
        grid=grid if len(grid) > 1 else None,
        reproduce=reproduce,
        real_time_artifacts=real_time,
    )
    with open_state() as state:
        created = create_run(state, request)
        run_ = created.run
        if run_.sweep:
            ui.info(
                f"Sweep [bold]{run_.name}[/bold]: {len(grid)} combinations; "
                f"`dstack runs --sweep {run_.name}` shows each one."
            )
        for notice in created.notices:
            ui.info(f"[yellow]Note:[/yellow] {notice}")
        reused = [j.workflow for j in created.jobs if j.status == "reused"]
        ui.info(
            f"Run [bold]{run_.name}[/bold]: "
            + ", ".join(
                f"{j.workflow} (reused)" if j.status == "reused" else j.workflow for j in created.jobs
            )
        )
        if run_.status == "done":
            ui.info(f"All jobs reused ({', '.join(reused)}); nothing to run. `--force` runs them again.")
            return
        from dstack.scheduler.daemon import claim_run, start_orchestrator

        if detach:
            start_orchestrator(run_.id)
            ui.info(
                f"Detached. Follow with `dstack logs -f {run_.name}`; stop with `dstack stop {run_.name}`."
            )
            from dstack.attach import asks_for_ports

            if asks_for_ports(created.jobs):
                ui.info(f"`dstack attach {run_.name}` opens its ports on localhost.")
            return
        # this process drives the run while it follows it; once the run lasts, a fresh orchestrator process
        # stands by and takes the run over if this one goes away (Ctrl-C, a closed terminal, a kill)
        drive = claim_run(state, run_)
        if not drive:
            start_orchestrator(run_.id)
        from dstack.cli.attach import follow_attached as follow

        try:
            follow(state, run_.id, drive=drive)
        finally:
            if run_.reproduce_of:
                _report_reproduction(state, run_.id, run_.reproduce_of)


def _report_reproduction(state: object, run_id: str, original_id: str) -> None:
    from dstack.cli import ui
    from dstack.results import compare_runs

    new, old = state.run(run_id), state.run(original_id)  # type: ignore[attr-defined]
    if new.status != "done":
        return
    comparisons = compare_runs(state, new, old)  # type: ignore[arg-type]
    for c in comparisons:
        if c.identical:
            ui.info(f"[green]identical[/green] {c.workflow}: artifacts match run {old.name} byte for byte")
        else:
            ui.info(
                f"[yellow]different[/yellow] {c.workflow}: {', '.join(c.changed[:5])}"
                + (" …" if len(c.changed) > 5 else "")
                + f" differ from run {old.name}"
            )


def parse_variables(extra: list[str]) -> tuple[dict[str, str], list[str]]:
    """`--name value` / `--name=value` pairs become variables; the rest (and all after `--`) are run args."""
    from dstack.errors import UsageError

    overrides: dict[str, str] = {}
    args: list[str] = []
    i = 0
    while i < len(extra):
        token = extra[i]
        if token == "--":
            args += extra[i + 1 :]
            break
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            if not eq:
                if i + 1 >= len(extra):
                    raise UsageError(f"variable '--{name}' needs a value: `--{name} VALUE`")
                value = extra[i + 1]
                i += 1
            overrides[name.replace("-", "_") if name.replace("-", "_").isidentifier() else name] = value
        else:
            args.append(token)
        i += 1
    return overrides, args


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
