"""`dstack hosts`: the runners jobs are placed on."""

from __future__ import annotations

import typer

app = typer.Typer(help="Runners: this machine (`local`) and your hosts over SSH.", invoke_without_command=True)


@app.callback()
def hosts(ctx: typer.Context,
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List runners with their hardware, status and jobs."""
    if ctx.invoked_subcommand is not None:
        return
    from dstack.cli import ui
    from dstack.runners import local_enabled
    from dstack.store.state import open_state

    with open_state() as state:
        enabled = local_enabled(state)
    if as_json:
        ui.print_json([{"name": "local", "kind": "local", "enabled": enabled}])
        return
    ui.table(["Host", "Kind", "Status"], [["local", "local", "enabled" if enabled else "disabled"]])


@app.command("disable")
def disable(name: str = typer.Argument(..., help="Runner name.")) -> None:
    """Stop placing jobs on a runner."""
    from dstack.store.state import open_state

    with open_state() as state:
        if name == "local":
            state.set_setting("local.enabled", "0")


@app.command("enable")
def enable(name: str = typer.Argument(..., help="Runner name.")) -> None:
    """Place jobs on a runner again."""
    from dstack.store.state import open_state

    with open_state() as state:
        if name == "local":
            state.set_setting("local.enabled", None)
