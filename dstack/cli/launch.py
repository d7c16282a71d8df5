"""`dstack run`'s work once its arguments are parsed (by typer, or by the fast path in `dstack.cli.entry`):
create the run, then follow it to its end or detach."""

from __future__ import annotations

from pathlib import Path


def launch(
    workflow: str | None,
    overrides: dict[str, str],
    args: list[str],
    detach: bool = False,
    host: str | None = None,
    force: bool = False,
    keep: bool = False,
    reproduce: str | None = None,
    real_time: bool = False,
) -> None:
    """Create the run (a sweep when a variable has several values) and follow it, or return at once."""
    from dstack.cli import ui
    from dstack.runs import RunRequest, create_run
    from dstack.store.state import open_state
    from dstack.sweeps import expand_grid

    if host and host != "local":  # connect to it while the run is planned (either command line path)
        from dstack.backends.ssh import warm_up

        warm_up(host)
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
        from dstack.cli.following import follow_attached as follow

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
